"""PII detectors: checksums gate card/IBAN matches, ordinary numbers are not PII."""

from __future__ import annotations

import pytest

from router.pii import detect, iban_valid, luhn_valid, pii_kinds, redact


def test_luhn_and_iban_checksums() -> None:
    assert luhn_valid("4111111111111111")
    assert not luhn_valid("4111111111111112")
    assert iban_valid("GB82 WEST 1234 5698 7654 32")
    assert iban_valid("DE89370400440532013000")
    assert not iban_valid("GB82 WEST 1234 5698 7654 33")


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("mail me at jane.doe+x@example.co.uk please", "email"),
        ("card 4111 1111 1111 1111 exp 12/29", "card"),
        ("pay to GB82 WEST 1234 5698 7654 32 today", "iban"),
        ("my SSN is 123-45-6789", "ssn"),
        ("call +1 415-555-2671 now", "phone"),
        ("call (415) 555-2671", "phone"),
        ("NI number AB 12 34 56 C", "uk_nino"),
        ("server at 192.168.10.4 is down", "ip_address"),
    ],
)
def test_detects_each_kind(text: str, kind: str) -> None:
    assert pii_kinds(text) == (kind,)


@pytest.mark.parametrize(
    "text",
    [
        "Janet's ducks lay 16 eggs per day and she sells them for $2, making 18 a day.",
        "What is 12345 + 67890? Answer: 80235",
        "The meeting is on 2023-10-15 at 10:30.",
        "card 4111 1111 1111 1112 (fails Luhn)",
        "def f(x):\n    return x * 1000000 + 999",
        "version 1.2.3 released",
    ],
)
def test_no_false_positives_on_ordinary_text(text: str) -> None:
    assert pii_kinds(text) == ()


def test_iban_with_bad_check_digits_is_not_an_iban() -> None:
    assert "iban" not in pii_kinds("IBAN GB82 WEST 1234 5698 7654 33")


def test_redact_replaces_every_span_and_keeps_the_rest() -> None:
    text = "Jane (jane@example.com, 4111-1111-1111-1111) wrote."
    assert redact(text) == "Jane ([EMAIL], [CARD]) wrote."
    assert redact("nothing here") == "nothing here"


def test_overlapping_detectors_report_one_span() -> None:
    matches = detect("4111 1111 1111 1111")
    assert [m.kind for m in matches] == ["card"]
