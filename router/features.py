"""The prompt features every model reads: the bounded window of a prompt and its structure.

:func:`clip` bounds what the text features see, so fit and predict read the same window and a
decision's cost does not grow with the prompt; :class:`Window` holds that window's views, computed
once per request and shared by the structure features (:func:`structure`), the word models
(:class:`router.serving.JointLinear`) and the stakes rules (:func:`router.stakes.assess`).
Pure: nothing happens at import beyond compiling regexes.
"""

from __future__ import annotations

import math
import re

#: The window: a prompt's first HEAD_CHARS and last TAIL_CHARS characters (the instruction is
#: usually at the start or the end of a long pasted document); the length and line-count
#: features still see the whole text. Models record the window they were fitted with, and
#: loading refuses another (the choice is measured in docs/model-card.md).
HEAD_CHARS = 1000
TAIL_CHARS = 250
MAX_CHARS = HEAD_CHARS + TAIL_CHARS

STRUCTURE_FEATURES: tuple[str, ...] = (
    "log_chars",
    "log_words",
    "log_lines",
    "code_fence",
    "code_tokens",
    "math_symbols",
    "digit_ratio",
    "log_numbers",
    "questions",
    "multiple_choice",
    "constraints",
    "reasoning_cues",
    "non_ascii_ratio",
)

_WORD = re.compile(r"\w+")
_DIGIT = re.compile(r"\d")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
#: Code tokens: keywords (whole words, so counted from the prompt's word list) and symbols.
_CODE_WORDS = frozenset(
    [
        "def",
        "class",
        "return",
        "import",
        "function",
        "const",
        "var",
        "let",
        "public",
        "void",
        "SELECT",
        "print",
        "lambda",
    ]
)
_CODE_SYMBOLS = re.compile(r"\{|\}|;|==|!=|->|=>|\(\)")
_MATH_SYMBOLS = re.compile(
    "[=+*/^<>\u2264\u2265\u2211\u222b\u221a\u03c0]|\\\\[a-z]+|\\d\\s*[-x\u00d7]\\s*\\d"
)
#: :data:`_MATH_SYMBOLS`' three alternatives apart (each then starts with a literal or a class,
#: which the regex engine scans for fast). Their matches never overlap, so their counts add up.
_MATH_PARTS = tuple(re.compile(part) for part in _MATH_SYMBOLS.pattern.split("|"))
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_CHOICE = re.compile(r"^\s*\(?[A-D][.)]\s", re.MULTILINE)
_CHOICE_MARKS = tuple(f"{letter}{mark}" for letter in "ABCD" for mark in ".)")  # one is in each
#: Constraint words and reasoning cues, one pass: each match is counted by its group name.
_CUES = re.compile(
    r"\b(?:(?P<constraints>must|should|exactly|at least|at most|no more than|without|only|do not|"
    r"don't|make sure|ensure|format|words?|sentences?|json|table|bullet)"
    r"|(?P<reasoning>why|explain|prove|derive|compare|analy[sz]e|step[- ]by[- ]step|trade-?offs?|"
    r"evaluate|optimi[sz]e|design|implement|debug|calculate))\b",
    re.IGNORECASE,
)
#: The same cues, counted fast on lower-cased text (see :func:`_lower_equivalent`): the one-word
#: cues by looking the prompt's words up in a set, the multi-word ones by a regex that runs only
#: when one of their literal parts occurs at all. No cue word is part of a cue phrase, so the two
#: counts add up to what :data:`_CUES` counts.
_CONSTRAINT_WORDS = frozenset(
    [
        "must",
        "should",
        "exactly",
        "without",
        "only",
        "ensure",
        "format",
        "word",
        "words",
        "sentence",
        "sentences",
        "json",
        "table",
        "bullet",
    ]
)
_REASONING_WORDS = frozenset(
    [
        "why",
        "explain",
        "prove",
        "derive",
        "compare",
        "analyse",
        "analyze",
        "evaluate",
        "optimise",
        "optimize",
        "design",
        "implement",
        "debug",
        "calculate",
    ]
)
_CUE_PHRASES = re.compile(
    r"\b(?:(?P<constraints>at least|at most|no more than|do not|don't|make sure)"
    r"|(?P<reasoning>step[- ]by[- ]step|trade-?offs?))\b"
)
_CUE_PHRASE_PARTS: tuple[str, ...] = ("at least", "at most", "no more than", "do not", "don't")
_CUE_PHRASE_PARTS += ("make sure", "step", "trade")
_ASCII_DIGITS = "0123456789"


def _ascii(pattern: re.Pattern[str]) -> re.Pattern[str]:
    r"""``pattern`` compiled with ``re.ASCII``, for ASCII-only text: the same matches there for a
    pattern whose only classes are ``\w``, ``\d`` and ``\b`` (not ``\s``: Unicode's also holds
    the ASCII separators U+001C-U+001F), found faster by the engine's ASCII class tests."""
    return re.compile(pattern.pattern, (pattern.flags & ~re.UNICODE) | re.ASCII)


_WORD_ASCII = _ascii(_WORD)
_NUMBER_ASCII = _ascii(_NUMBER)
_CUE_PHRASES_ASCII = _ascii(_CUE_PHRASES)


def window_mismatch(head: int, tail: int) -> str | None:
    """Why a model fitted on a ``head`` + ``tail`` window cannot be served here, or None when
    that is this module's window."""
    if (head, tail) == (HEAD_CHARS, TAIL_CHARS):
        return None
    return (
        f"fitted on a {head} + {tail} character prompt window, this Tiergate uses "
        f"{HEAD_CHARS} + {TAIL_CHARS}; retrain with `tiergate train`"
    )


def clip(text: str, head: int = HEAD_CHARS, tail: int = TAIL_CHARS) -> str:
    """The bounded window the text features see: the whole text up to ``head + tail``
    characters, else its first ``head`` and last ``tail`` joined by a newline. Only studies of
    the window pass other sizes than :data:`HEAD_CHARS` and :data:`TAIL_CHARS`."""
    if len(text) <= head + tail:
        return text
    return text[:head] + "\n" + text[-tail:]


def _lower_equivalent(head: str, low: str) -> bool:
    """True when a lower-case ASCII pattern matched case-sensitively on ``low`` (``head.lower()``)
    finds exactly what it finds on ``head`` with ``re.IGNORECASE``.

    That holds for ASCII text, and for any text whose lower-casing keeps every character in place
    (only U+0130 lower-cases to two characters) and that has neither of the two characters the
    regex engine also folds onto an ASCII letter (dotless i onto ``i``, long s onto ``s``).
    """
    return head.isascii() or (len(low) == len(head) and "\u0131" not in low and "\u017f" not in low)


class Window:
    """One prompt as the per-request features read it, each view computed once.

    ``head`` is :func:`clip` of the text, ``low`` its lower case (the TF-IDF preprocessor's
    output), ``words`` the ``\\w+`` runs of ``head``. ``lowered`` is those runs lower-cased when
    they are exactly the ``\\w+`` runs of ``low`` (see :func:`_lower_equivalent`; a capital
    sigma, which lower-cases by context, also rules it out), else None. ``ascii``: ``head`` (and
    so ``low``) is ASCII, where the ``_ascii`` twins of the regexes may be used. ``same_case``:
    :func:`_lower_equivalent` of ``head`` and ``low``.
    """

    __slots__ = ("ascii", "head", "low", "lowered", "same_case", "text", "words")

    def __init__(
        self, text: str, head_chars: int = HEAD_CHARS, tail_chars: int = TAIL_CHARS
    ) -> None:
        self.text = text
        self.head = head = clip(text, head_chars, tail_chars)
        self.low = low = head.lower()
        self.ascii = head.isascii()
        self.words: list[str] = (_WORD_ASCII if self.ascii else _WORD).findall(head)
        self.same_case = _lower_equivalent(head, low)
        same = self.same_case and (self.ascii or "\u03a3" not in head)
        self.lowered = list(map(str.lower, self.words)) if same else None


def structure(w: Window) -> list[float]:
    """The :data:`STRUCTURE_FEATURES` of a prompt's window, in that order."""
    text, head, low, words = w.text, w.head, w.low, w.words
    n_head = max(len(head), 1)
    if w.same_case:
        lowered = w.lowered if w.lowered is not None else list(map(str.lower, words))
        constraints = sum(map(_CONSTRAINT_WORDS.__contains__, lowered))
        reasoning = sum(map(_REASONING_WORDS.__contains__, lowered))
        phrases_re = _CUE_PHRASES_ASCII if w.ascii else _CUE_PHRASES
        cues = phrases_re.findall(low) if any(p in low for p in _CUE_PHRASE_PARTS) else []
    else:
        constraints = reasoning = 0
        cues = _CUES.findall(head)
    phrases = sum(1 for _, r in cues if r)
    reasoning += phrases
    constraints += len(cues) - phrases
    if w.ascii:  # \d and non-ASCII need a regex only beyond ASCII
        digits = sum(map(head.count, _ASCII_DIGITS))
        non_ascii = 0
    else:
        digits = len(_DIGIT.findall(head))
        non_ascii = len(_NON_ASCII.findall(head))
    symbols, latex, arithmetic = _MATH_PARTS
    math_symbols = len(symbols.findall(head))
    if "\\" in head:
        math_symbols += len(latex.findall(head))
    numbers = 0
    if digits:  # both need a digit
        math_symbols += len(arithmetic.findall(head))
        numbers = len((_NUMBER_ASCII if w.ascii else _NUMBER).findall(head))
    return [
        math.log1p(len(text)),
        math.log1p(len(words)),
        math.log1p(text.count("\n")),
        1.0 if "```" in head else 0.0,
        math.log1p(sum(map(_CODE_WORDS.__contains__, words)) + len(_CODE_SYMBOLS.findall(head))),
        math.log1p(math_symbols),
        digits / n_head,
        math.log1p(numbers),
        math.log1p(head.count("?")),
        1.0 if any(c in head for c in _CHOICE_MARKS) and len(_CHOICE.findall(head)) >= 3 else 0.0,
        math.log1p(constraints),
        math.log1p(reasoning),
        non_ascii / n_head,
    ]


def structure_vector(text: str, head: int = HEAD_CHARS, tail: int = TAIL_CHARS) -> list[float]:
    """The :data:`STRUCTURE_FEATURES` of one prompt (cheap: a few compiled regexes), read over
    :func:`clip`'s window of ``head`` + ``tail`` characters."""
    return structure(Window(text, head, tail))
