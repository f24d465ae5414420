"""The stakes rules (router.stakes): the reported prompts, look-alikes, and the labelled sets."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from router.serving import ProfileScorer, ServingScorer
from router.stakes import assess_stakes
from studies import stakes as study
from tests.conftest import REPO


@pytest.mark.parametrize(
    "prompt",
    [
        "Is it safe to take ibuprofen with lisinopril?",
        "Can I take paracetamol and ibuprofen together for a fever?",
        "Does sertraline interact with tramadol?",
        "My mother is on warfarin. Can she drink cranberry juice?",
        "Can my landlord keep my deposit? Should I sue?",
        "Am I liable if someone slips on my icy driveway?",
        "Should I sell all my stocks before the election?",
        "I smell gas in my kitchen. Is it safe to turn on the lights?",
    ],
)
def test_advice_where_something_hinges_on_the_answer_is_high(prompt: str) -> None:
    assert assess_stakes(prompt)[0] == "high"


@pytest.mark.parametrize(
    "prompt",
    [
        "Summarise this contract clause: The Supplier shall deliver the goods within 30 days.",
        "Translate this contract clause into French: The tenant shall keep the premises tidy.",
        "Explain what a stock split is.",
        "Give me a recipe for vegetable stock.",
        "Write a poem about a basketball court at night.",
        "Kill the process listening on port 8080 on Linux.",
        "Who discovered penicillin and in what year?",
        "List the best weapons in The Legend of Zelda: Breath of the Wild.",
    ],
)
def test_domain_words_in_tasks_where_nothing_hinges_on_them_are_not_high(prompt: str) -> None:
    assert assess_stakes(prompt)[0] != "high"


def test_the_reported_prompts_route_as_the_issue_asks() -> None:
    # "Summarise this contract clause" went closed as high stakes; the ibuprofen question did not.
    level, reason = assess_stakes("Summarise this contract clause: either party may terminate.")
    assert level == "low", reason
    level, reason = assess_stakes("Is it safe to take ibuprofen with lisinopril?")
    assert level == "high", reason


def test_the_proxy_scores_stakes_with_these_rules() -> None:
    from router.artifact import default_model_path, load_for_serving

    scorer = load_for_serving(default_model_path())
    assert isinstance(scorer, ProfileScorer | ServingScorer)
    for prompt in ("Is it safe to take ibuprofen with lisinopril?", "Summarise this clause."):
        analysis = scorer.analyze(prompt)
        assert (analysis.stakes, analysis.stakes_reason) == assess_stakes(prompt)


def test_labelled_sets_are_large_and_balanced() -> None:
    dev, test = study.load(study.DATA), study.load(study.TEST)
    assert len(dev) + len(test) >= 200
    for rows in (dev, test):
        assert len({r["id"] for r in rows}) == len(rows)
        for domain in ("medical", "legal", "financial", "safety"):
            labels = {r["label"] for r in rows if r["domain"] == domain}
            assert labels == {"high", "low"}, domain


def test_model_card_reports_what_the_study_measures() -> None:
    # The card's figures are regenerated, not copied by hand: each set's overall line must be
    # the one `python -m studies.stakes` prints today.
    card = (REPO / "docs" / "model-card.md").read_text(encoding="utf-8")
    for path in (study.DATA, study.TEST):
        precision, recall = study.precision_recall(study.confusion(study.load(path)))
        row = rf"\|\s*`{re.escape(path.name)}`[^\n]*\|\s*{precision:.3f}\s*\|\s*{recall:.3f}\s*\|"
        assert re.search(row, card), f"model card lacks {path.name}: {precision:.3f} {recall:.3f}"


def test_study_runs_as_documented() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "studies.stakes"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "== stakes.jsonl" in out and "== stakes_test.jsonl" in out
    assert re.search(r"^all\s+290\s+148\s+\d\.\d{3}\s+\d\.\d{3}$", out, re.MULTILINE)
