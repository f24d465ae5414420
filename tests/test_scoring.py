"""The heuristic scorer, served only before a model is trained: code, maths, analysis, tools and
length raise the score, and PII is found by the same detectors as the learned scorer's."""

from __future__ import annotations

from router.scoring import CAPABILITIES, HeuristicScorer, Scorer


def test_the_heuristic_is_a_scorer_and_names_a_known_capability() -> None:
    scorer = HeuristicScorer()
    assert isinstance(scorer, Scorer)
    for text in ("hi", "def f(x):\n    return x", "Solve 3 + 4 = x", "Explain why the sky is blue"):
        assert scorer.analyze(text).capability in CAPABILITIES


def test_harder_looking_prompts_score_higher() -> None:
    scorer = HeuristicScorer()
    chat = scorer.analyze("Hello there")
    code = scorer.analyze("Fix this:\n```python\ndef f(x):\n    return x +\n```")
    maths = scorer.analyze("What is 12 * 7 + 3 = ?")
    assert (chat.capability, code.capability, maths.capability) == ("chat", "coding", "math")
    assert chat.score < code.score and chat.score < maths.score
    assert scorer.analyze("Hello there", has_tools=True).score > chat.score
    assert scorer.analyze("Hello there " * 400).score > chat.score
    assert 0.0 <= scorer.analyze("Explain why " + "x = 1 + 1; def f(): " * 2000).score <= 1.0


def test_pii_is_flagged_with_its_kinds() -> None:
    found = HeuristicScorer().analyze("Mail me at jane.doe@example.com please")
    assert found.pii and found.pii_kinds
    assert not HeuristicScorer().analyze("Mail me tomorrow please").pii
