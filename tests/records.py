"""One builder for the outcome records the store and dashboard tests write."""

from __future__ import annotations

import time
import uuid
from typing import Any

from router.outcomes import Label, OutcomeRecord, OutcomeStore

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
