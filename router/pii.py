"""Personal-data detectors, normalisation and redaction.

Each detector is a regular expression plus, where the format has one, its checksum (Luhn for card
numbers, ISO 7064 mod-97 for IBANs, ISO 7064 MOD 11-2 and a real date of birth for Chinese resident
IDs, Verhoeff for Aadhaar numbers), so that arbitrary digit runs in maths or code prompts are not
reported as PII. The detectors are deliberately conservative: a phone number needs separators or a
leading ``+`` (but for a Chinese mobile, ``1[3-9]`` and nine digits, alone), an SSN needs its dashes
or spaces (``123-45-6789``, ``123 45 6789``), or the word SSN / social security just before nine
digits; an Aadhaar number run together that reads as a time stamp (``202403140916``) needs a text
that names Aadhaar (Aadhaar, UID, UIDAI, आधार). They are transparent rules, not a learned model.

Text is normalised before it is read (:func:`normalize`): NFKC (a full-width at sign, U+FF20,
and full-width digits become ASCII, no-break spaces plain spaces), every invisible format
character (zero-width spaces and joiners, soft hyphens, direction marks, variation selectors)
removed, and hyphen look-alikes read as ``-``. So a card number split by zero-width spaces is
still a card number.

:func:`pii_kinds` names the kinds found (what the router's ``pii`` signal uses; it stops reading
a kind at its first match), :func:`redact` replaces every match with ``[KIND]`` (for logs and
outcome records), and :func:`detect` lists the matches in text as given. Every step is linear in
the text: each regex runs over bounded windows (see ``_RUNS``), and overlaps are resolved by one
merge per detector.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date

PII_KINDS: tuple[str, ...] = (
    "email",
    "phone",
    "card",
    "iban",
    "ssn",
    "uk_nino",
    "cn_resident_id",
    "aadhaar",
    "ip_address",
)


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


# ISO 7064 MOD 11-2 weights of a Chinese resident ID's first 17 digits (2**(17 - i) mod 11).
_CN_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
# The first two digits name a province-level region (GB/T 2260): 11-15 north, 21-23 north-east,
# 31-37 east, 41-46 south-central, 50-54 south-west, 61-65 north-west, 71 Taiwan, 81 Hong Kong,
# 82 Macau, 83 Taiwan residents on the mainland.
_CN_REGIONS = frozenset(
    (
        *range(11, 16),
        *range(21, 24),
        *range(31, 38),
        *range(41, 47),
        *range(50, 55),
        *range(61, 66),
        71,
        81,
        82,
        83,
    )
)


def cn_resident_id_valid(candidate: str) -> bool:
    """True when ``candidate`` (spaces or dashes allowed) is a well-formed 18-character Chinese
    resident ID: a known region, a real date of birth in 1900-2099, and its ISO 7064 MOD 11-2
    check character (``X`` for 10)."""
    s = candidate.replace(" ", "").replace("-", "").upper()
    if len(s) != 18 or not s.isascii() or not s[:17].isdigit() or s[17] not in "0123456789X":
        return False
    if int(s[:2]) not in _CN_REGIONS or s[6:8] not in ("19", "20"):
        return False
    try:
        date(int(s[6:10]), int(s[10:12]), int(s[12:14]))
    except ValueError:
        return False
    total = sum(w * (ord(c) - 48) for w, c in zip(_CN_ID_WEIGHTS, s, strict=False))
    check = 10 if s[17] == "X" else ord(s[17]) - 48
    return (total + check) % 11 == 1


# Verhoeff's dihedral-group tables: multiplication, position permutation.
_VERHOEFF_D = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
    (1, 2, 3, 4, 0, 6, 7, 8, 9, 5),
    (2, 3, 4, 0, 1, 7, 8, 9, 5, 6),
    (3, 4, 0, 1, 2, 8, 9, 5, 6, 7),
    (4, 0, 1, 2, 3, 9, 5, 6, 7, 8),
    (5, 9, 8, 7, 6, 0, 4, 3, 2, 1),
    (6, 5, 9, 8, 7, 1, 0, 4, 3, 2),
    (7, 6, 5, 9, 8, 2, 1, 0, 4, 3),
    (8, 7, 6, 5, 9, 3, 2, 1, 0, 4),
    (9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
)
_VERHOEFF_P = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
    (1, 5, 7, 6, 2, 8, 3, 0, 9, 4),
    (5, 8, 0, 3, 7, 9, 6, 1, 4, 2),
    (8, 9, 1, 6, 0, 4, 3, 5, 2, 7),
    (9, 4, 5, 3, 1, 2, 6, 8, 7, 0),
    (4, 2, 8, 6, 5, 7, 3, 9, 0, 1),
    (2, 7, 9, 3, 8, 0, 6, 4, 1, 5),
    (7, 0, 4, 6, 9, 1, 3, 2, 5, 8),
)


def verhoeff_valid(digits: str) -> bool:
    """True when ``digits`` (decimal digits of any script) passes the Verhoeff checksum used by
    Aadhaar numbers."""
    c = 0
    for i, ch in enumerate(reversed(digits)):
        c = _VERHOEFF_D[c][_VERHOEFF_P[i % 8][int(ch)]]
    return c == 0


def _aadhaar_ok(s: str) -> bool:
    return verhoeff_valid(_digits(s))


def _digits(s: str) -> str:
    return "".join(c for c in s if c.isdigit())


# A match may not start or end next to an ASCII letter, a digit or "_", where ``\b`` would also
# refuse any other letter: Chinese, Japanese or Thai, written without spaces, put personal data
# right beside letters ("电话090-1234-5678です", "邮箱zhang@example.cn谢谢").
# An email's domain may be internationalised ("müller.de", "例子.中国", "почта.рф"): its top-level
# label is ASCII letters or letters of one other script (an IDN top-level domain, such as "рф").
_EMAIL = re.compile(
    r"(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)*"
    r"\.(?:[A-Za-z]{2,24}(?![A-Za-z\d_])|[^\W\d_A-Za-z]{2,24})"
)
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IBAN = re.compile(r"(?<![A-Za-z\d_])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z\d_])")
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![\d-])")
# Nine digits in a row are an SSN only just after its name ("SSN: 123456789"): elsewhere they are
# as often an order number or a sum. The value is the ``v`` group (see ``_span``). ASCII-only, so
# that the keyword prefilter (``_named_ssns``) finds exactly where it can match.
_SSN_NAMED = re.compile(
    r"\b(?:ssn|social[ -]security(?:[ -](?:number|no))?)(?![a-z])[^\w\n]{0,12}"
    r"(?:is[^\w\n]{1,6})?(?P<v>(?!000|666|9\d\d)\d{3}(?!00)\d{2}(?!0000)\d{4})(?!\d)",
    re.IGNORECASE | re.ASCII,
)
_SSN_NAMED_MAX = 64  # longer than any match of _SSN_NAMED plus the character after it
# A UK National Insurance number: two letters, six digits, A-D. HMRC never uses D, F, I, Q, U or
# V as either letter, nor O as the second, and never issues the prefixes BG, GB, KN, NK, NT, TN
# or ZZ (QQ 12 34 56 C is the example its forms show).
_NINO = re.compile(
    r"(?<![A-Za-z\d_])(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
    r" ?\d{2} ?\d{2} ?\d{2} ?[A-D](?![A-Za-z\d_])"
)
# National ID numbers made of digits (and a Chinese ID's check character X), and mobiles run
# together, are read only where they stand alone: not inside a longer number (after a '.', '+'
# or '-': a decimal fraction, a signed number, a range; before a decimal fraction), not as an
# operand or a result ("2 * 13812345678", "13812345678 + 1 = 13812345679"; "phone=1381..." in
# a query string still counts), and in groups not beside another group of digits. What is left
# is gated by the check (``cn_resident_id_valid``, ``verhoeff_valid``).
_ALONE_BEFORE = r"(?<![A-Za-z\d_.+*^\u00d7\u00f7-])(?<![+*^\u00d7\u00f7=] )"  # times, divide
_ALONE_AFTER = r"(?![A-Za-z\d_]|\.\d| ?[+*^\u00d7\u00f7=])"
# China's resident ID: 18 characters, or grouped 6-8-4 (region, date of birth, sequence+check).
_CN_ID = re.compile(
    _ALONE_BEFORE
    + r"(?:\d{17}[\dXx]|(?<!\d[ -])\d{6}([ -])\d{8}\1\d{3}[\dXx](?![ -]\d))"
    + _ALONE_AFTER
)
# India's Aadhaar: 12 digits, the first 2-9. As printed, in groups of four (2341 2341 2346), its
# checksum alone decides. Run together, as cards are, the checksum decides too (one 12-digit
# number in ten passes it, as one in ten passes Luhn), but for a number that reads as a
# timestamp (``_timestamp_like``: 202403140916), which counts only in a text that names Aadhaar
# (``_names_aadhaar``: anywhere, so that a table's header names its rows). Two patterns that
# match alike, so that each has its own check and gate (``_Reading.matches``).
_AADHAAR = re.compile(
    _ALONE_BEFORE + r"(?<!\d[ -])[2-9]\d{3}([ -])\d{4}\1\d{4}(?![ -]\d)" + _ALONE_AFTER
)
_AADHAAR_RUN = re.compile(_ALONE_BEFORE + r"[2-9]\d{11}" + _ALONE_AFTER)
_AADHAAR_RUN_NAMED = re.compile(_ALONE_BEFORE + r"[2-9]\d\d{10}" + _ALONE_AFTER)
# Aadhaar, its common spellings and its issuer (UIDAI, whose number is the "UID"), in Latin
# script and in the scripts of India's larger languages: Devanagari, Bengali, Gurmukhi,
# Gujarati, Odia, Tamil, Telugu, Kannada, Malayalam (with and without its chillu letter).
# Looked for in the lower-cased text by ``str`` search (``_names_aadhaar``), many times faster
# than a case-blind regex of them.
_AADHAAR_NAMES = (
    "aadhaar",
    "aadhar",
    "adhaar",
    "uidai",
    "\u0906\u0927\u093e\u0930",
    "\u0986\u09a7\u09be\u09b0",
    "\u0a06\u0a27\u0a3e\u0a30",
    "\u0a86\u0aa7\u0abe\u0ab0",
    "\u0b06\u0b27\u0b3e\u0b30",
    "\u0b86\u0ba4\u0bbe\u0bb0\u0bcd",
    "\u0c06\u0c27\u0c3e\u0c30\u0c4d",
    "\u0c86\u0ca7\u0cbe\u0cb0\u0ccd",
    "\u0d06\u0d27\u0d3e\u0d7c",
    "\u0d06\u0d27\u0d3e\u0d30\u0d4d",
)
# "uid" as a word of its own ("UID: ...", not "uuid" or "uid_t"); it starts with a literal, so
# the search skips ahead fast, and looks behind only once "uid" is found.
_UID = re.compile(r"uid(?![a-z\d_])(?<![a-z\d_]uid)")


def _timestamp_like(digits: str) -> bool:
    """True when 12 digits read as a time stamp: ``YYYYMMDDhhmm`` in 2000-2099, or
    ``YYMMDDhhmmss`` in 2020-2029. About one real Aadhaar number in 2,000 does too."""
    for month, day, hour, minute, second in ((4, 6, 8, 10, None), (2, 4, 6, 8, 10)):
        if int(digits[:2]) != 20 if second is None else not 20 <= int(digits[:2]) <= 29:
            continue
        if (
            1 <= int(digits[month : month + 2]) <= 12
            and 1 <= int(digits[day : day + 2]) <= 31
            and int(digits[hour : hour + 2]) <= 23
            and int(digits[minute : minute + 2]) <= 59
            and (second is None or int(digits[second : second + 2]) <= 59)
        ):
            return True
    return False


def _aadhaar_run_ok(s: str) -> bool:
    digits = _digits(s)
    return verhoeff_valid(digits) and not _timestamp_like(digits)


def _names_aadhaar(text: str) -> bool:
    """True when ``text`` names Aadhaar (``_AADHAAR_NAMES``, or "uid" as a word), in any case."""
    lower = text.lower()
    return any(name in lower for name in _AADHAAR_NAMES) or _UID.search(lower) is not None


# A phone number in groups of 2-4 digits; after a leading "+" (a country code) or an area code
# in brackets, in groups of any length, as countries write them: "+49 30 12345678",
# "+33 6 12 34 56 78", "+91 98765 43210", "(11) 98765-4321".
_PHONE = re.compile(
    r"(?<![A-Za-z\d_+-])(?:\+\d{1,3}[ .-]?)?"
    r"(?:\(\d{1,4}\)[ .-]?\d{1,8}(?:[ .-]\d{1,8}){1,3}|\d{2,4}(?:[ .-]\d{2,4}){2,4})"
    r"(?![A-Za-z\d_-])"
    r"|(?<![A-Za-z\d_+-])\+\d{1,3}(?:[ .-]\d{1,8}){1,6}(?![A-Za-z\d_-])"
    r"|(?<![A-Za-z\d_+])\+\d{9,15}(?![A-Za-z\d_])"
)
# A Chinese mainland mobile number, 1[3-9] and nine digits, is written run together as often as
# not, with or without +86 / 0086 / (86) before it; grouped (138 1234 5678) it is _PHONE's.
_CN_MOBILE = re.compile(
    _ALONE_BEFORE + r"(?:(?:\+|00)86[ -]?|\(\+?86\)[ -]?)?1[3-9]\d{9}" + _ALONE_AFTER
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
    ("cn_resident_id", _CN_ID, cn_resident_id_valid),
    ("card", _CARD, lambda s: luhn_valid(_digits(s))),
    ("ssn", _SSN, None),
    ("ssn", _SSN_NAMED, None),
    ("uk_nino", _NINO, None),
    ("aadhaar", _AADHAAR, _aadhaar_ok),
    ("aadhaar", _AADHAAR_RUN, _aadhaar_run_ok),
    ("aadhaar", _AADHAAR_RUN_NAMED, _aadhaar_ok),  # only where the text names Aadhaar
    ("phone", _PHONE, _phone_ok),
    ("phone", _CN_MOBILE, None),
    ("ip_address", _IPV4, None),
)

# Where each detector can match at all. Every card or SSN match is made only of digits and
# single spaces or dashes; every phone match only of digits, ``()+`` and single ``[ .-]``
# separators; every Chinese ID or Aadhaar match only of digits, ``Xx`` and single spaces or
# dashes (their runs take dots too, so that their look-arounds see a decimal point); every IPv4
# match only of digits and single dots; every IBAN or NINO match only of capitals, digits and
# single spaces, and starts with two capitals. So each match lies inside one
# maximal *run* of its detector's characters with no two separators in a row, and a detector need
# only be run over the runs long enough to hold a match that passes its check (``min_len``), with
# ``pos``/``endpos`` so that its look-behinds still see the character before the run and its
# look-aheads the one after it. Each run kind is narrow on purpose: a long run of "123." is one
# phone run and one IPv4 run, and no card or SSN run at all.
#
# The runs are found without a regex where that is cheap: the text is encoded to one byte per
# character (each non-ASCII one as ``?``), and those bytes are translated to a mask of 0 (in no
# match), 1 (may be in one), 2 (a capital, for the caps runs) and 3 (a separator); every pair
# of separators is blanked, and ``bytes.find`` then locates the runs at memory speed.
# Beyond ASCII, ``\d`` also takes other scripts' digits, so there every ``?`` counts as a
# possible digit: the runs are then a superset, which costs time, never a match. In text that is
# mostly non-ASCII that superset would be most of the text, so there the runs are found by the
# regexes below, which follow ``\d`` exactly (without blanking separator pairs: a superset).
_RUN_REGEX = {
    "digits": re.compile(r"\d[\d -]{10,}"),
    "phone": re.compile(r"[\d+(][\d()+ .-]{8,}"),
    "dotted": re.compile(r"\d[\d.]{6,}"),
    "caps": re.compile(r"[A-Z]{2} ?\d{2}[A-Z0-9 ]{4,}"),
    "ids": re.compile(r"\d[\dXx .-]{11,}"),
}


def _mask_table(ones: bytes, separators: bytes, twos: bytes = b"", fours: bytes = b"") -> bytes:
    # 1: may be in a match, 2: a capital, 3: a separator, 4: a phone's ``()+``.
    return bytes(
        4 if b in fours else 2 if b in twos else 3 if b in separators else 1 if b in ones else 0
        for b in range(256)
    )


_DIGITS = b"0123456789"
_CAPITALS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_MASKS: dict[str, tuple[bytes, bytes]] = {
    # run name -> (mask table for ASCII text, for text with some non-ASCII)
    "digits": (_mask_table(_DIGITS, b" -"), _mask_table(_DIGITS + b"?", b" -")),
    "phone": (
        _mask_table(_DIGITS, b" .-", b"", b"()+"),
        _mask_table(_DIGITS + b"?", b" .-", b"", b"()+"),
    ),
    "dotted": (_mask_table(_DIGITS, b"."), _mask_table(_DIGITS + b"?", b".")),
    "caps": (_mask_table(_DIGITS, b" ", _CAPITALS), _mask_table(_DIGITS + b"?", b" ", _CAPITALS)),
    "ids": (_mask_table(_DIGITS + b"Xx", b" .-"), _mask_table(_DIGITS + b"Xx?", b" .-")),
}
_SEPARATOR_AS_ONE = bytes(1 if b in (3, 4) else b for b in range(256))
#: How every IBAN or NINO match starts, in the caps mask: two capitals, maybe a space, two digits.
_CAPS_STARTS = (b"\x02\x02\x01\x01", b"\x02\x02\x03\x01\x01")
_PHONE_MARKS = b"\x04"
_DIGIT_MASK = _mask_table(_DIGITS, b"")
_MAYBE_DIGIT_MASK = _mask_table(_DIGITS + b"?", b"")
#: Text where more than one character in this many is non-ASCII takes the run regexes.
_MASK_MAX_NON_ASCII = 16
#: Each detector's run kind and shortest match (keyed by its regex: two may report one kind).
_RUNS: dict[re.Pattern[str], tuple[str, int]] = {
    _IBAN: ("caps", 15),
    _NINO: ("caps", 9),
    _CARD: ("digits", 13),
    _SSN: ("digits", 11),
    _CN_ID: ("ids", 18),
    _AADHAAR: ("ids", 14),
    _AADHAAR_RUN: ("ids", 12),
    _AADHAAR_RUN_NAMED: ("ids", 12),
    _PHONE: ("phone", 9),
    _CN_MOBILE: ("phone", 11),
    _IPV4: ("dotted", 7),
}
#: An IPv4 address is at most this long; and (its look-arounds forbid a digit or dot on either
#: side) in ASCII text it is a whole run, so a longer ASCII run holds none.
_IPV4_MAX = 15
#: Most digits in a row each detector needs in a run kind's mask once its separators (and
#: ``()+``) are left out: a text whose mask holds no such row is not scanned by it at all (a
#: cheap whole-text gate). A Chinese ID or an Aadhaar number is gated on the digits mask, which
#: every text has: its own mask is built only for a text that passes.
_GATES = {
    _CARD: ("digits", 13),
    _SSN: ("digits", 9),
    _CN_ID: ("digits", 17),
    _AADHAAR: ("digits", 12),
    _AADHAAR_RUN: ("digits", 12),
    _AADHAAR_RUN_NAMED: ("digits", 12),
    _PHONE: ("phone", 9),
    _CN_MOBILE: ("digits", 11),
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


def _runs(name: str, text: str, mask: bytes | None) -> list[tuple[int, int]]:
    """The runs of ``name`` in ``text`` at least as long as its shortest detector needs;
    ``mask`` is its blanked mask (``_Reading._blanked``), or None to use the run regex."""
    if mask is None:
        return [m.span() for m in _RUN_REGEX[name].finditer(text)]
    mask = mask.translate(_SEPARATOR_AS_ONE)
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


def _has_digit_pair(text: str, raw: bytes | None, *, ascii_digits: bool) -> bool:
    """``_DIGIT_PAIR.search(text) is not None``, from the bytes when they settle it."""
    if raw is not None:
        if b"\x01\x01" in raw.translate(_DIGIT_MASK):
            return True
        if ascii_digits or b"\x01\x01" not in raw.translate(_MAYBE_DIGIT_MASK):
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


def _named_ssns(text: str, raw: bytes | None) -> Iterator[re.Match[str]]:
    # ``_SSN_NAMED.finditer(text)``: each match starts at an "ssn" or "social" (any case), so
    # try just those places, each over a window longer than any match.
    if raw is None:
        yield from _SSN_NAMED.finditer(text)
        return
    lower, n = raw.lower(), len(text)
    for word in (b"ssn", b"social"):
        at = lower.find(word)
        while at >= 0:
            m = _SSN_NAMED.match(text, at, min(at + _SSN_NAMED_MAX, n))
            if m is not None:
                yield m
            at = lower.find(word, at + 1)


def _span(m: re.Match[str]) -> tuple[int, int]:
    """The personal data in a detector's match: its ``v`` group where it has one."""
    return m.span("v") if "v" in m.re.groupindex else m.span()


class _Reading:
    """One text as the detectors read it: its bytes, and each run kind's mask and runs, each
    worked out once, when a detector first needs it."""

    def __init__(self, text: str, *, normalized: bool = False) -> None:
        self.text = text
        # Normalised text has no digit beyond ASCII: its bytes (other characters as '?') then
        # serve whatever its share of other characters.
        self.ascii_digits = normalized or text.isascii()
        self.raw = raw = text.encode("ascii", "replace") if normalized else _encode(text)
        self.masks: dict[str, bytes | None] = {}
        self.rows: dict[str, bytes] = {}
        self.runs: dict[str, list[tuple[int, int]]] = {}
        # Every detector but email runs only if the text has two adjacent digits (so a lone
        # "1.2.3.4" is not reported as an IP address).
        if raw is not None and self.ascii_digits:
            # The digits mask (digits are 1) settles it, and the card and SSN runs need it.
            digits = raw.translate(_MASKS["digits"][0])
            self.has_digits = b"\x01\x01" in digits
            self.masks["digits"] = digits.replace(b"\x03\x03", b"\x00\x00")
        else:
            self.has_digits = _has_digit_pair(text, raw, ascii_digits=self.ascii_digits)

    def matches(self, pattern: re.Pattern[str]) -> Iterable[re.Match[str]]:
        """What ``pattern.finditer(text)`` finds, read only where it can match."""
        text, raw = self.text, self.raw
        if pattern is _EMAIL:
            return _emails(text)
        if not self.has_digits:
            return ()
        if pattern is _SSN_NAMED:
            return sorted(_named_ssns(text, raw), key=lambda m: m.start())
        if self._gated_out(pattern):
            return ()
        if pattern is _AADHAAR_RUN_NAMED and not _names_aadhaar(text):
            return ()
        name, min_len = _RUNS[pattern]
        if name not in self.masks:
            self.masks[name] = self._blanked(name)
        if name not in self.runs:
            self.runs[name] = _runs(name, text, self.masks[name])
        spans = self.runs[name]
        if pattern is _IPV4 and raw is not None:
            spans = [(a, b) for a, b in spans if b - a <= _IPV4_MAX or b"?" in raw[a:b]]
        n = len(text)
        return (
            m
            for start, end in spans
            if end - start >= min_len
            for m in pattern.finditer(text, start, min(end + 1, n))
        )

    def _gated_out(self, pattern: re.Pattern[str]) -> bool:
        """True when the text cannot hold a ``pattern`` match: with its gate's run separators
        and ``()+`` dropped, that run's blanked mask (``_blanked``) has no row of the gate's
        digits. (A separator pair, blanked, ends every match, so it never joins two rows.)"""
        gate = _GATES.get(pattern)
        if gate is None:
            return False
        name, need = gate
        if name not in self.masks:
            self.masks[name] = self._blanked(name)
        mask = self.masks[name]
        if mask is None:
            return False
        if name not in self.rows:
            drop = b"\x03" if name == "digits" else b"\x03" + _PHONE_MARKS
            self.rows[name] = mask.translate(None, drop)
        return b"\x01" * need not in self.rows[name]

    def _blanked(self, name: str) -> bytes | None:
        """The mask of ``name``'s runs (1 may be in a match, 2 a capital, 3 a separator, 4 a
        phone's ``()+``), every separator pair blanked (0), or None where ``raw`` is None (the
        run regexes serve). For the caps runs, empty when no IBAN or NINO can start anywhere."""
        raw = self.raw
        if raw is None:
            return None
        ascii_table, other_table = _MASKS[name]
        mask = raw.translate(ascii_table if self.ascii_digits else other_table)
        if name == "caps" and not any(a in mask for a in _CAPS_STARTS):
            return b""
        return mask.replace(b"\x03\x03", b"\x00\x00")


def _scan(
    text: str, *, first_only: bool = False, normalized: bool = False
) -> Iterator[list[PiiMatch]]:
    """Each detector's checked matches in ``text``, in position order, one list per detector
    in ``_DETECTORS`` order (only the first match of each kind when ``first_only``).

    The lists are exactly what ``pattern.finditer(text)`` per detector (then its check) finds;
    the test suite pins that against the plain scan. Every regex runs over bounded windows
    (runs of its characters, a window after a keyword or an '@'), each text position in at most
    a fixed number of them, so the scan is linear in the text.
    """
    reading = _Reading(text, normalized=normalized)
    found: set[str] = set()
    for kind, pattern, check in _DETECTORS:
        if first_only and kind in found:
            continue
        out: list[PiiMatch] = []
        for m in reading.matches(pattern):
            if check is None or check(m.group(0)):
                out.append(PiiMatch(kind, *_span(m)))
                if first_only:
                    found.add(kind)
                    break
        yield out


def _merge(chosen: list[PiiMatch], new: list[PiiMatch]) -> list[PiiMatch]:
    """``chosen`` plus each of ``new`` that overlaps none of ``chosen``; both are sorted and
    free of overlaps, and so is the result. One pass over both (linear)."""
    kept: list[PiiMatch] = []
    i, n = 0, len(chosen)
    for m in new:
        while i < n and chosen[i].end <= m.start:
            i += 1
        if i == n or chosen[i].start >= m.end:
            kept.append(m)
    # Two sorted runs: timsort merges them in linear time.
    return sorted(chosen + kept, key=lambda m: m.start) if kept else chosen


def detect(text: str) -> list[PiiMatch]:
    """All non-overlapping PII matches in ``text`` as given (not normalised), in order of
    position.

    Where two detectors claim overlapping text, the one listed first in ``_DETECTORS`` wins
    (a checksum-validated card beats a phone-shaped reading of the same digits).
    """
    return _detect(text, normalized=False)


def _detect(text: str, *, normalized: bool) -> list[PiiMatch]:
    chosen: list[PiiMatch] = []
    for matches in _scan(text, normalized=normalized):
        chosen = _merge(chosen, matches)
    return chosen


# Invisible characters: every format character (Unicode category Cf; the tests check this list
# against the running Python's Unicode data), plus combining grapheme joiner, Hangul fillers,
# Khmer inherent vowels, Mongolian and other variation selectors. Split at the BMP: a class with
# astral ranges is several times slower to scan, and most text has no astral character.
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u115f\u1160"
    "\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164"
    "\ufe00-\ufe0f\ufeff\uffa0\ufff9-\ufffb]+"
)
_INVISIBLE_ASTRAL = re.compile(
    "[\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    "\U000e0001\U000e0020-\U000e007f\U000e0100-\U000e01ef]+"
)
# Hyphens and dashes NFKC keeps, read as '-' (an SSN written with non-breaking hyphens).
_DASHES = re.compile("[\u2010-\u2015\u2043\u2212\u2e3a\u2e3b\ufe58\ufe63]")
# Runs of other characters in text.encode("ascii", "replace"), with ASCII gaps of under 32
# characters inside them: fewer, longer pieces to normalise.
# Every decimal digit beyond ASCII (each block of ten; the tests check this list against what
# ``\\d`` matches in the running Python), read as its ASCII digit: after normalising, no other
# digit is left, so the detectors' masks need not treat every other character as a maybe-digit.
_OTHER_DIGITS = re.compile(
    "["
    "\\u0660-\\u0669\\u06f0-\\u06f9\\u07c0-\\u07c9\\u0966-\\u096f\\u09e6-\\u09ef"
    "\\u0a66-\\u0a6f\\u0ae6-\\u0aef\\u0b66-\\u0b6f\\u0be6-\\u0bef\\u0c66-\\u0c6f"
    "\\u0ce6-\\u0cef\\u0d66-\\u0d6f\\u0de6-\\u0def\\u0e50-\\u0e59\\u0ed0-\\u0ed9"
    "\\u0f20-\\u0f29\\u1040-\\u1049\\u1090-\\u1099\\u17e0-\\u17e9\\u1810-\\u1819"
    "\\u1946-\\u194f\\u19d0-\\u19d9\\u1a80-\\u1a89\\u1a90-\\u1a99\\u1b50-\\u1b59"
    "\\u1bb0-\\u1bb9\\u1c40-\\u1c49\\u1c50-\\u1c59\\ua620-\\ua629\\ua8d0-\\ua8d9"
    "\\ua900-\\ua909\\ua9d0-\\ua9d9\\ua9f0-\\ua9f9\\uaa50-\\uaa59\\uabf0-\\uabf9"
    "\\uff10-\\uff19"
    "]"
)
_OTHER_DIGITS_ASTRAL = re.compile(
    "["
    "\\U000104a0-\\U000104a9\\U00010d30-\\U00010d39\\U00011066-\\U0001106f"
    "\\U000110f0-\\U000110f9\\U00011136-\\U0001113f\\U000111d0-\\U000111d9"
    "\\U000112f0-\\U000112f9\\U00011450-\\U00011459\\U000114d0-\\U000114d9"
    "\\U00011650-\\U00011659\\U000116c0-\\U000116c9\\U00011730-\\U00011739"
    "\\U000118e0-\\U000118e9\\U00011950-\\U00011959\\U00011c50-\\U00011c59"
    "\\U00011d50-\\U00011d59\\U00011da0-\\U00011da9\\U00016a60-\\U00016a69"
    "\\U00016ac0-\\U00016ac9\\U00016b50-\\U00016b59\\U0001d7ce-\\U0001d7d7"
    "\\U0001d7d8-\\U0001d7e1\\U0001d7e2-\\U0001d7eb\\U0001d7ec-\\U0001d7f5"
    "\\U0001d7f6-\\U0001d7ff\\U0001e140-\\U0001e149\\U0001e2f0-\\U0001e2f9"
    "\\U0001e950-\\U0001e959\\U0001fbf0-\\U0001fbf9"
    "]"
)
_NON_ASCII_RUNS = re.compile(rb"\?(?:[^?]{0,31}\?)*")


def normalize(text: str) -> str:
    """``text`` as the detectors read it: NFKC, invisible characters removed, dashes as '-',
    every decimal digit as its ASCII digit.

    ASCII text is returned as is (none of these steps changes it). In mostly-ASCII text only
    the runs of other characters are worked on (NFKC leaves ASCII as it is, and no ASCII
    character composes with the one before it, so each run is normalised with the character
    before it, which may take a combining mark).
    """
    if text.isascii():
        return text
    raw = text.encode("ascii", "replace")
    if (raw.count(b"?") - text.count("?")) * _MASK_MAX_NON_ASCII > len(text):
        return _normalize_all(text)
    parts: list[str] = []
    pos = 0
    for m in _NON_ASCII_RUNS.finditer(raw):
        start = max(pos, m.start() - 1)
        parts.append(text[pos:start])
        parts.append(_normalize_all(text[start : m.end()]))
        pos = m.end()
    parts.append(text[pos:])
    return "".join(parts)


def _normalize_all(text: str) -> str:
    if not unicodedata.is_normalized("NFKC", text):
        text = unicodedata.normalize("NFKC", text)
    text = _OTHER_DIGITS.sub(_ascii_digit, _INVISIBLE.sub("", text))
    if len(text.encode("utf-16-le", "surrogatepass")) != 2 * len(text):  # astral characters
        text = _OTHER_DIGITS_ASTRAL.sub(_ascii_digit, _INVISIBLE_ASTRAL.sub("", text))
    return _DASHES.sub("-", text)


def _ascii_digit(m: re.Match[str]) -> str:
    return str(unicodedata.decimal(m.group()))


def pii_kinds(text: str) -> tuple[str, ...]:
    """The distinct kinds of PII in ``text`` (normalised first), in :data:`PII_KINDS` order
    (empty if none).

    Each kind any detector finds is listed, also where :func:`redact` would give the span to
    an earlier detector (a phone-shaped reading inside a card number); reading stops at the
    first match of each kind.
    """
    last = _LAST_KINDS[0]
    if last is not None and last[0] is text:
        return last[1]
    scan = _scan(normalize(text), first_only=True, normalized=True)
    found = {matches[0].kind for matches in scan if matches}
    kinds = tuple(k for k in PII_KINDS if k in found)
    if len(text) >= _REMEMBER_CHARS:
        _LAST_KINDS[0] = (text, kinds)
    return kinds


# The request path reads the prompt's personal data once for the pii signal and once more in
# the scorer (for its stakes), on the very same string: the last long answer is kept, keyed by
# the string's identity (one tuple, replaced whole, so threads never see half an entry). It
# holds that one string until the next long one.
_REMEMBER_CHARS = 4096
_LAST_KINDS: list[tuple[str, tuple[str, ...]] | None] = [None]


def redact(text: str) -> str:
    """``text``, normalised, with every detected PII span replaced by ``[KIND]`` (e.g.
    ``[EMAIL]``).

    Use it before writing prompts to logs, traces or the outcome store.
    """
    text = normalize(text)
    parts: list[str] = []
    pos = 0
    for m in _detect(text, normalized=True):
        parts.append(text[pos : m.start])
        parts.append(f"[{m.kind.upper()}]")
        pos = m.end
    parts.append(text[pos:])
    return "".join(parts)
