"""The stakes rules (router.stakes): the reported prompts, look-alikes, and the labelled sets."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router import stakes
from router.features import Window, clip
from router.serving import ProfileScorer, ServingScorer
from router.stakes import assess_stakes
from studies import stakes as study
from tests.conftest import REPO
from tests.test_features import TRICKY, WORDS


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
    from router.artifact import default_model_path, load_scorer

    scorer = load_scorer(default_model_path())
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


@pytest.mark.parametrize(
    ("text", "has_tools", "level", "reason_part"),
    [
        ("What dosage of ibuprofen is safe for a child?", False, "high", "medical"),
        ("Can my landlord keep my deposit? Should I sue?", False, "high", "legal"),
        ("Should I move my retirement savings into crypto?", False, "high", "financial"),
        ("Write a haiku about autumn.", False, "low", "no high-stakes"),
        ("List the files in the repo.", True, "medium", "tools"),
        ("Delete all rows older than a year from production.", True, "high", "tools"),
        ("Email jane@example.com the menu.", False, "medium", "personal data"),
    ],
)
def test_stakes_rules(text: str, has_tools: bool, level: str, reason_part: str) -> None:
    got, reason = assess_stakes(text, has_tools=has_tools, pii="@" in text)
    assert got == level
    assert reason_part in reason


def test_only_the_window_is_read() -> None:
    assert assess_stakes("x" * 20_000 + " what dosage is safe?")[0] == "high"
    assert assess_stakes("x" * 3000 + " dosage " + "x" * 3000)[0] == "low"


# --- the fast paths equal their plain definitions ------------------------------------------------


def _plain_stakes(text: str, has_tools: bool, pii: bool) -> tuple[str, str]:
    # router.stakes's rules written the plain way: one case-insensitive scan of the window.
    head = clip(text)
    weak = None
    for m in stakes.STAKES.finditer(head):
        domain = m.lastgroup or ""
        if not domain.endswith("_weak"):
            return "high", f"{domain} domain ({m.group(0).lower()!r})"
        weak = weak or (domain.removesuffix("_weak"), m.group(0).lower())
    if weak and stakes.CUE.search(head) and not stakes.TASK.search(head):
        return "high", f"{weak[0]} domain ({weak[1]!r})"
    if has_tools:
        m = stakes.DESTRUCTIVE.search(head)
        if m:
            return "high", f"agent workflow with tools and action {m.group(0).lower()!r}"
        return "medium", "agent workflow with tools"
    if pii:
        return "medium", "contains personal data"
    return "low", "no high-stakes domain, tools or personal data"


@pytest.mark.parametrize("text", TRICKY)
def test_stakes_equal_plain_definitions(text: str) -> None:
    for has_tools in (False, True):
        for pii in (False, True):
            assert assess_stakes(text, has_tools=has_tools, pii=pii) == _plain_stakes(
                text, has_tools, pii
            )


def _window_stakes(text: str, has_tools: bool, pii: bool) -> tuple[str, str]:
    # The stakes as analyze() computes them: with the window's word list, which lets a prompt
    # that no rule's literal prefix starts a word of skip the regex scan.
    return stakes.assess(Window(text), has_tools=has_tools, pii=pii)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(WORDS), max_size=40).map("".join))
def test_stakes_equal_plain_definitions_on_generated_text(text: str) -> None:
    assert assess_stakes(text, has_tools=True) == _plain_stakes(text, True, False)
    assert _window_stakes(text, True, False) == _plain_stakes(text, True, False)
    assert _window_stakes(text, False, False) == _plain_stakes(text, False, False)


@pytest.mark.parametrize("text", TRICKY)
def test_stakes_word_prefilter_equals_plain_definition(text: str) -> None:
    for has_tools in (False, True):
        assert _window_stakes(text, has_tools, False) == _plain_stakes(text, has_tools, False)


def test_stakes_prefixes_cover_every_rule_branch() -> None:
    # Each branch's literal prefix is what a matching word must start with; a branch whose
    # prefix were missing from the table would be skipped by the prefilter.
    rules = (*stakes.STAKES_RULES, *stakes.WEAK_RULES)
    branches = [b for _, rule in rules for b in stakes.alternatives(rule.pattern[5:-3])]
    assert "is (?:it|that|this) legal" in branches  # a group's own | does not split a branch
    assert all(branches)
    assert stakes.required_prefix("tumou?r") == "tumo"
    assert stakes.required_prefix("tax(?:es)?") == "tax"
    assert stakes.required_prefix("self[- ]harm") == "self"
    for branch in branches:
        prefix = stakes.required_prefix(branch)
        assert prefix in stakes.STAKES_PREFIXES[prefix[:2]]
        assert stakes.may_have_stakes(["zz", prefix + "x"])
    assert not stakes.may_have_stakes(["write", "a", "haiku", "about", "autumn"])
    # Through analyze()'s path: no rule word, low; a rule word, high.
    assert _window_stakes("Write a haiku about autumn.", False, False)[0] == "low"
    assert _window_stakes("What dosage of insulin?", False, False)[0] == "high"
