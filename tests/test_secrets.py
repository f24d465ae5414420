"""Provider and client keys never leave in logs, outcome records, spans, metrics, the dashboard
or error bodies, even when a provider echoes the key it was sent back in its error message."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from router.app import create_app
from router.auth import hash_key
from router.logs import JSONFormatter
from router.telemetry import Telemetry
from tests.conftest import KeywordScorer, LiveServer, make_settings, policy_yaml, wait_for
from tests.fake_provider import Behaviour, FakeProvider
from tests.scripted_local import ScriptedLocal

OPENAI_KEY = "sk-OPENAISECRET-0123456789abcdef"
ANTHROPIC_KEY = "sk-ant-ANTHROPICSECRET-0123456789"
CLIENT_KEY = "tg-CLIENTSECRET-0123456789abcdef"
WRONG_KEY = "tg-WRONGSECRET-0123456789abcdef"
SECRETS = (OPENAI_KEY, ANTHROPIC_KEY, CLIENT_KEY, WRONG_KEY, hash_key(CLIENT_KEY))
EASY = {"model": "auto", "messages": [{"role": "user", "content": "hello"}]}
HARD = {"model": "auto", "messages": [{"role": "user", "content": "HARD one"}]}


def test_keys_never_leak(
    tmp_path: Path,
    fake: FakeProvider,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", ANTHROPIC_KEY)
    caplog.set_level(logging.DEBUG)
    keys = tmp_path / "keys.yaml"
    entry = {
        "sha256": hash_key(CLIENT_KEY),
        "tenant": "acme",
        "permissions": ["pin_closed", "dashboard"],
    }
    keys.write_text(yaml.safe_dump({"keys": [entry]}))
    outputs: list[str] = []
    spans = InMemorySpanExporter()
    app = create_app(
        make_settings(tmp_path, policy_yaml(fake, store_prompts="full"), api_keys_file=keys),
        scorer=KeywordScorer(),
        local_backend=ScriptedLocal(queue_size=8),
        telemetry=Telemetry.build(span_exporters=[spans], metric_readers=[], batch=False),
    )
    with LiveServer(app) as srv:
        client = srv.http
        client.headers["authorization"] = f"Bearer {CLIENT_KEY}"
        fake.reset()
        sent = [client.post("/v1/chat/completions", json=b) for b in (EASY, HARD)]
        sent.append(client.post("/v1/chat/completions", json={**HARD, "stream": True}))
        fake.reset(Behaviour(mode="echo_auth"))
        sent.append(client.post("/v1/chat/completions", json=HARD))  # falls back to local
        for model in ("gpt-4o", "claude"):  # pinned: the upstream's error reaches the client
            for stream in (False, True):
                body = {**HARD, "model": model, "stream": stream}
                sent.append(client.post("/v1/chat/completions", json=body))
        wrong = {"authorization": f"Bearer {WRONG_KEY}"}
        sent.append(client.post("/v1/chat/completions", json=EASY, headers=wrong))
        sent.append(client.get("/v1/models"))
        sent.append(client.get("/readyz"))
        for path in ("/metrics", "/dashboard", "/dashboard/data"):
            sent.append(client.get(path))
        statuses = [r.status_code for r in sent]
        assert statuses[:4] == [200, 200, 200, 200]
        assert statuses[8] == 401
        assert statuses[-3:] == [200, 200, 200]
        assert "tiergate" in sent[-3].text  # the metrics really are there to scan
        # the provider really echoed the key, so the scrubbing below is tested
        assert any(OPENAI_KEY in str(r.headers) for r in fake.received)
        assert any(r.status_code >= 500 and "[redacted]" in r.text for r in sent), [
            r.text for r in sent
        ]
        store = srv.gateway.outcomes
        assert wait_for(lambda: store.count() == 8)
        store.flush()
        for response in sent:
            outputs.append(response.text)
            outputs.append(str(response.headers))
    outputs.append(caplog.text)
    finished = spans.get_finished_spans()
    assert finished
    outputs.extend(span.to_json() for span in finished)
    outputs.extend(JSONFormatter().format(record) for record in caplog.records)
    db = tmp_path / "outcomes.db"
    outputs.append(
        b"".join(p.read_bytes() for p in tmp_path.glob("outcomes.db*")).decode(errors="replace")
    )
    assert db.is_file()
    for secret in SECRETS:
        leaks = [out[:200] for out in outputs if secret in out]
        assert not leaks, f"{secret[:12]}... leaked in {leaks}"
