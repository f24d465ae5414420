"""The prompt features (router.features): the window, and the fast structure features equal
their plain definitions."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router import features
from router.features import (
    HEAD_CHARS,
    MAX_CHARS,
    STRUCTURE_FEATURES,
    TAIL_CHARS,
    Window,
    clip,
    structure,
    structure_vector,
    window_mismatch,
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
    middle = "x" * 3000 + " explain why " + "x" * 3000
    assert structure_vector(middle)[STRUCTURE_FEATURES.index("reasoning_cues")] == 0.0


def test_a_model_fitted_on_another_window_is_named_as_such() -> None:
    assert window_mismatch(HEAD_CHARS, TAIL_CHARS) is None
    reason = window_mismatch(2000, 500)
    assert reason is not None and "2000 + 500" in reason and "retrain" in reason


def test_window_views_are_of_the_clipped_text() -> None:
    text = "Explain WHY " + "x" * 5000 + " Step by step"
    w = Window(text)
    assert (w.text, w.head, w.low) == (text, clip(text), clip(text).lower())
    assert w.ascii and w.same_case and w.lowered == [t.lower() for t in w.words]
    assert structure(w) == structure_vector(text)


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
    for m in features._CUES.finditer(head):
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
        math.log1p(len(features._MATH_SYMBOLS.findall(head))),
        len(re.findall(r"\d", head)) / n_head,
        math.log1p(len(features._NUMBER.findall(head))),
        math.log1p(head.count("?")),
        1.0 if len(features._CHOICE.findall(head)) >= 3 else 0.0,
        math.log1p(constraints),
        math.log1p(reasoning),
        len(re.findall(r"[^\x00-\x7f]", head)) / n_head,
    ]


TRICKY = [
    "Prove that the sum of the first n odd numbers is n^2, step by step.",
    "Implement a thread-safe LRU cache in C++ with O(1) get and put:\n```cpp\nclass LRU {};\n```",
    "Calculate 17 * 23 + 144 / 12 - 3^4 and show the working.",
    "hi, how are you today?",
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


# Greek capital sigma lower-cases to a final or a medial form depending on what follows it.
SIGMA = ["\u03a3\u0391\u03a3.\u03a3\u0391\u03a3", "\u039b\u039f\u0393\u039f\u03a3'\u0391 x"]


@pytest.mark.parametrize("text", [*TRICKY, *SIGMA, "plain ascii words"])
def test_shared_word_list_is_the_lower_cased_texts_words(text: str) -> None:
    # The TF-IDF tokens are taken from the clipped text's words lower-cased one by one; that is
    # only right where it equals tokenising the lower-cased text (not so around a capital sigma).
    w = Window(text)
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


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(WORDS), max_size=40).map("".join))
def test_fast_features_equal_plain_definitions_on_generated_text(text: str) -> None:
    assert structure_vector(text) == _plain_structure_vector(text)
