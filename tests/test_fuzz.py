"""Fuzzing: generated bodies, headers and paths must never get a 5xx, and every 4xx must be an
OpenAI-shaped error (Anthropic-shaped on ``/v1/messages``).

Two generators, against a Tiergate with a scripted local tier and a fake closed provider, so no
real generation happens (over a loopback socket for schemathesis and raw requests, in process
for chat bodies):

* schemathesis, from the app's own OpenAPI schema (positive and negative cases per operation);
* hypothesis, for what a schema does not describe: raw bytes, random paths and methods, random
  headers (auth, ``x-tiergate-*``, content types); chat bodies with lone surrogates, JSON nested
  past the parser's recursion limit, numbers sent as floats or strings; and a closed provider
  that answers errors, nonsense (``usage`` as a string, a JSON array) or cuts a stream.

``make test`` runs a short profile (``FUZZ_EXAMPLES``, default 60 per generator and operation),
``make test-fast`` a shorter one (10); ``make fuzz-long`` runs ``FUZZ_EXAMPLES=2500`` (over
25,000 cases) and writes the counts to ``FUZZ_REPORT`` when set.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.conftest import LiveServer, live, policy_yaml
from tests.fake_provider import Behaviour, FakeProvider
from tests.scripted_local import ScriptedLocal

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
STATS: Counter[str] = Counter()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, fake: FakeProvider) -> Iterator[LiveServer]:
    """One Tiergate for all fuzz cases; the counts go to FUZZ_REPORT at the end."""
    fake.reset()
    with live(
        tmp_path_factory.mktemp("fuzz"),
        policy_yaml(fake),
        local_backend_obj=ScriptedLocal(queue_size=64),
        max_body_bytes=64 * 1024,
    ) as srv:
        yield srv
    report = os.environ.get("FUZZ_REPORT")
    if report:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_text(json.dumps({"examples_setting": EXAMPLES, **STATS}, indent=2))


@pytest.fixture(scope="module")
def api_schema(server: LiveServer) -> Any:
    """The running app's OpenAPI document, as schemathesis sees it."""
    return schemathesis.openapi.from_dict(server.app.openapi())


def is_anthropic(path: str) -> bool:
    """Whether ``path`` is on the Anthropic front, whose errors take Anthropic's shape."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def check_response(
    kind: str, status: int, body: bytes | None, content_type: str, where: str, *, path: str = ""
) -> None:
    """No 5xx; a 4xx is ``{"error": {"message": str, "type": str, "code": ...}}``, or on the
    Anthropic front ``{"type": "error", "error": {"type": str, "message": str}}``.

    ``body`` is None for HEAD, which has none to check.
    """
    STATS["cases"] += 1
    STATS[f"{kind}_cases"] += 1
    STATS[f"status_{status // 100}xx"] += 1
    assert status < 500, f"{where}: {status} {(body or b'')[:300]!r}"
    if status >= 400 and body is not None:
        assert content_type.startswith("application/json"), f"{where}: {content_type}"
        payload = json.loads(body)
        error = payload["error"]
        assert isinstance(error["message"], str) and error["message"], where
        assert isinstance(error["type"], str) and error["type"], where
        if is_anthropic(path):
            assert payload["type"] == "error", where
        else:
            assert "code" in error, where


def test_openapi_operations(api_schema: Any, server: LiveServer) -> None:
    """Every operation in the OpenAPI document, positive and negative cases."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {
        "/v1/chat/completions",
        "/v1/route",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/responses",
    } <= {op.path for op in operations}
    with requests.Session() as session:
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                try:
                    _fuzz_operation(operation, mode, server, session)
                except Unsatisfiable:  # e.g. no negative case for an operation without inputs
                    STATS["unsatisfiable_operations"] += 1


def _fuzz_operation(
    operation: Any, mode: GenerationMode, server: LiveServer, session: requests.Session
) -> None:
    positive = mode is GenerationMode.POSITIVE

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        if positive and isinstance(case.body, dict):
            case.body["model"] = "auto"  # a known alias, so cases reach the routing
        response = case.call(base_url=server.url, session=session, timeout=30)
        content_type = response.headers.get("content-type") or [""]
        check_response(
            "schemathesis",
            response.status_code,
            response.content,
            content_type[0],
            f"{case.method} {case.path} {case.body!r:.300}",
            path=case.path,
        )

    run()


# Text includes lone surrogates ("\ud800"): json.dumps sends them as \u escapes, which a JSON
# parser turns back into strings that cannot be encoded as UTF-8.
_text = st.text(st.characters() | st.characters(categories=["Cs"]), max_size=40)
# Numbers as clients get them wrong: floats, numeric strings, booleans.
_numberish = (
    st.integers(-10, 100_000)
    | st.floats(allow_nan=True)
    | st.from_regex(r"-?[0-9]{1,6}(\.[0-9]{1,3})?", fullmatch=True)
    | st.booleans()
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=20,
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]), "content": _json}
)
_chatish = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["auto", "auto-best", "gpt-4o", "claude", "local", "nope"]),
        "messages": st.lists(_message, max_size=3) | _json,
    },
    optional={
        "stream": _json,
        "max_tokens": _json | _numberish,
        "max_completion_tokens": _numberish,
        "n": _json | _numberish,
        "tools": _json,
        "temperature": _json | _numberish,
        "presence_penalty": _numberish | _text,
        "seed": _numberish,
        "top_logprobs": _numberish,
        "logit_bias": st.dictionaries(_text | _numberish.map(str), _numberish | _text, max_size=3),
        "stream_options": _json,
        "metadata": _json,
    },
)


def _nested(depth: int, opener: str) -> bytes:
    closer = "]" if opener == "[" else "}"
    inner = opener * depth + "1" + closer * depth
    return (
        '{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "metadata": '
        + inner
        + "}"
    ).encode()


# JSON nested from a few levels to far past the parser's recursion limit.
# (The fuzz server's body limit is 64 KiB: 20,000 levels of "[" fit in it.)
_depth = st.sampled_from([63, 64, 65, 999, 1_000, 5_000, 20_000]) | st.integers(1, 20_000)
_deep = st.builds(_nested, _depth, st.sampled_from(["[", '{"a": ']))
_body = (
    st.binary(max_size=200)
    | _json.map(lambda v: json.dumps(v).encode())
    | _chatish.map(lambda v: json.dumps(v).encode())
    | _deep
)
_path = st.sampled_from(
    [
        "/v1/chat/completions",
        "/v1/route",
        "/v1/models",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/responses",
        "/healthz",
        "/readyz",
        "/docs",
        "/",
    ]
) | st.lists(st.text("abcv1/._%-~", max_size=12), max_size=4).map(lambda p: "/" + "/".join(p))
_header_name = st.sampled_from(
    [
        "authorization",
        "x-api-key",
        "content-type",
        "x-tiergate-stakes",
        "x-tiergate-private",
        "x-tiergate-tier",
        "accept",
    ]
)
# HTTP clients refuse to send values with surrounding whitespace; strip so the server is tested.
_header_value = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(
    str.strip
)


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
    path=_path,
    headers=st.dictionaries(_header_name, _header_value, max_size=4),
    body=_body,
)
def test_raw_requests(
    server: LiveServer, method: str, path: str, headers: dict[str, str], body: bytes
) -> None:
    # A real socket: what the HTTP server makes of arbitrary methods, paths and headers counts.
    response = httpx.request(method, server.url + path, headers=headers, content=body, timeout=30)
    check_response(
        "raw",
        response.status_code,
        response.content if method != "HEAD" else None,  # a HEAD answer has no body
        response.headers.get("content-type", ""),
        f"{method} {path} {headers} {body[:200]!r}",
        path=response.request.url.path,
    )


@FUZZ
@given(body=_deep | _chatish.map(lambda v: json.dumps(v).encode()))
def test_hostile_chat_bodies(server: LiveServer, body: bytes) -> None:
    """Chat bodies only: deep nesting, lone surrogates, numbers as strings or floats."""
    response = server.http.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    check_response(
        "chat",
        response.status_code,
        response.content,
        response.headers.get("content-type", ""),
        f"{body[:200]!r}",
    )


# What a broken or hostile provider answers (tests/fake_provider.py's modes).
_UPSTREAM = ["ok", "status", "rate_limit", "bad_usage", "array_body", "reset_mid_stream"]


@FUZZ
@given(
    mode=st.sampled_from(_UPSTREAM),
    body=st.fixed_dictionaries(
        {
            "model": st.sampled_from(["auto", "auto-best"]),
            # scored for the closed tier, so the provider answers first
            "messages": _text.map(lambda t: [{"role": "user", "content": "HARD " + t}]),
            "stream": st.booleans(),
        },
        optional={"stream_options": st.just({"include_usage": True})},
    ),
)
def test_malformed_upstream_answers(
    server: LiveServer, fake: FakeProvider, mode: str, body: dict[str, Any]
) -> None:
    """Whatever the closed provider answers, a request with a fallback gets no 5xx, and a
    stream ends with ``[DONE]`` or an error event, never cut off."""
    fake.reset(Behaviour(mode=mode))
    stream = body["stream"]
    try:
        with server.http.stream(
            "POST",
            "/v1/chat/completions",
            content=json.dumps(body).encode(),  # \u escapes: lone surrogates go through
            headers={"content-type": "application/json"},
        ) as response:
            raw = response.read()
    finally:
        fake.reset()
    content_type = response.headers.get("content-type", "")
    check_response("upstream", response.status_code, raw, content_type, f"{mode} {body!r:.200}")
    if response.status_code == 200 and stream:
        events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
        assert events, raw[:300]
        assert events[-1] == "[DONE]" or "error" in json.loads(events[-1]), events[-1][:300]


# The last event of a whole stream on each front.
_STREAM_ENDS = {"messages": "message_stop", "responses": "response.completed"}
_FRONT_BODY = {
    "messages": lambda model, text, stream: {
        "model": model,
        "max_tokens": 20,
        "messages": [{"role": "user", "content": "HARD " + text}],
        "stream": stream,
    },
    "responses": lambda model, text, stream: {
        "model": model,
        "input": "HARD " + text,
        "stream": stream,
    },
}


@FUZZ
@given(
    mode=st.sampled_from(_UPSTREAM),
    # (front, alias, prompt, stream). Scored closed, both aliases reach gpt-4o first: the
    # Messages front translates to chat, the Responses front passes through natively.
    case=st.tuples(
        st.sampled_from(sorted(_FRONT_BODY)),
        st.sampled_from(["auto", "auto-best"]),
        _text,
        st.booleans(),
    ),
)
def test_malformed_upstream_answers_on_the_fronts(
    server: LiveServer, fake: FakeProvider, mode: str, case: tuple[str, str, str, bool]
) -> None:
    """The fronts, translated or passed through natively, under a broken provider: a request
    with a fallback gets no 5xx, and a stream ends with the front's last event or its error
    event."""
    front, model, text, stream = case
    fake.reset(Behaviour(mode=mode))
    body = _FRONT_BODY[front](model, text, stream)
    path = f"/v1/{front}"
    try:
        with httpx.stream(
            "POST",
            server.url + path,
            content=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
            timeout=30,
        ) as response:
            raw = response.read()
    finally:
        fake.reset()
    content_type = response.headers.get("content-type", "")
    where = f"{front} {mode} {body!r:.200}"
    check_response("fronts", response.status_code, raw, content_type, where, path=path)
    if response.status_code == 200 and stream:
        data = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
        assert data, raw[:300]
        last = json.loads(data[-1])["type"]
        assert last in (_STREAM_ENDS[front], "response.incomplete", "error"), where
