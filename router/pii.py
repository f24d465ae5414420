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
# digits and ``()+ .-``; every IBAN or NINO match only of capitals, digits and spaces, and starts
# with two capitals. No match holds two spaces in a row. So each match lies inside one maximal
# *run* of its detector's characters, and a detector need only be run over the runs long enough
# to hold a match that passes its check (``min_len``), with ``pos``/``endpos`` so that its
# look-behinds still see the character before the run and its look-aheads the one after it.
#
# The runs are found without a regex where that is cheap: the text is encoded to one byte per
# character (each non-ASCII one as ``?``), and those bytes are translated to a mask of 0 (in no
# match), 1 (may be in one) and 2 (a capital, for the caps runs), with every double space blanked
# first; ``bytes.find`` then locates the runs at memory speed, and indentation and padding are not
# runs. Beyond ASCII, ``\d`` also takes other scripts' digits, so there every ``?`` counts as a
# possible digit: the runs are then a superset, which costs time, never a match. In text that is
# mostly non-ASCII that superset would be most of the text, so there the runs are found by the
# two regexes below, which follow ``\d`` exactly.
_NUMERIC_RUN = re.compile(r"[\d+(][\d()+ .-]{6,}")
_CAPS_RUN = re.compile(r"[A-Z]{2} ?\d{2}[A-Z0-9 ]{4,}")


def _mask_table(ones: bytes, twos: bytes = b"") -> bytes:
    return bytes(2 if b in twos else 1 if b in ones else 0 for b in range(256))


_DIGITS = b"0123456789"
_CAPITALS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_MASKS: dict[str, tuple[re.Pattern[str], bytes, bytes]] = {
    # run name -> (regex, mask table for ASCII text, for text with some non-ASCII)
    "numeric": (
        _NUMERIC_RUN,
        _mask_table(_DIGITS + b"()+ .-"),
        _mask_table(_DIGITS + b"()+ .-?"),
    ),
    "caps": (
        _CAPS_RUN,
        _mask_table(_DIGITS + b" ", _CAPITALS),
        _mask_table(_DIGITS + b" ?", _CAPITALS),
    ),
}
_DIGIT_MASK = _mask_table(_DIGITS)
_MAYBE_DIGIT_MASK = _mask_table(_DIGITS + b"?")
#: Text where more than one character in this many is non-ASCII takes the run regexes.
_MASK_MAX_NON_ASCII = 16
_RUNS: dict[str, tuple[str, int]] = {
    "iban": ("caps", 15),
    "uk_nino": ("caps", 9),
    "card": ("numeric", 13),
    "ssn": ("numeric", 11),
    "phone": ("numeric", 9),
    "ip_address": ("numeric", 7),
}
_SHORTEST = {name: min(n for run, n in _RUNS.values() if run == name) for name in _MASKS}


_DIGIT_PAIR = re.compile(r"\d\d")
_LOCAL_PART = re.compile(r"[\w.+-]*")


def _mask_runs(mask: bytes, anchor: bytes, min_len: int) -> list[tuple[int, int]]:
    """The maximal runs of non-zero bytes in ``mask`` that hold ``anchor`` and are at least
    ``min_len`` long."""
    out: list[tuple[int, int]] = []
    n, pos = len(mask), 0
    hit = mask.find(anchor)
    while hit >= 0:
        start = mask.rfind(b"\x00", pos, hit) + 1 or pos
        end = mask.find(b"\x00", hit)
        if end < 0:
            end = n
        if end - start >= min_len:
            out.append((start, end))
        pos = end
        hit = mask.find(anchor, end)
    return out


def _runs(name: str, text: str, raw: bytes | None) -> list[tuple[int, int]]:
    """The runs of ``name`` in ``text`` at least as long as its shortest detector needs;
    ``raw`` is the text's bytes (see :func:`_encode`), or None to use the run regex."""
    regex, ascii_table, other_table = _MASKS[name]
    if raw is None:
        return [m.span() for m in regex.finditer(text)]
    table = ascii_table if text.isascii() else other_table
    mask = raw.replace(b"  ", b"\x00\x00").translate(table)
    if name == "caps":  # every match starts with two capitals
        return _mask_runs(mask, b"\x02\x02", _SHORTEST[name])
    return _mask_runs(mask, b"\x01" * _SHORTEST[name], _SHORTEST[name])


def _encode(text: str) -> bytes | None:
    """``text`` as one byte per character (non-ASCII as ``?``) when the masks suit it, else
    None."""
    if text.isascii():
        return text.encode("ascii")
    raw = text.encode("ascii", "replace")
    others = raw.count(b"?") - text.count("?")
    return raw if others * _MASK_MAX_NON_ASCII <= len(text) else None


def _has_digit_pair(text: str, raw: bytes | None) -> bool:
    """``_DIGIT_PAIR.search(text) is not None``, from the bytes when they settle it."""
    if raw is not None:
        if b"\x01\x01" in raw.translate(_DIGIT_MASK):
            return True
        if text.isascii() or b"\x01\x01" not in raw.translate(_MAYBE_DIGIT_MASK):
            return False
    return _DIGIT_PAIR.search(text) is not None


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
    runs: dict[str, list[tuple[int, int]]] = {}
    raw = _encode(text)
    # Every detector but email runs only if the text has two adjacent digits (as before; so a
    # lone "1.2.3.4" is not reported as an IP address).
    has_digits = _has_digit_pair(text, raw)
    n = len(text)
    for kind, pattern, check in _DETECTORS:
        where = _RUNS.get(kind)
        if where is None:
            matches: Iterable[re.Match[str]] = _emails(text)
        elif not has_digits:
            continue
        else:
            name, min_len = where
            if name not in runs:
                runs[name] = _runs(name, text, raw)
            matches = (
                m
                for start, end in runs[name]
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
