"""The chat-category study's counting: mappings, agreement, confusion, word-run check."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from studies.chat_categories import (
    DEV_FILE,
    LOOSE,
    RESULTS,
    ROOT,
    STRICT,
    agreement,
    bootstrap_mean,
    confusion,
    load_rows,
    reference_prompts,
    shared_runs,
    summary_line,
)

TEST_FILE = ROOT / "studies" / "data" / "chat_categories_test.jsonl"
#: The dev prompts that share a run of eight words with a seed set (seed set 2).
KNOWN_DEV_OVERLAP = {"chatdev/reasoning/12", "chatdev/stem/17"}

CATS = ["writing", "stem", "humanities", "math", "extraction"]
PRED = ["creative_writing", "reasoning", "knowledge_qa", "reasoning", "extraction"]


def test_stem_and_humanities_count_as_reasoning_only_under_the_loose_mapping() -> None:
    assert agreement(CATS, PRED, STRICT).tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert agreement(CATS, PRED, LOOSE).tolist() == [1.0, 1.0, 1.0, 0.0, 1.0]


def test_a_maths_prompt_read_as_reasoning_disagrees_under_both_mappings() -> None:
    assert agreement(["math"], ["reasoning"], LOOSE).tolist() == [0.0]


def test_confusion_counts_each_prompt_once_under_its_category() -> None:
    table = confusion(["math", "math", "stem"], ["math", "reasoning", "math"])
    assert table["math"]["math"] == 1
    assert table["math"]["reasoning"] == 1
    assert table["stem"]["math"] == 1
    assert sum(sum(row.values()) for row in table.values()) == 3


def test_stratified_bootstrap_keeps_each_stratum_and_brackets_the_mean() -> None:
    # One stratum all hits, the other all misses: resampling within strata cannot move the mean.
    fixed = bootstrap_mean([1, 1, 0, 0], ["a", "a", "b", "b"], n=200)
    assert fixed == {"mean": 0.5, "low": 0.5, "high": 0.5}
    loose = bootstrap_mean(np.array([1, 0, 1, 0, 1, 0]), n=200)
    assert loose["low"] < 0.5 < loose["high"]


def test_a_shared_eight_word_run_is_found_whatever_the_case_and_punctuation() -> None:
    rows = [
        {"id": "a", "prompt": "Please, write a poem about the sea at night in winter."},
        {"id": "b", "prompt": "Tell me a joke."},
    ]
    found = shared_runs(rows, ["WRITE A POEM ABOUT THE SEA AT NIGHT!"])
    assert found == {"a": ["write a poem about the sea at night"]}
    assert shared_runs(rows, ["a poem about the sea at night"]) == {}


def test_the_dev_set_has_twenty_prompts_per_category_written_for_tiergate() -> None:
    rows = [json.loads(line) for line in DEV_FILE.read_text(encoding="utf-8").splitlines()]
    assert Counter(r["category"] for r in rows) == dict.fromkeys(STRICT, 20)
    assert {r["author"] for r in rows} == {"tiergate"}
    assert len({r["id"] for r in rows}) == len({r["prompt"] for r in rows}) == 160


def test_the_test_set_was_written_apart_from_every_seed_set_and_the_dev_set() -> None:
    # It judges capability models fitted on the seeds, so no prompt of it may share a run of
    # eight words with a seed set, the dev set or the shared data.
    rows = load_rows(TEST_FILE)
    assert Counter(r["category"] for r in rows) == dict.fromkeys(STRICT, 20)
    assert {r["author"] for r in rows} == {"tiergate"}
    assert len({r["id"] for r in rows}) == len({r["prompt"] for r in rows}) == 160
    dev = [str(r["prompt"]) for r in load_rows(DEV_FILE)]
    assert shared_runs(rows, [*reference_prompts(), *dev]) == {}


def test_the_model_card_quotes_the_committed_results() -> None:
    card = (ROOT / "docs" / "model-card.md").read_text(encoding="utf-8")
    others = (
        "chat_categories_test.json",
        "chat_categories_test_router_v8.json",
        "chat_categories_router_v8.json",
        "chat_categories_router_v7.json",
        "chat_categories_router_v6.json",
        "chat_categories_router_v5.json",
        "chat_categories_router_v4.json",
    )
    for path in (RESULTS, *(Path(RESULTS).with_name(name) for name in others)):
        res = json.loads(path.read_text(encoding="utf-8"))
        assert summary_line(res) in card, path.name
        # Two dev prompts share a run with seed set 2 (found once the check read every seed
        # set; the model card says so); the test set shares none.
        assert set(res["rows_sharing_8_word_runs"]) <= KNOWN_DEV_OVERLAP, path.name
