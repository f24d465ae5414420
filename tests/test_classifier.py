"""The estimators follow sklearn conventions, and their serving form scores as the pipeline."""

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
    CapabilityRouting,
    LearnedScorer,
    PromptClassifier,
    StructureFeatures,
)
from router.features import STRUCTURE_FEATURES
from router.scoring import Scorer
from tests.test_features import TRICKY

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
    return PromptClassifier(min_df=1, solver="liblinear").fit(texts, y)  # router-v2's design


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
def test_serving_form_scores_equal_the_pipeline(
    routing_model: PromptClassifier, capability_model: PromptClassifier, text: str
) -> None:
    scorer = LearnedScorer(routing_model, capability_model, "test-1")
    expected = routing_model.predict_proba([text])[0, 1]
    assert scorer.score(text) == pytest.approx(expected, abs=1e-9)
    assert scorer.analyze(text).capability == capability_model.predict([text])[0]


def test_structure_features_shape_and_names() -> None:
    feats = StructureFeatures().fit(["a"])
    out = feats.transform(["What is 2+2?", "```py\nprint(1)\n```"])
    assert out.shape == (2, len(STRUCTURE_FEATURES))
    assert out[1, STRUCTURE_FEATURES.index("code_fence")] == 1.0
    assert list(feats.get_feature_names_out()) == list(STRUCTURE_FEATURES)


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


def test_joint_decision_equals_sklearn(
    routing_model: PromptClassifier, capability_model: PromptClassifier
) -> None:
    scorer = LearnedScorer(routing_model, capability_model, "test-1")
    texts = [*HARD, *EASY, *TRICKY, "", "unseen vocabulary zzqx", "hi " * 5000 + "```code```"]
    routing = routing_model.predict_proba(texts)[:, 1]
    capability = capability_model.predict(texts)
    for text, score, cap in zip(texts, routing, capability, strict=True):
        a = scorer.analyze(text)
        assert a.score == pytest.approx(score, abs=1e-9)
        assert scorer.score(text) == pytest.approx(score, abs=1e-9)
        assert a.capability == cap


def test_two_class_capability_model_predicts_like_sklearn(routing_model: PromptClassifier) -> None:
    # A two-class model has one logit (for its second class): its sign picks the class.
    texts = [t for c in ("coding", "math") for t in CAPS[c]] * 2
    y = [c for c in ("coding", "math") for _ in CAPS[c]] * 2
    binary = PromptClassifier(min_df=1, C=10.0).fit(texts, y)
    scorer = LearnedScorer(routing_model, binary, "test-3")
    probes = ["Write a Python function to sort a dict.", "What is 17 * 3 + 2?", *TRICKY]
    predicted = list(binary.predict(probes))
    assert {"coding", "math"} <= set(predicted)
    assert [scorer.analyze(t).capability for t in probes] == predicted


def test_models_that_tokenise_differently_are_refused(routing_model: PromptClassifier) -> None:
    # One tokenisation serves both models; a pair that cannot share one has no serving form.
    texts = [t for ts in CAPS.values() for t in ts] * 2
    y = [c for c, ts in CAPS.items() for _ in ts] * 2
    unigram = PromptClassifier(min_df=1, ngram_max=1).fit(texts, y)
    with pytest.raises(ValueError, match="no serving form"):
        LearnedScorer(routing_model, unigram, "test-2")


@pytest.fixture(scope="module")
def capability_routing(capability_model: PromptClassifier) -> CapabilityRouting:
    texts = HARD * 3 + EASY * 3
    y = [1] * (len(HARD) * 3) + [0] * (len(EASY) * 3)
    return CapabilityRouting(capability=capability_model).fit(texts, y)


def test_capability_routing_follows_sklearn_conventions(
    capability_model: PromptClassifier, capability_routing: CapabilityRouting
) -> None:
    name = CapabilityRouting.__name__
    check_no_attributes_set_in_init(name, CapabilityRouting())
    check_parameters_default_constructible(name, CapabilityRouting())
    check_get_params_invariance(name, CapabilityRouting(capability=capability_model))
    check_set_params(name, CapabilityRouting(capability=capability_model))
    cloned = clone(CapabilityRouting(capability=capability_model, C=3.0))
    assert cloned.C == 3.0 and cloned.capability is capability_model  # read, never refitted
    cloned.fit(HARD + EASY, [1] * 6 + [0] * 6)  # a clone fits as the original does
    assert not hasattr(CapabilityRouting(capability=capability_model), "pipeline_")
    with pytest.raises(ValueError, match="needs a fitted capability model"):
        CapabilityRouting().fit(HARD + EASY, [1] * 6 + [0] * 6)
    # Its features are the structure block and the nine (here: three) class probabilities.
    union = capability_routing.pipeline_.named_steps["features"]
    names = list(union.get_feature_names_out())
    assert len(names) == len(STRUCTURE_FEATURES) + len(capability_model.classes_)
    assert names[-1] == f"capability__p_{capability_model.classes_[-1]}"
    # The capability model is read, not refitted.
    assert capability_routing.capability is capability_model


@pytest.mark.parametrize(
    "text", [*HARD, *EASY, *TRICKY, "", "unseen vocabulary zzqx", "hi " * 5000 + "```"]
)
def test_capability_routing_serves_as_sklearn_scores(
    capability_model: PromptClassifier, capability_routing: CapabilityRouting, text: str
) -> None:
    expected = capability_routing.predict_proba([text])[0]
    scorer = LearnedScorer(capability_routing, capability_model, "test-cr")
    assert scorer.form["cap_coef"].shape == (1, len(capability_model.classes_))
    assert np.abs(scorer.form["cap_coef"]).max() > 0  # the probabilities carry weight
    assert abs(scorer.score(text) - expected[1]) <= 1e-12
    assert scorer.analyze(text).capability == capability_model.predict([text])[0]


def test_capability_routing_must_be_served_with_its_own_capability_model(
    capability_model: PromptClassifier, capability_routing: CapabilityRouting
) -> None:
    other = clone(capability_model).fit(
        [t for ts in CAPS.values() for t in ts], [c for c, ts in CAPS.items() for _ in ts]
    )
    with pytest.raises(ValueError, match="another capability model"):
        LearnedScorer(capability_routing, other, "mismatch")
