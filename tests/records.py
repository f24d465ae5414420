"""One builder for the outcome records the store and dashboard tests write."""

from __future__ import annotations

import time
import uuid
from typing import Any

from router.outcomes import OutcomeRecord

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
