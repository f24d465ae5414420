"""Fitting the capability classifier: descriptions and authored seeds teach capabilities no row
has, and leave-one-source-out never trains on the source it scores."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone

from router.capability import DESCRIPTIONS, CapabilityModel, load_capability
from router.capability_training import (
    CapabilityClassifier,
    leave_one_source_out,
    prediction_report,
)
from router.scoring import CAPABILITIES
from router.training import CapabilityRow


@pytest.fixture(scope="module")
def shipped() -> CapabilityModel:
    return load_capability()


TRAIN = [
    ("Write a Python function that reverses a linked list.", "coding"),
    ("Fix the TypeError in this JavaScript code: const x = undefined.foo;", "coding"),
    ("Implement binary search in C++ and explain its complexity.", "coding"),
    ("Solve 2x + 7 = 19 for x.", "math"),
    ("What is the integral of x^3 from 0 to 2?", "math"),
    ("A car goes 45 miles per hour for 3 hours. How far does it travel?", "math"),
    ("Write a sonnet about the winter sea.", "creative_writing"),
    ("Write a short story about a robot who learns to paint.", "creative_writing"),
    ("Compose lyrics for a song about leaving home.", "creative_writing"),
    ("Hey! How's your weekend going?", "chat"),
    ("Good evening, nice to meet you.", "chat"),
    ("Thanks so much, you made my day!", "chat"),
]


def test_descriptions_let_an_unseen_capability_be_recognised(shipped: CapabilityModel) -> None:
    texts, labels = zip(*TRAIN, strict=True)
    model = CapabilityClassifier(shipped.embedding).fit(list(texts), list(labels))
    assert set(DESCRIPTIONS) == set(CAPABILITIES)
    prompt = "Extract every person's name and birth date from the text below as JSON."
    assert model.predict([prompt])[0] == "extraction"


def test_leave_one_source_out_never_trains_on_the_held_out_source(
    shipped: CapabilityModel,
) -> None:
    rows = [
        CapabilityRow(f"s{i % 2}/{i}", text, cap, f"s{i % 2}")
        for i, (text, cap) in enumerate(TRAIN)
    ]
    seen: list[set[str]] = []

    def fit(texts: list[str], labels: list[str]) -> CapabilityClassifier:
        seen.append(set(texts))
        return CapabilityClassifier(shipped.embedding).fit(texts, labels)

    out = leave_one_source_out(rows, fit, keep_predictions=True)
    for held, train in zip(("s0", "s1"), seen, strict=True):
        assert not {r.prompt for r in rows if r.source == held} & train
    assert set(out["per_source"]) == {"s0", "s1"}
    assert np.array(out["pooled"]["confusion"]).sum() == len(rows)
    assert set(out["predictions"]) == {r.id for r in rows}


def test_prediction_report_scores_given_predictions_per_source_and_pooled() -> None:
    rows = [
        CapabilityRow("a/1", "x", "coding", "a"),
        CapabilityRow("a/2", "y", "math", "a"),
        CapabilityRow("b/1", "z", "chat", "b"),
    ]
    research = [CapabilityRow("c/1", "w", "roleplay", "c")]
    pred = {"a/1": "coding", "a/2": "coding", "b/1": "chat", "c/1": "chat"}
    out = prediction_report(rows, pred, test_only=research)
    assert out["per_source"]["a"]["accuracy"] == 0.5
    assert out["per_source"]["b"]["accuracy"] == 1.0
    assert out["per_source"]["c"]["accuracy"] == 0.0
    assert out["pooled"]["rows"] == 3
    assert out["pooled"]["accuracy"] == round(2 / 3, 4)
    confusion = np.array(out["pooled"]["confusion"])
    assert confusion[CAPABILITIES.index("math"), CAPABILITIES.index("coding")] == 1
    assert confusion.sum() == 3
    assert out["test_only"]["rows"] == 1
    assert np.array(out["test_only"]["confusion"]).sum() == 1


ROLEPLAY_SEEDS = (
    ("Pretend you are a lighthouse keeper and greet me in character.", "roleplay"),
    ("Act as a ship's captain and give orders to your crew.", "roleplay"),
    ("You are a medieval innkeeper. Welcome the tired traveller.", "roleplay"),
)


def test_seeds_teach_the_logistic_head_a_capability_no_row_has(
    shipped: CapabilityModel,
) -> None:
    texts, labels = zip(*TRAIN, strict=True)
    prompt = "Pretend you are a pirate captain and tell me about your treasure."
    without = CapabilityClassifier(shipped.embedding, head="logistic", descriptions=False)
    with_seeds = clone(without).set_params(seeds=ROLEPLAY_SEEDS)
    assert without.fit(list(texts), list(labels)).predict([prompt])[0] != "roleplay"
    assert with_seeds.fit(list(texts), list(labels)).predict([prompt])[0] == "roleplay"


def test_authored_weight_pulls_the_head_towards_the_seeds(shipped: CapabilityModel) -> None:
    # One seed contradicts the rows (a maths question labelled reasoning): the heavier the
    # authored prompts, the more the head believes the seed over the rows.
    texts, labels = zip(*TRAIN, strict=True)
    seed = (("Solve 2x + 7 = 19 for x, and say which step you trust least.", "reasoning"),)
    col = CAPABILITIES.index("reasoning")
    p = [
        CapabilityClassifier(
            shipped.embedding,
            head="logistic",
            descriptions=False,
            seeds=seed,
            authored_weight=w,
            C=10.0,
        )
        .fit(list(texts), list(labels))
        .predict_proba([seed[0][0]])[0, col]
        for w in (1.0, 30.0)
    ]
    assert p[1] > p[0]
