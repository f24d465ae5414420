"""The estimator follows sklearn conventions and its fast path equals the sklearn pipeline."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.utils.estimator_checks import (
    check_get_params_invariance,
    check_no_attributes_set_in_init,
    check_parameters_default_constructible,
    check_set_params,
)

from router import serving, stakes
from router.classifier import (
    CapabilityRouting,
    LearnedScorer,
    PromptClassifier,
    StructureFeatures,
)
from router.scoring import Scorer
from router.serving import (
    HEAD_CHARS,
    MAX_CHARS,
    STRUCTURE_FEATURES,
    TAIL_CHARS,
    clip,
    structure_vector,
)
from router.stakes import assess_stakes

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


# --- the fast paths equal their plain definitions ------------------------------------------------

_PLAIN_CODE_TOKENS = re.compile(
    r"\b(?:def|class|return|import|function|const|var|let|public|void|SELECT|print|lambda)\b"
    r"|[{};]|==|!=|->|=>|\(\)"
)


def _plain_structure_vector(text: str) -> list[float]:
    """The structure features as first written: each regex over the clipped text, cues matched
    case-insensitively."""
    head = clip(text)
    n_head = max(len(head), 1)
    constraints = reasoning = 0
    for m in serving._CUES.finditer(head):
        if m.lastgroup == "constraints":
            constraints += 1
        else:
            reasoning += 1
    return [
        math.log1p(len(text)),
        math.log1p(len(re.findall(r"\w+", head))),
        math.log1p(text.count("\n")),
        1.0 if "```" in head else 0.0,
        math.log1p(len(_PLAIN_CODE_TOKENS.findall(head))),
        math.log1p(len(serving._MATH_SYMBOLS.findall(head))),
        len(re.findall(r"\d", head)) / n_head,
        math.log1p(len(serving._NUMBER.findall(head))),
        math.log1p(head.count("?")),
        1.0 if len(serving._CHOICE.findall(head)) >= 3 else 0.0,
        math.log1p(constraints),
        math.log1p(reasoning),
        len(re.findall(r"[^\x00-\x7f]", head)) / n_head,
    ]


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


TRICKY = [
    *HARD,
    *EASY,
    "İmplement and EXPLAIN: İs the DOSAGE safe?",  # U+0130 lower-cases to two characters
    # dotless i and long s, which the regex engine folds onto i and s
    "\u0131mplement w\u0131thout a table; compare them",
    "\u017fhould we \u017fue over a lea\u017fe? prove it",
    "ΣΟΦΟΣ must explain ΟΔΟΣ. Design it",  # capital sigma lower-cases by context
    "\u212aelvin sign: ma\u212ae sure, \u212aill myself",  # Kelvin sign lower-cases to k
    "DON'T do NOT; Step-By-Step TRADEOFFS, trade-off, tradeoff, at least AT MOST no more than",
    "Take 5 MG of insulin? 401K, Tax(es), taxes; self-harm SELF HARM; chest   pain",
    "A) one\nB) two\n  (C) three\nD. four\n\nA. again",
    "x == y != z -> w => v () {}; SELECT print lambda Def DEF \\frac{1}{2} 3 x 4 3\u00d74 2-1",
    "Delete the production DB, then PAY and send an email, wire the refund, shutdown",
    "٣٤٥ numbers ١٢ and 12.5,3 1,000.25",
    "word " * 1000 + "medication " + "x " * 2000 + "Explain why the dosage matters",
]


@pytest.mark.parametrize("text", TRICKY)
def test_fast_features_equal_plain_definitions(text: str) -> None:
    assert structure_vector(text) == _plain_structure_vector(text)
    for has_tools in (False, True):
        for pii in (False, True):
            assert assess_stakes(text, has_tools=has_tools, pii=pii) == _plain_stakes(
                text, has_tools, pii
            )


# Greek capital sigma lower-cases to a final or a medial form depending on what follows it.
SIGMA = ["\u03a3\u0391\u03a3.\u03a3\u0391\u03a3", "\u039b\u039f\u0393\u039f\u03a3'\u0391 x"]


@pytest.mark.parametrize("text", [*TRICKY, *SIGMA, "plain ascii words"])
def test_shared_word_list_is_the_lower_cased_texts_words(text: str) -> None:
    # The TF-IDF tokens are taken from the clipped text's words lower-cased one by one; that is
    # only right where it equals tokenising the lower-cased text (not so around a capital sigma).
    w = serving._Window(text)
    if w.lowered is not None:
        assert w.lowered == re.findall(r"\w+", w.low)
    if text.isascii():
        assert w.lowered is not None


WORDS = ["must", "MUST", "Why", "explain", "at least", "don't", "step by step", "trade-off"]
WORDS += ["dose", "Dosage", "sue", "mg", "401k", "delete", "PAY", "def", "SELECT", "{", "==", "->"]
WORDS += [
    "İ",
    "\u0131",
    "\u017f",
    "Σ",
    "K",
    "é",
    " ",
    "\n",
    "A) ",
    "? ",
    "3",
    "x",
    "4",
    ".",
    "-",
    "\\pi",
]


WORDS += ["Chest", "pain", "tumor", "Tumour", "Taxes", "self-harm", "Gas", "leak", "bank"]
WORDS += ["account", "overdosed", "diagnosis", "side", "effects", "suing", "sues", "MG"]
WORDS += ["\x1c", "\x1f", "_", "A1", "12,5", "3.14"]  # separators Unicode calls space; \w, \d


def _window_stakes(text: str, has_tools: bool, pii: bool) -> tuple[str, str]:
    # The stakes as analyze() computes them: with the window's word list, which lets a prompt
    # that no rule's literal prefix starts a word of skip the regex scan.
    return stakes.assess(serving._Window(text), has_tools=has_tools, pii=pii)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(WORDS), max_size=40).map("".join))
def test_fast_features_equal_plain_definitions_on_generated_text(text: str) -> None:
    assert structure_vector(text) == _plain_structure_vector(text)
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


def test_joint_decision_equals_sklearn(
    routing_model: PromptClassifier, capability_model: PromptClassifier
) -> None:
    scorer = LearnedScorer(routing_model, capability_model, "test-1")
    assert scorer.serving is not None  # both models tokenise alike: the fused path is used
    texts = [*TRICKY, "", "unseen vocabulary zzqx", "hi " * 5000 + "```code```"]
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
    assert scorer.serving is not None
    probes = ["Write a Python function to sort a dict.", "What is 17 * 3 + 2?", *TRICKY]
    predicted = list(binary.predict(probes))
    assert {"coding", "math"} <= set(predicted)
    assert [scorer.analyze(t).capability for t in probes] == predicted


def test_models_that_tokenise_differently_use_separate_paths(
    routing_model: PromptClassifier,
) -> None:
    texts = [t for ts in CAPS.values() for t in ts] * 2
    y = [c for c, ts in CAPS.items() for _ in ts] * 2
    unigram = PromptClassifier(min_df=1, ngram_max=1).fit(texts, y)
    scorer = LearnedScorer(routing_model, unigram, "test-2")
    assert scorer.serving is None
    for text in TRICKY:
        a = scorer.analyze(text)
        assert a.score == pytest.approx(routing_model.predict_proba([text])[0, 1], abs=1e-9)
        assert a.capability == unigram.predict([text])[0]


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


@pytest.mark.parametrize("text", [*TRICKY, "", "unseen vocabulary zzqx", "hi " * 5000 + "```"])
def test_capability_routing_fast_path_and_serving_equal_sklearn(
    capability_model: PromptClassifier, capability_routing: CapabilityRouting, text: str
) -> None:
    expected = capability_routing.predict_proba([text])[0]
    np.testing.assert_allclose(capability_routing.predict_proba_one(text), expected, atol=1e-12)
    scorer = LearnedScorer(capability_routing, capability_model, "test-cr")
    assert scorer.serving is not None and scorer.form is not None
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
