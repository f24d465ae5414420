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
from collections.abc import Callable, Iterator
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


_UPPER_DIGITS = re.compile(r"[A-Z]{2} ?\d{2}")
_DIGIT_PAIR = re.compile(r"\d\d")

# Cheap gates (each starts with a plain character class, which the regex engine scans fast):
# a detector only runs when the text could contain its kind at all.
_GATES: dict[str, Callable[[str], bool]] = {
    "email": lambda t: "@" in t,
    "iban": lambda t: _UPPER_DIGITS.search(t) is not None,
    "uk_nino": lambda t: _UPPER_DIGITS.search(t) is not None,
}


def _scan(text: str) -> Iterator[PiiMatch]:
    has_digits = _DIGIT_PAIR.search(text) is not None
    for kind, pattern, check in _DETECTORS:
        gate = _GATES.get(kind)
        if (gate is not None and not gate(text)) or (kind != "email" and not has_digits):
            continue
        for m in pattern.finditer(text):
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
