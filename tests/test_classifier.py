"""The estimator follows sklearn conventions and its fast path equals the sklearn pipeline."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.utils.estimator_checks import (
    check_get_params_invariance,
    check_no_attributes_set_in_init,
    check_parameters_default_constructible,
    check_set_params,
)

from router.classifier import (
    HEAD_CHARS,
    MAX_CHARS,
    STRUCTURE_FEATURES,
    TAIL_CHARS,
    LearnedScorer,
    PromptClassifier,
    StructureFeatures,
    assess_stakes,
    clip,
    structure_vector,
)
from router.scoring import Scorer

HARD = [
    "Prove that the sum of the first n odd numbers is n^2, step by step.",
    "Implement a thread-safe LRU cache in C++ with O(1) get and put:\n```cpp\nclass LRU {};\n```",
    "Derive the closed form of the integral of x^2 e^x dx and explain each step.",
    "Design a distributed rate limiter; compare token bucket and sliding window trade-offs.",
    "Debug this Python: def f(x): return x[::-1] if x else None  # why does it fail on 0?",
    "Calculate 17 * 23 + 144 / 12 - 3^4 and show the working.",
]
EASY = [
    "hi, how are you today?",
    "What is the capital of France?",
    "Tell me a fun fact about cats.",
    "Say hello in Spanish.",
    "who wrote hamlet",
    "Give me a synonym for happy.",
]
CAPS = {
    "coding": ["Write a Python function to reverse a list.", "def add(a, b):\n    return a + b"],
    "math": ["What is 12 * 7 + 3?", "Solve for x: 2x + 5 = 11."],
    "chat": ["hey, how was your weekend?", "hi there, nice to meet you!"],
}


@pytest.fixture(scope="module")
def routing_model() -> PromptClassifier:
    texts = HARD * 3 + EASY * 3
    y = [1] * (len(HARD) * 3) + [0] * (len(EASY) * 3)
    return PromptClassifier(min_df=1, solver="liblinear").fit(texts, y)  # as shipped


@pytest.fixture(scope="module")
def capability_model() -> PromptClassifier:
    texts = [t for ts in CAPS.values() for t in ts] * 2
    y = [c for c, texts in CAPS.items() for _ in texts] * 2
    return PromptClassifier(min_df=1, C=10.0).fit(texts, y)


def test_sklearn_parameter_conventions() -> None:
    name = PromptClassifier.__name__
    check_no_attributes_set_in_init(name, PromptClassifier())
    check_parameters_default_constructible(name, PromptClassifier())
    check_get_params_invariance(name, PromptClassifier())
    check_set_params(name, PromptClassifier())
    params = PromptClassifier(C=3.0).get_params()
    assert params["C"] == 3.0 and clone(PromptClassifier(C=3.0)).C == 3.0


def test_fit_returns_self_and_sets_underscore_attributes(routing_model: PromptClassifier) -> None:
    model = PromptClassifier(min_df=1)
    assert model.fit(HARD + EASY, [1] * 6 + [0] * 6) is model
    assert list(model.classes_) == [0, 1]
    assert not hasattr(PromptClassifier(), "pipeline_")


def test_predict_proba_follows_classes_and_learns(routing_model: PromptClassifier) -> None:
    proba = routing_model.predict_proba(["Prove the theorem step by step.", "hi, how are you?"])
    assert proba.shape == (2, 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert proba[0, 1] > proba[1, 1]  # column 1 is class 1 ("strong better")
    assert list(routing_model.predict([HARD[0], EASY[0]])) == [1, 0]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "Prove that sqrt(2) is irrational.",
        "unseen vocabulary zzqx",
        "hi " * 5000 + "```code```",
        "Summarise this report.\n" + "lorem ipsum " * 400 + "\nProve it step by step: x^2 = 4?",
        "Ünïcödé and emoji 🎉 with 42 numbers 3.14",
    ],
)
def test_fast_path_equals_pipeline(
    routing_model: PromptClassifier, capability_model: PromptClassifier, text: str
) -> None:
    np.testing.assert_allclose(
        routing_model.predict_proba_one(text), routing_model.predict_proba([text])[0], atol=1e-9
    )
    np.testing.assert_allclose(
        capability_model.predict_proba_one(text),
        capability_model.predict_proba([text])[0],
        atol=1e-9,
    )


def test_clip_keeps_head_and_tail_of_long_prompts() -> None:
    short = "x" * MAX_CHARS
    assert clip(short) is short
    long = "a" * HEAD_CHARS + "b" * 10_000 + "Question: why?"
    clipped = clip(long)
    assert clipped.startswith("a" * HEAD_CHARS) and clipped.endswith("Question: why?")
    assert len(clipped) == HEAD_CHARS + 1 + TAIL_CHARS and "b" * (TAIL_CHARS - 20) in clipped
    # The tail's cues count, the clipped middle's do not; length still sees the whole text.
    feats = structure_vector(long)
    assert feats[STRUCTURE_FEATURES.index("reasoning_cues")] > 0
    assert feats[STRUCTURE_FEATURES.index("log_chars")] > 9.0
    assert assess_stakes("x" * 20_000 + " what dosage is safe?")[0] == "high"
    assert assess_stakes("x" * 3000 + " dosage " + "x" * 3000)[0] == "low"


def test_structure_features_shape_and_names() -> None:
    feats = StructureFeatures().fit(["a"])
    out = feats.transform(["What is 2+2?", "```py\nprint(1)\n```"])
    assert out.shape == (2, len(STRUCTURE_FEATURES))
    assert out[1, STRUCTURE_FEATURES.index("code_fence")] == 1.0
    assert list(feats.get_feature_names_out()) == list(STRUCTURE_FEATURES)


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


def test_learned_scorer_implements_scorer(
    routing_model: PromptClassifier, capability_model: PromptClassifier
) -> None:
    scorer = LearnedScorer(routing_model, capability_model, "test-1")
    assert isinstance(scorer, Scorer)
    a = scorer.analyze("Solve for x: 3x + 2 = 11. My card is 4111 1111 1111 1111.")
    assert 0.0 <= a.score <= 1.0
    text = "Solve for x: 3x + 2 = 11. My card is 4111 1111 1111 1111."
    # analyze() shares one tokenisation between both models; still equal to the sklearn path.
    assert a.score == pytest.approx(routing_model.predict_proba([text])[0, 1], abs=1e-9)
    assert scorer.score(text) == pytest.approx(a.score, abs=1e-12)
    assert a.capability == "math"
    assert a.pii and a.pii_kinds == ("card",)
    assert a.stakes == "medium"
    hard = scorer.analyze("Prove the bound step by step and derive the integral.").score
    easy = scorer.analyze("hi, how are you?").score
    assert hard > easy
    assert scorer.analyze("List files", has_tools=True).stakes == "medium"


def test_learned_scorer_rejects_non_binary_routing(capability_model: PromptClassifier) -> None:
    with pytest.raises(ValueError, match="binary"):
        LearnedScorer(capability_model, capability_model, "bad")
