"""local_only traffic never reaches a closed provider: not by fallback, not by spilling from a full
local queue, not by retries. The fake provider's log of what it received is the proof."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import live, policy_yaml, wait_for
from tests.fake_provider import FakeProvider
from tests.scripted_local import ScriptedLocal

PII = {"model": "auto", "messages": [{"role": "user", "content": "HARD: my PII is a@b.c"}]}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("on_failure", ["closed", "local"])
def test_local_only_traffic_never_reaches_a_closed_provider(
    tmp_path: Path, fake: FakeProvider, stream: bool, on_failure: str
) -> None:
    fake.reset()
    local = ScriptedLocal(queue_size=0)
    policy = policy_yaml(fake, on_failure=on_failure, queue_full="spill")
    with live(tmp_path, policy, local_backend_obj=local) as srv:
        body = {**PII, "stream": stream}
        url = srv.url + "/v1/chat/completions"
        ok = httpx.post(url, json=body, timeout=10)
        assert ok.status_code == 200 and ok.headers["x-tiergate-tier"] == "local"
        assert ok.headers["x-tiergate-rule"] == "pii-stays-local"

        local.mode = "fail"  # a failing local tier: the policy's fallback must not apply
        failed = httpx.post(url, json=body, timeout=10)
        assert failed.status_code == 502  # the local tier was tried and failed
        assert "local-only" in failed.json()["error"]["message"]

        local.mode = "hold"  # a full local queue: no spill to the closed tier
        with httpx.Client(timeout=10) as client, ThreadPoolExecutor(1) as pool:
            held = pool.submit(client.post, url, json=body)
            assert wait_for(lambda: local.gate.running == 1)
            full = httpx.post(url, json=body, timeout=10)
            assert full.status_code == 429
            local.release.set()
            assert held.result().status_code == 200

        # and a pinned closed model cannot carry personal data out either
        pinned = httpx.post(url, json={**body, "model": "gpt-4o"}, timeout=10)
        assert pinned.status_code == 200 and pinned.headers["x-tiergate-tier"] == "local"
    assert fake.received == []
