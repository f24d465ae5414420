"""One builder for the outcome records the store and dashboard tests write."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from router.outcomes import Erased, Label, OutcomeRecord, OutcomeStore, erased_name

_MODELS = {"local": "local", "closed": "gpt-4o"}


def outcome(request_id: str | None = None, **fields: Any) -> OutcomeRecord:
    """A served request's record, ``ok`` and made now unless ``fields`` say otherwise."""
    tier = fields.pop("tier", "local")
    values: dict[str, Any] = {
        "id": request_id or f"req_{uuid.uuid4().hex}",
        "ts": time.time(),
        "tenant": "default",
        "alias": "auto",
        "tier": tier,
        "model": _MODELS.get(tier or ""),
        "rule": "default",
        "score": 0.25,
        "threshold": 0.5,
        "policy_version": "p1",
        "model_version": "m1",
        "status": "ok",
        "http_status": 200,
        "stream": False,
        "latency_ms": 10.0,
        "signals": {"turns": 1},
        "prompt": "hello",
    }
    values.update(fields)
    return OutcomeRecord(**values)


def three_people(store: OutcomeStore) -> tuple[OutcomeRecord, OutcomeRecord, OutcomeRecord]:
    """Alice's and Carol's requests as tenant acme, Bob's as globex, each with a feedback label
    whose comment repeats the prompt (a comment is the user's own words), written to ``store``."""
    people = (
        outcome(tenant="acme", prompt="Alice Smith asks about her lease"),
        outcome(tenant="acme", prompt="Carol Jones asks about her tax"),
        outcome(tenant="globex", prompt="Bob Brown asks about his car"),
    )
    for record in people:
        store.submit(record)
        comment = f"{record.prompt} (comment)"
        store.label(Label(record.id, record.tenant, "feedback", 1.0, time.time(), comment=comment))
    assert store.flush(10)
    return people


def write_late(store: OutcomeStore, erase: Callable[..., Erased]) -> None:
    """Erase tenant acme and then a request through ``erase`` (what `tiergate outcomes delete`
    opens, beside the running ``store``), each followed by what a running Tiergate writes for
    them later: a record of a request in flight, labels from shadow judgements, escalations
    and feedback. Only what is not theirs is written, and of acme's prompts only Erin's, made
    after its erasure, until that request is erased too. What the shadow judgements of erased
    requests cost, erased or refused, stays counted as acme's judging spend, and what the
    requests cost as its request spend."""
    alice, carol, bob = three_people(store)
    store.label(Label(carol.id, "acme", "shadow", 0.0, time.time(), cost_usd=0.25))
    assert store.flush(10)
    in_flight = outcome(
        tenant="acme",
        ts=time.time() - 1,
        prompt="Dana White asks for a loan",
        cost_usd=0.125,
        counterfactual_cost_usd=0.375,
    )
    assert erase(tenant="acme")[:2] == (2, 3)
    assert abs(store.erased_judging_usd(0.0, "acme") - 0.25) < 1e-9
    store.submit(in_flight)  # began before the erasure, recorded after it
    store.label(Label(alice.id, "acme", "shadow", 1.0, time.time(), cost_usd=0.5))
    store.label(Label(in_flight.id, "acme", "escalation", 1.0, time.time()))
    store.label(Label(bob.id, "globex", "shadow", 0.0, time.time()))
    later = outcome(  # begun 0.25 s after the erasure: acme's requests then are its own
        tenant="acme",
        ts=time.time() + 0.5,
        latency_ms=250.0,
        prompt="Erin Black asks about her pension",
    )
    store.submit(later)
    store.label(Label(later.id, "acme", "feedback", 1.0, time.time(), comment="thanks, Erin"))
    assert store.flush(10)
    for gone in (alice, carol, in_flight):
        assert store.labels_of(gone.id) == []
        assert store.get(gone.id) is None
    assert store.count("acme") == 1 and store.count("globex") == 1
    assert [lb["source"] for lb in store.labels_of(bob.id)] == ["feedback", "shadow"]
    assert [lb["comment"] for lb in store.labels_of(later.id)] == ["thanks, Erin"]
    assert store.health()["refused_erased"] == 3
    assert erase([later.id])[:2] == (1, 1)
    store.label(Label(later.id, "acme", "shadow", 1.0, time.time()))  # a judgement ending late
    assert store.flush(10)
    assert store.get(later.id) is None and store.labels_of(later.id) == []
    assert store.health()["refused_erased"] == 4
    assert store.spend_today("acme") >= 0.5  # the late judgement was paid for all the same
    assert abs(store.erased_judging_usd(0.0, "acme") - 0.75) < 1e-9  # and so was carol's
    assert abs(store.erased_judging_usd(0.0) - 0.75) < 1e-9
    assert store.erased_judging_usd(0.0, "globex") == 0.0
    assert store.erased_judging_usd(time.time() + 60) == 0.0
    kept = store.erased_spend_buckets(0.0, "acme")  # the refused record of the request in flight
    assert abs(sum(k.requests_usd for k in kept) - 0.125) < 1e-9
    assert abs(sum(k.counterfactual_usd for k in kept) - 0.375) < 1e-9
    assert store.erased_spend_buckets(0.0, "globex") == []
    assert abs(store.spend_today("acme") - (0.25 + 0.5 + 0.125)) < 1e-9


def answer_across_an_erasure(
    store: OutcomeStore, erase: Callable[..., Erased], held: Callable[[], str]
) -> None:
    """Erase tenant acme through ``erase`` (what `tiergate outcomes delete` opens, beside the
    running ``store``) while one of its requests is still being answered (a 30 s stream); its
    record is made when it ends, after the erasure. That record and its label are refused and
    nothing ``held`` (all the store keeps, as text) names acme or the prompt, though its cost
    still counts in acme's spend. A request acme makes after the erasure is its own again."""
    store.submit(outcome(tenant="acme", prompt="Alice Smith asks about her lease"))
    assert store.flush(10)
    assert erase(tenant="acme")[:2] == (1, 0)
    erased_by = time.time()
    streamed = outcome(
        tenant="acme",
        ts=erased_by,  # it ends now, 30 s after it began
        latency_ms=30_000.0,
        prompt="Dana White asks for a loan",
        cost_usd=0.125,
        counterfactual_cost_usd=0.375,
    )
    store.submit(streamed)
    store.label(Label(streamed.id, "acme", "feedback", 0.0, erased_by, comment="no, Dana"))
    assert store.flush(10)
    # (not a test module: pytest rewrites no assertion here, so each says what it found)
    assert store.get(streamed.id) is None, store.get(streamed.id)
    assert store.labels_of(streamed.id) == [], store.labels_of(streamed.id)
    assert "acme" not in held() and "Dana" not in held(), held()
    assert store.health()["refused_erased"] == 2
    assert abs(store.spend_today("acme") - 0.125) < 1e-9  # paid for all the same
    later = outcome(
        tenant="acme",
        ts=erased_by + 0.5,  # began 0.25 s after the erasure
        latency_ms=250.0,
        prompt="Erin Black asks about her pension",
        cost_usd=0.5,
    )
    store.submit(later)
    store.label(Label(later.id, "acme", "feedback", 1.0, later.ts, comment="thanks, Erin"))
    assert store.flush(10)
    assert store.get(later.id) is not None and store.count("acme") == 1
    assert [lb["comment"] for lb in store.labels_of(later.id)] == ["thanks, Erin"]
    assert "Erin Black" in held() and store.health()["refused_erased"] == 2
    assert abs(store.spend_today("acme") - 0.625) < 1e-9


def label_across_an_erasure(store: OutcomeStore, tombstone: Callable[[str, float], None]) -> None:
    """Two stored records of acme's, one of a request begun 30 s ago, one 0.25 s ago; then
    ``tombstone(name, ts)`` leaves acme's as an erasure 10 s ago would, one that ran while the
    first was being answered and left its record (a release that dated a request by its end).
    A label for the first request is refused, one for the second is written."""
    streamed = outcome(tenant="acme", latency_ms=30_000.0)
    later = outcome(tenant="acme", latency_ms=250.0)
    store.submit(streamed)
    store.submit(later)
    assert store.flush(10)
    tombstone(erased_name("tenant", "acme"), time.time() - 10)
    store.label(Label(streamed.id, "acme", "feedback", 1.0, time.time(), comment="Dana"))
    store.label(Label(later.id, "acme", "feedback", 1.0, time.time(), comment="Erin"))
    assert store.flush(10)
    assert store.labels_of(streamed.id) == [], store.labels_of(streamed.id)
    assert [lb["comment"] for lb in store.labels_of(later.id)] == ["Erin"]
    assert store.health()["refused_erased"] == 1
