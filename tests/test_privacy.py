"""local_only traffic never reaches a closed provider: not by fallback, not by spilling from a full
local queue, not by retries; personal data anywhere in a request makes it local_only (generated:
hypothesis places it in every part of a request); ``metadata`` steers the policy only with
permission and is stored redacted and capped. The fake provider's log of what it received is the
proof. ``PRIVACY_EXAMPLES`` sets the generated examples per placement and local-tier state
(default 4)."""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.auth import hash_key
from router.scoring import Analysis
from tests.conftest import LiveServer, live, policy_yaml, wait_for
from tests.fake_provider import Behaviour, FakeProvider
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
        url = "/v1/chat/completions"
        ok = srv.http.post(url, json=body)
        assert ok.status_code == 200 and ok.headers["x-tiergate-tier"] == "local"
        assert ok.headers["x-tiergate-rule"] == "pii-stays-local"

        local.mode = "fail"  # a failing local tier: the policy's fallback must not apply
        failed = srv.http.post(url, json=body)
        assert failed.status_code == 502  # the local tier was tried and failed
        assert "local-only" in failed.json()["error"]["message"]

        local.mode = "hold"  # a full local queue: no spill to the closed tier
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(srv.http.post, url, json=body)
            assert wait_for(lambda: local.gate.running == 1)
            full = srv.http.post(url, json=body)
            assert full.status_code == 429
            local.release.set()
            assert held.result().status_code == 200

        # and a pinned closed model cannot carry personal data out either
        pinned = srv.http.post(url, json={**body, "model": "gpt-4o"})
        assert pinned.status_code == 200 and pinned.headers["x-tiergate-tier"] == "local"
    assert fake.received == []


def test_a_personal_data_rule_without_local_only_lets_it_out_and_is_warned_of(
    tmp_path: Path, fake: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    """What the policy warning is about: `{when: {pii: true}, route: local}` without
    `local_only` keeps personal data local only while the local model serves it. A failing
    local model, a full local queue, an image and a request that names a closed model each
    carry the prompt to the closed provider, which `local_only: true` prevents (the test
    above); the start log says so."""
    fake.reset()
    local = ScriptedLocal(queue_size=0)
    policy = policy_yaml(fake, on_failure="closed", queue_full="spill")
    policy = policy.replace("    local_only: true\n", "", 1)
    url, secret = "/v1/chat/completions", "Write to jane.doe@example.com"
    body = {"model": "auto", "messages": [{"role": "user", "content": secret}]}
    caplog.set_level("WARNING", logger="tiergate.app")
    with live(tmp_path, policy, local_backend_obj=local) as srv:
        served = srv.http.post(url, json=body)
        assert served.headers["x-tiergate-rule"] == "pii-stays-local"
        assert served.headers["x-tiergate-tier"] == "local" and fake.received == []

        local.mode = "fail"
        failed = srv.http.post(url, json=body)
        assert failed.headers["x-tiergate-fallback"] == "local->closed"

        local.mode = "hold"
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(srv.http.post, url, json=body)
            assert wait_for(lambda: local.gate.running == 1)
            full = srv.http.post(url, json=body)
            assert full.headers["x-tiergate-fallback"] == "local-full->closed"
            local.release.set()
            assert held.result().headers["x-tiergate-tier"] == "local"

        local.mode = "ok"
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
        content = [{"type": "text", "text": secret}, image]
        pictured = srv.http.post(
            url, json={**body, "messages": [{"role": "user", "content": content}]}
        )
        assert pictured.headers["x-tiergate-rule"] == "constraint"
        pinned = srv.http.post(url, json={**body, "model": "gpt-4o"})
        assert pinned.headers["x-tiergate-rule"] == "pinned"
    assert [r.status_code for r in (failed, full, pictured, pinned)] == [200] * 4
    assert [secret in json.dumps(r.body) for r in fake.received] == [True] * 4
    warned = [r.getMessage() for r in caplog.records if "is not local_only" in r.getMessage()]
    assert len(warned) == 1 and "add `local_only: true` to the rule" in warned[0]
    assert "when the request names a closed model" in warned[0]


@pytest.mark.parametrize("route", ["cascade", "auto"])
def test_personal_data_routed_to_a_cascade_or_the_score_goes_out_and_is_warned_of(
    tmp_path: Path, fake: FakeProvider, caplog: pytest.LogCaptureFixture, route: str
) -> None:
    """A rule that sends personal data to a cascade or to the score keeps it local only while
    the local answer satisfies the cascade or the score stays under the threshold, and a
    request that names a closed model skips it, however strict on_failure and queue_full are:
    the fake provider receives the e-mail address. The start log says so, and the fix."""
    from tests.test_cascade_gateway import CASCADE_POLICY, DOUBTFUL, _confidence_model

    fake.reset()
    local = ScriptedLocal()
    local.logprob = DOUBTFUL  # a cascade escalates the local answer
    policy = policy_yaml(fake, on_failure="error", queue_full="reject", extra=CASCADE_POLICY)
    policy = policy.replace("route: local\n    local_only: true\n", f"route: {route}\n", 1)
    url, secret = "/v1/chat/completions", "HARD: write to jane.doe@example.com"
    body = {"model": "auto", "messages": [{"role": "user", "content": secret}]}
    caplog.set_level("WARNING", logger="tiergate.app")
    with live(
        tmp_path,
        policy,
        local_backend_obj=local,
        cascade_model_path=_confidence_model(tmp_path),
    ) as srv:
        routed = srv.http.post(url, json=body)
        assert routed.headers["x-tiergate-rule"] == "pii-stays-local"
        assert routed.headers.get("x-tiergate-cascade") == (
            "escalated" if route == "cascade" else None
        )
        pinned = srv.http.post(url, json={**body, "model": "gpt-4o"})
        assert pinned.headers["x-tiergate-rule"] == "pinned"
    assert [r.status_code for r in (routed, pinned)] == [200, 200]
    assert [r.headers["x-tiergate-tier"] for r in (routed, pinned)] == ["closed", "closed"]
    assert [secret in json.dumps(r.body) for r in fake.received] == [True, True]
    warned = [r.getMessage() for r in caplog.records if "personal data" in r.getMessage()]
    assert len(warned) == 1 and "route the rule `local` with `local_only: true`" in warned[0]


# --- personal data anywhere in the request stays local (generated) --------------------------------

EXAMPLES = int(os.environ.get("PRIVACY_EXAMPLES", "4"))
GENERATED = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
CLEAN = "nothing to see here"
PERSONAL = [
    "jane.doe@example.com",
    "jane\uff20example.com",
    "SSN 123-45-6789",
    "my ssn is 123456789",
    "SSN: 123 45 6789",
    "card 4111 1111 1111 1111",
    "card 4111\u200b1111\u200b1111\u200b1111",
    "call +1 415-555-2671",
    "IBAN GB82 WEST 1234 5698 7654 32",
    "NI AB 12 34 56 C",
    "手机13912345678",
    "身份证11010519491231002X",
    "Aadhaar 2341 2341 2346",
]


class BlindScorer:
    """Scores every prompt 0.9 (closed) and never reports personal data itself: only the
    request-wide scan can keep a request local."""

    name = "blind"
    version = "blind-1"

    def analyze(self, text: str, *, has_tools: bool = False) -> Analysis:
        """Always closed, never PII."""
        return Analysis(score=0.9, capability="chat", stakes="low")


def _tool_call(value: str) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "lookup", "arguments": json.dumps({"q": value})},
            }
        ],
    }


def _tool(description: str = "look up", enum: str = "a") -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": description,
            "parameters": {"type": "object", "properties": {"q": {"enum": [enum]}}},
        },
    }


def _before_last(body: dict[str, Any], *messages: dict[str, Any]) -> None:
    body["messages"][-1:-1] = messages


# Each placement puts a value where the request carries it upstream.
PLACEMENTS: dict[str, Callable[[dict[str, Any], str], None]] = {
    "system": lambda b, v: b["messages"].insert(0, {"role": "system", "content": v}),
    "developer": lambda b, v: b["messages"].insert(0, {"role": "developer", "content": v}),
    "earlier user turn": lambda b, v: b["messages"].insert(0, {"role": "user", "content": v}),
    "assistant turn": lambda b, v: b["messages"].insert(0, {"role": "assistant", "content": v}),
    "text part": lambda b, v: b["messages"][-1].update(
        content=[{"type": "text", "text": "Summarise."}, {"type": "text", "text": v}]
    ),
    "input_text part": lambda b, v: b["messages"][-1].update(
        content=[{"type": "text", "text": "Summarise."}, {"type": "input_text", "text": v}]
    ),
    "system text part": lambda b, v: b["messages"].insert(
        0, {"role": "system", "content": [{"type": "text", "text": v}]}
    ),
    "tool result": lambda b, v: _before_last(
        b, _tool_call("x"), {"role": "tool", "tool_call_id": "call_1", "content": v}
    ),
    "tool call arguments": lambda b, v: _before_last(
        b, _tool_call(v), {"role": "tool", "tool_call_id": "call_1", "content": "ok"}
    ),
    "message name": lambda b, v: b["messages"][-1].update(name=v),
    "user": lambda b, v: b.update(user=v),
    "stop": lambda b, v: b.update(stop=["END", v]),
    "tool description": lambda b, v: b.update(tools=[_tool(description=v)]),
    "tool parameters": lambda b, v: b.update(tools=[_tool(enum=v)]),
    "response_format": lambda b, v: b.update(
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "r", "schema": {"type": "object", "description": v}},
        }
    ),
    "image url": lambda b, v: b["messages"][-1].update(
        content=[
            {"type": "text", "text": "Describe."},
            {"type": "image_url", "image_url": {"url": f"https://img.test/a.png?q={v}"}},
        ]
    ),
    "metadata": lambda b, v: b.update(metadata={"note": v}),
    "an object key": lambda b, v: b.update(x_context={v: "noted"}),
    "unknown field": lambda b, v: b.update(x_context={"notes": [v]}),
    "unknown message field": lambda b, v: b["messages"][-1].update(x_note=v),
}


# The closed tier strips ``metadata``; it is read for personal data all the same.
NOT_SENT = {"metadata"}


@st.composite
def placed(draw: st.DrawFn, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(clean body, the same body with personal data in ``where``)."""
    personal = draw(st.sampled_from(PERSONAL))
    words = st.text(alphabet="abcdefgh ,.", max_size=12)
    secret = f"{draw(words)} {personal} {draw(words)}"
    turns = draw(st.integers(0, 2))
    stream = draw(st.booleans())

    def body(value: str) -> dict[str, Any]:
        messages: list[dict[str, Any]] = []
        for i in range(turns):
            messages += [
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": f"answer {i}"},
            ]
        b: dict[str, Any] = {
            "model": "auto",
            "stream": stream,
            "messages": [*messages, {"role": "user", "content": "Summarise."}],
        }
        PLACEMENTS[where](b, value)
        return b

    return body(CLEAN), body(secret)


@pytest.fixture(scope="module")
def blind_server(
    tmp_path_factory: pytest.TempPathFactory, fake: FakeProvider
) -> Iterator[tuple[LiveServer, ScriptedLocal]]:
    """A Tiergate whose scorer sends everything closed and sees no personal data."""
    local = ScriptedLocal(queue_size=8)
    with live(
        tmp_path_factory.mktemp("privacy"),
        policy_yaml(fake, on_failure="closed"),
        scorer=BlindScorer(),
        local_backend_obj=local,
    ) as srv:
        yield srv, local


def _sent_out(fake: FakeProvider) -> str:
    return json.dumps([r.body for r in fake.received], ensure_ascii=False)


@pytest.mark.parametrize("local_mode", ["ok", "fail"])
@pytest.mark.parametrize("where", sorted(PLACEMENTS))
def test_personal_data_anywhere_never_reaches_the_closed_provider(
    blind_server: tuple[LiveServer, ScriptedLocal], fake: FakeProvider, where: str, local_mode: str
) -> None:
    srv, local = blind_server
    url = "/v1/chat/completions"

    @GENERATED
    @given(case=placed(where))
    def check(case: tuple[dict[str, Any], dict[str, Any]]) -> None:
        clean, secret = case
        fake.reset()
        local.mode = "ok"
        # The same request without personal data goes closed, the placement included: the
        # placement is sent upstream, so the check below is not vacuous.
        control = srv.http.post(url, json=clean)
        assert control.status_code == 200, (where, control.text)
        assert control.headers["x-tiergate-tier"] == "closed", where
        if where not in NOT_SENT:
            assert CLEAN in _sent_out(fake), f"{where} is not sent upstream"
        fake.reset()
        local.mode = local_mode
        response = srv.http.post(url, json=secret)
        assert response.headers.get("x-tiergate-tier") != "closed", where
        assert fake.received == [], where
        if local_mode == "fail":  # the local tier down: an error, never the closed tier
            assert response.status_code >= 400, where

    check()


@pytest.mark.parametrize(
    "personal",
    [
        "我的手机是13912345678",
        "+86 13912345678",
        "身份证号11010519491231002X",
        "Aadhaar 234123412346",
    ],
)
def test_chinese_mobiles_and_national_ids_stay_local(
    blind_server: tuple[LiveServer, ScriptedLocal], fake: FakeProvider, personal: str
) -> None:
    srv, local = blind_server
    fake.reset()
    local.mode = "ok"
    body = {"model": "auto", "messages": [{"role": "user", "content": f"Summarise: {personal}"}]}
    response = srv.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["x-tiergate-tier"] == "local"
    assert response.headers["x-tiergate-rule"] == "pii-stays-local"
    assert fake.received == []


#: A PNG's first bytes in base64, then characters that read as a card number (Luhn-valid).
CARD_IN_BASE64 = "iVBORw0KGgoAAAANSUhEUgAA4111111111111111AAAA"


def test_a_file_is_read_as_the_model_reads_it_on_v1_messages(
    blind_server: tuple[LiveServer, ScriptedLocal], fake: FakeProvider
) -> None:
    """An image's base64 is bytes, not text: one whose alphabet happens to spell a card
    number kept a /v1/messages request local (and refused it there: the local model takes no
    image). A plain-text document sent as base64 is text the model reads: its personal data
    went out unread."""
    srv, local = blind_server
    fake.reset()
    local.mode = "ok"

    def ask(block: dict[str, Any]) -> Any:
        content = [block, {"type": "text", "text": "Describe this."}]
        body = {
            "model": "auto",
            "max_tokens": 32,
            "messages": [{"role": "user", "content": content}],
        }
        return srv.http.post("/v1/messages", json=body)

    source = {"type": "base64", "media_type": "image/png", "data": CARD_IN_BASE64}
    image = ask({"type": "image", "source": source})
    assert image.status_code == 200, image.text
    assert image.headers["x-tiergate-tier"] == "closed"
    assert CARD_IN_BASE64 in _sent_out(fake)

    fake.reset()
    text = base64.b64encode(b"Customer SSN 078-05-1120").decode()
    source = {"type": "base64", "media_type": "text/plain", "data": text}
    document = ask({"type": "document", "source": source})
    assert document.headers.get("x-tiergate-tier") != "closed", document.text
    assert fake.received == []


# --- metadata: gated like x-tiergate-* headers, stored redacted and capped ----------------------

METADATA_RULE = """\
rules:
  - name: legal-goes-local
    priority: 50
    when: {metadata.team: legal}
    route: local
"""


def metadata_policy(fake: FakeProvider, **top: Any) -> str:
    """The test policy with one more rule, which reads ``metadata.team``."""
    return policy_yaml(fake, **top).replace("rules:\n", METADATA_RULE, 1)


PLAIN, ALLOWED, TRUSTED = "tg-plain-key", "tg-metadata-key", "tg-trusted-key"


@pytest.fixture(scope="module")
def keyed_server(
    tmp_path_factory: pytest.TempPathFactory, fake: FakeProvider
) -> Iterator[LiveServer]:
    """Three keys: no permission, ``policy_metadata: [team]``, ``set_policy_headers``."""
    tmp = tmp_path_factory.mktemp("metadata")
    keys = tmp / "keys.yaml"
    keys.write_text(
        yaml.safe_dump(
            {
                "keys": [
                    {"sha256": hash_key(PLAIN), "tenant": "acme"},
                    {"sha256": hash_key(ALLOWED), "tenant": "acme", "policy_metadata": ["team"]},
                    {
                        "sha256": hash_key(TRUSTED),
                        "tenant": "acme",
                        "permissions": ["set_policy_headers"],
                    },
                ]
            }
        )
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENAI_API_KEY", "sk-test-openai-key")
        with live(
            tmp,
            metadata_policy(fake, store_prompts="redacted"),
            scorer=BlindScorer(),
            local_backend_obj=ScriptedLocal(queue_size=8),
            api_keys_file=keys,
        ) as srv:
            yield srv


def _route(srv: LiveServer, key: str, metadata: dict[str, Any]) -> dict[str, Any]:
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "metadata": metadata}
    response = srv.http.post("/v1/route", json=body, headers={"authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_metadata_steers_the_policy_only_with_permission(keyed_server: LiveServer) -> None:
    plain = _route(keyed_server, PLAIN, {"team": "legal"})
    assert plain["decision"]["rule"] != "legal-goes-local"
    assert plain["signals"]["metadata"] == {}
    for key in (ALLOWED, TRUSTED):
        allowed = _route(keyed_server, key, {"team": "legal"})
        assert allowed["decision"]["rule"] == "legal-goes-local", key


def test_anonymous_callers_keep_steering_with_metadata(tmp_path: Path, fake: FakeProvider) -> None:
    with live(
        tmp_path,
        metadata_policy(fake),
        scorer=BlindScorer(),
        local_backend_obj=ScriptedLocal(),
    ) as srv:
        body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
        body["metadata"] = {"team": "legal"}
        decided = srv.http.post("/v1/route", json=body).json()
        assert decided["decision"]["rule"] == "legal-goes-local"


def test_metadata_is_stored_redacted_capped_and_only_where_the_policy_reads_it(
    keyed_server: LiveServer, fake: FakeProvider
) -> None:
    fake.reset()
    metadata = {
        "team": "sales, ask jane@example.com " + "x" * 100_000,
        "ssn": "123-45-6789",
        "blob": "y" * 1_000_000,
    }
    body = {
        "model": "auto",
        "messages": [{"role": "user", "content": "hi"}],
        "metadata": metadata,
    }
    response = keyed_server.http.post(
        "/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {TRUSTED}"},
    )
    assert response.status_code == 200
    store = keyed_server.gateway.outcomes
    assert store.flush()
    record = store.get(response.headers["x-request-id"])
    assert record is not None
    stored = record["signals"]["metadata"]
    assert set(stored) == {"team"}
    assert stored["team"].startswith("sales, ask [EMAIL] xxx")
    assert "jane" not in json.dumps(record) and "123-45-6789" not in json.dumps(record)
    assert len(json.dumps(stored)) < 1000


def test_personal_data_only_json_escapes_show_is_redacted_where_stored(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """A prompt or metadata value written by ``json.dumps`` (Python's default escapes every
    character beyond ASCII) spaces a French phone number with ``\\u00a0`` and may split a card
    number with ``\\u200b``. The pii signal reads such text with its escapes decoded and keeps
    the request local; the prompt stored ``redacted`` (as policies/default.yaml stores it) and
    the metadata value kept both numbers whole."""
    fake.reset()
    phone = "\u00a0".join(["+33", "6", "12", "34", "56", "78"])
    person = {"phone": phone, "card": "\u200b".join(["4111", "1111", "1111", "1111"])}
    escaped = json.dumps(person)
    assert "\\u00a0" in escaped and "\\u200b" in escaped
    body = {
        "model": "auto",
        "messages": [{"role": "user", "content": "Update this customer: " + escaped}],
        "metadata": {"team": escaped},
    }
    policy = metadata_policy(fake).replace(
        "    local_only: true\n", "    local_only: true\n    store_prompts: redacted\n"
    )
    with live(tmp_path, policy, scorer=BlindScorer(), local_backend_obj=ScriptedLocal()) as srv:
        response = srv.http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200
        assert response.headers["x-tiergate-rule"] == "pii-stays-local"
        record = _recorded(srv, response)
    assert record["prompt"].startswith("Update this customer: ")
    stored = json.dumps(record)
    for digits in ("12\\\\u00a034", "12 34", "4111\\\\u200b1111", "11111111"):
        assert digits not in stored, digits
    assert "[PHONE]" in record["prompt"] and "[CARD]" in record["prompt"]
    assert "[PHONE]" in record["signals"]["metadata"]["team"]
    assert fake.received == []


TENANT_RULE = """\
tenants:
  acme:
    rules:
      - name: acme-legal
        when: {metadata.team: legal}
        route: gpt-4o
"""


def test_a_tenant_rule_cannot_send_personal_data_out(tmp_path: Path, fake: FakeProvider) -> None:
    # Tenant rules run before the global ones, and used to run before the global local_only
    # rule too: acme's legal team (policies/examples/cost-capped.yaml) sent personal data to
    # gpt-4o.
    fake.reset()
    keys = tmp_path / "keys.yaml"
    entry = {"sha256": hash_key(ALLOWED), "tenant": "acme", "policy_metadata": ["team"]}
    keys.write_text(yaml.safe_dump({"keys": [entry]}))
    with live(
        tmp_path,
        policy_yaml(fake, on_failure="closed", extra=TENANT_RULE),
        scorer=BlindScorer(),
        local_backend_obj=ScriptedLocal(),
        api_keys_file=keys,
    ) as srv:
        auth = {"authorization": f"Bearer {ALLOWED}"}
        for stream in (False, True):
            body = {
                "model": "auto",
                "stream": stream,
                "messages": [{"role": "user", "content": "Summarise."}],
                "metadata": {"team": "legal"},
            }
            clean = srv.http.post("/v1/chat/completions", json=body, headers=auth)
            assert clean.headers["x-tiergate-rule"] == "acme-legal"
            assert clean.headers["x-tiergate-tier"] == "closed"
            fake.reset()
            body["messages"][0]["content"] = "Summarise. I am jane.doe@example.com"
            secret = srv.http.post("/v1/chat/completions", json=body, headers=auth)
            assert secret.status_code == 200, secret.text
            assert secret.headers["x-tiergate-rule"] == "pii-stays-local"
            assert secret.headers["x-tiergate-tier"] == "local"
            assert fake.received == []


#: The two ways any key may mark its request private under privacy-first.yaml.
MARKERS = pytest.mark.parametrize(
    "marker",
    [
        {"headers": {"x-tiergate-private": "true"}},
        {"json": {"metadata": {"data_class": "confidential"}}},
    ],
    ids=["header", "metadata"],
)


def _privacy_first(tmp_path: Path, fake: FakeProvider, extra: str = "") -> tuple[str, Path]:
    """policies/examples/privacy-first.yaml on the fake provider (plus ``extra``), and a keys
    file with one plain key of tenant acme."""
    policy = Path("policies/examples/privacy-first.yaml").read_text() + extra
    policy = policy.replace(
        "litellm_model: openai/gpt-4o",
        f"litellm_model: openai/gpt-4o\n    api_base: {fake.base_url}",
    )
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"sha256": hash_key(PLAIN), "tenant": "acme"}]}))
    return policy, keys


@MARKERS
def test_any_key_may_mark_its_request_private(
    tmp_path: Path, fake: FakeProvider, marker: dict[str, dict[str, Any]]
) -> None:
    # SECURITY.md: put data the detectors miss behind an x-tiergate-private header or
    # metadata.data_class. A key without set_policy_headers (or the field in its allow-lists)
    # had its marker ignored, silently: policies/examples/privacy-first.yaml sent it closed.
    fake.reset()
    policy, keys = _privacy_first(tmp_path, fake)
    body = {"model": "auto", "messages": [{"role": "user", "content": "HARD: the merger plan"}]}
    auth = {"authorization": f"Bearer {PLAIN}"}
    with live(tmp_path, policy, local_backend_obj=ScriptedLocal(), api_keys_file=keys) as srv:
        url = "/v1/chat/completions"
        control = srv.http.post(url, json=body, headers=auth)
        assert control.headers["x-tiergate-tier"] == "closed"
        fake.reset()
        headers = {**auth, **marker.get("headers", {})}
        marked = srv.http.post(url, json={**body, **marker.get("json", {})}, headers=headers)
        assert marked.status_code == 200, marked.text
        assert marked.headers["x-tiergate-rule"] == "private-stays-local"
        assert marked.headers["x-tiergate-tier"] == "local"
        assert fake.received == []
        # The marker does not give the key a say otherwise: what it may not set is not stored.
        store = srv.gateway.outcomes
        assert store.flush()
        record = store.get(marked.headers["x-request-id"])
        assert record is not None and record["signals"]["metadata"] == {}


@MARKERS
def test_a_request_marked_private_stays_private_past_the_budget(
    tmp_path: Path, fake: FakeProvider, marker: dict[str, dict[str, Any]]
) -> None:
    # Past acme's budget, a plain key's marker was not read: the budget had made the request
    # local_only already, so the rule it asked for (store_prompts: none) never decided it and
    # its prompt was stored under rule budget:acme.
    fake.reset()
    policy, keys = _privacy_first(tmp_path, fake, "tenants:\n  acme: {daily_budget_usd: 0.00001}\n")
    auth = {"authorization": f"Bearer {PLAIN}"}
    url = "/v1/chat/completions"
    with live(tmp_path, policy, local_backend_obj=ScriptedLocal(), api_keys_file=keys) as srv:
        hard = {"model": "auto", "messages": [{"role": "user", "content": "HARD: spend it"}]}
        assert srv.http.post(url, json=hard, headers=auth).headers["x-tiergate-tier"] == "closed"
        store = srv.gateway.outcomes
        assert wait_for(lambda: store.count() == 1) and store.flush()
        assert store.spend_today("acme") > 0.00001
        headers = {**auth, **marker.get("headers", {})}
        for text in ("HARD: the merger plan", "the merger plan"):
            body = {"model": "auto", "messages": [{"role": "user", "content": text}]}
            marked = srv.http.post(url, json={**body, **marker.get("json", {})}, headers=headers)
            assert marked.status_code == 200, marked.text
            assert marked.headers["x-tiergate-rule"] == "private-stays-local", text
            assert marked.headers["x-tiergate-tier"] == "local"
            assert store.flush()
            record = store.get(marked.headers["x-request-id"])
            assert record is not None and record["prompt"] is None, text
    assert len(fake.received) == 1


def _recorded(srv: LiveServer, response: httpx.Response) -> dict[str, Any]:
    """The outcome record of the request ``response`` answered."""
    store = srv.gateway.outcomes
    assert store.flush()
    record = store.get(response.headers["x-request-id"])
    assert record is not None
    return dict(record)


def _logged(caplog: pytest.LogCaptureFixture) -> str:
    """Every captured log line as a JSON log line holds it: its message and its fields."""
    return "\n".join(
        record.getMessage() + json.dumps(vars(record), default=str) for record in caplog.records
    )


@pytest.mark.parametrize("padding", ["", "x" * 177 + " "], ids=["short", "at-the-cut"])
def test_a_refused_model_name_is_stored_and_logged_redacted(
    tmp_path: Path, fake: FakeProvider, caplog: pytest.LogCaptureFixture, padding: str
) -> None:
    # The record of a request refused before routing names the model as the client asked for
    # it, and that name went whole into the store, the request log line and the dashboard.
    # Cut to 200 characters before it was redacted, an address across the cut was stored in
    # part ("jane.doe@exam"), which no detector reads as one.
    caplog.set_level(logging.INFO)
    fake.reset()
    body = {
        "model": f"auto for {padding}jane.doe@example.com",
        "messages": [{"role": "user", "content": "hi"}],
    }
    with live(tmp_path, policy_yaml(fake)) as srv:
        response = srv.http.post("/v1/chat/completions", json=body)
        assert response.status_code == 404
        record = _recorded(srv, response)
    assert record["alias"] == f"auto for {padding}[EMAIL]"
    assert "jane.doe" not in json.dumps(record)
    assert "jane.doe" not in _logged(caplog)
    assert fake.received == []


def test_a_local_server_echoing_personal_data_in_its_error_is_logged_redacted(
    tmp_path: Path, fake: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    # An external llama.cpp server (or any provider) may repeat the prompt in its error, as
    # a FastAPI server's validation error repeats its input: the log line of the failed call
    # held the personal data the local_only rule kept local.
    caplog.set_level(logging.INFO)
    echo = {"error": {"message": "invalid input: my email is jane.doe@example.com"}}
    fake.reset(Behaviour(mode="status", status=400, error_body=echo))
    body = {
        "model": "auto",
        "messages": [{"role": "user", "content": "my email is jane.doe@example.com"}],
    }
    policy = policy_yaml(fake, store_prompts="redacted")
    with live(tmp_path, policy, local_backend="openai_http", local_base_url=fake.base_url) as srv:
        response = srv.http.post("/v1/chat/completions", json=body)
        assert response.status_code == 400
        assert response.headers["x-tiergate-rule"] == "pii-stays-local"
        record = _recorded(srv, response)
    assert "jane.doe" not in json.dumps(record)
    logged = _logged(caplog)
    assert "jane.doe" not in logged
    assert "local failed for" in logged and "[EMAIL]" in logged
    assert [r.path for r in fake.received] == ["/v1/chat/completions"]  # the local server
