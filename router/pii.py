"""Personal-data detectors and redaction.

Each detector is a regular expression plus, where the format has one, its checksum (Luhn for card
numbers, ISO 7064 mod-97 for IBANs), so that arbitrary digit runs in maths or code prompts are not
reported as PII. The detectors are deliberately conservative: a phone number needs separators or a
leading ``+``, an SSN needs its dashes. They are transparent rules, not a learned model.

:func:`detect` lists matches, :func:`pii_kinds` names the kinds found (what the router's ``pii``
signal uses) and :func:`redact` replaces every match with ``[KIND]`` (for logs and outcome records).
This module is pure and cheap: a handful of compiled regexes per call.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

PII_KINDS: tuple[str, ...] = ("email", "phone", "card", "iban", "ssn", "uk_nino", "ip_address")


@dataclass(frozen=True, slots=True)
class PiiMatch:
    """One detected span: ``text[start:end]`` is personal data of kind ``kind``."""

    kind: str
    start: int
    end: int


def luhn_valid(digits: str) -> bool:
    """True when ``digits`` (only 0-9) passes the Luhn checksum used by payment cards."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    """True when ``candidate`` (spaces allowed) is a well-formed IBAN with a valid mod-97 check."""
    s = candidate.replace(" ", "").upper()
    if not 15 <= len(s) <= 34 or not s[:2].isalpha() or not s[2:4].isdigit():
        return False
    rearranged = s[4:] + s[:4]
    numeric = "".join(str(int(c, 36)) for c in rearranged)
    return int(numeric) % 97 == 1


def _digits(s: str) -> str:
    return "".join(c for c in s if c.isdigit())


_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}\b")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")
_NINO = re.compile(r"\b[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b")
_PHONE = re.compile(
    r"(?<![\w+-])(?:\+\d{1,3}[ .-]?)?"
    r"(?:\(\d{1,4}\)[ .-]?\d{2,4}(?:[ .-]\d{2,4}){1,3}|\d{2,4}(?:[ .-]\d{2,4}){2,4})(?![\w-])"
    r"|(?<![\w+])\+\d{9,15}\b"
)
_IPV4 = re.compile(
    r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?![\d.])"
)


def _phone_ok(s: str) -> bool:
    n = len(_digits(s))
    # A phone number has 9-15 digits; "2023-10-15" style dates and short number lists do not.
    return 9 <= n <= 15 and (s.startswith("+") or "(" in s or n >= 10)


_DETECTORS: tuple[tuple[str, re.Pattern[str], Callable[[str], bool] | None], ...] = (
    ("email", _EMAIL, None),
    ("iban", _IBAN, iban_valid),
    ("card", _CARD, lambda s: luhn_valid(_digits(s))),
    ("ssn", _SSN, None),
    ("uk_nino", _NINO, None),
    ("phone", _PHONE, _phone_ok),
    ("ip_address", _IPV4, None),
)

# Where each detector can match at all. Every card, SSN, phone or IPv4 match is made only of
# digits and ``()+ .-`` and starts with a digit, ``+`` or ``(``; every IBAN or NINO match only of
# capitals, digits and spaces, starting with two capitals and (after an optional space) two
# digits. So each match lies inside one maximal *run* that the pattern below finds, and a detector
# need only be run over the runs (with ``pos``/``endpos``, so its look-behinds still see the
# character before the run and its look-aheads the one after it). That keeps the scan linear in
# C's character-class loop instead of trying each pattern at every position of a long prompt.
# ``min_len`` skips runs too short to hold a match that passes the detector's check.
_NUMERIC_RUN = re.compile(r"[\d+(][\d()+ .-]{6,}")
_CAPS_RUN = re.compile(r"[A-Z]{2} ?\d{2}[A-Z0-9 ]{4,}")
_RUNS: dict[str, tuple[re.Pattern[str], int]] = {
    "iban": (_CAPS_RUN, 15),
    "uk_nino": (_CAPS_RUN, 9),
    "card": (_NUMERIC_RUN, 13),
    "ssn": (_NUMERIC_RUN, 11),
    "phone": (_NUMERIC_RUN, 9),
    "ip_address": (_NUMERIC_RUN, 7),
}


_DIGIT_PAIR = re.compile(r"\d\d")
_LOCAL_PART = re.compile(r"[\w.+-]*")


def _runs(run: re.Pattern[str], text: str) -> list[tuple[int, int]]:
    return [m.span() for m in run.finditer(text)]


def _emails(text: str) -> Iterator[re.Match[str]]:
    # ``_EMAIL.finditer(text)`` without trying every position: a match holds exactly one '@' and
    # starts where the maximal run of local-part characters before that '@' starts (its
    # look-behind forbids any later start), so try just that start for each '@' in turn.
    at = text.find("@")
    if at < 0:
        return
    reverse = text[::-1]
    n, end = len(text), 0
    while at >= 0:
        run = _LOCAL_PART.match(reverse, n - at)  # the run before '@', read backwards
        start = at - (run.end() - run.start()) if run is not None else at
        if start < at and start >= end:
            m = _EMAIL.match(text, start)
            if m is not None:
                end = m.end()
                yield m
        at = text.find("@", at + 1)


def _scan(text: str) -> Iterator[PiiMatch]:
    # Yields exactly what ``pattern.finditer(text)`` per detector (then its check) would; the
    # test suite pins that against the plain scan.
    runs: dict[re.Pattern[str], list[tuple[int, int]]] = {}
    # Every detector but email runs only if the text has two adjacent digits (as before; so a
    # lone "1.2.3.4" is not reported as an IP address).
    has_digits = (not text.isascii() or any(d in text for d in "0123456789")) and (
        _DIGIT_PAIR.search(text) is not None
    )
    for kind, pattern, check in _DETECTORS:
        where = _RUNS.get(kind)
        if where is None:
            matches: Iterable[re.Match[str]] = _emails(text)
        elif not has_digits:
            continue
        else:
            run, min_len = where
            if run not in runs:
                runs[run] = _runs(run, text)
            n = len(text)
            matches = (
                m
                for start, end in runs[run]
                if end - start >= min_len
                for m in pattern.finditer(text, start, min(end + 1, n))
            )
        for m in matches:
            if check is None or check(m.group(0)):
                yield PiiMatch(kind, m.start(), m.end())


def detect(text: str) -> list[PiiMatch]:
    """All non-overlapping PII matches in ``text``, in order of position.

    Where two detectors claim overlapping text, the one listed first in ``_DETECTORS`` wins
    (a checksum-validated card beats a phone-shaped reading of the same digits).
    """
    chosen: list[PiiMatch] = []
    for match in _scan(text):
        if all(match.end <= c.start or match.start >= c.end for c in chosen):
            chosen.append(match)
    return sorted(chosen, key=lambda m: m.start)


def pii_kinds(text: str) -> tuple[str, ...]:
    """The distinct kinds of PII in ``text``, in :data:`PII_KINDS` order (empty if none)."""
    found = {m.kind for m in detect(text)}
    return tuple(k for k in PII_KINDS if k in found)


def redact(text: str) -> str:
    """``text`` with every detected PII span replaced by ``[KIND]`` (e.g. ``[EMAIL]``).

    Use it before writing prompts to logs, traces or the outcome store.
    """
    parts: list[str] = []
    pos = 0
    for m in detect(text):
        parts.append(text[pos : m.start])
        parts.append(f"[{m.kind.upper()}]")
        pos = m.end
    parts.append(text[pos:])
    return "".join(parts)
