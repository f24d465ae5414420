"""Fuzzing: generated bodies, headers and paths must never get a 5xx, and every 4xx must be an
OpenAI-shaped error.

Two generators, against a real Tiergate over loopback (scripted local tier, fake closed
provider, so no real generation happens):

* schemathesis, from the app's own OpenAPI schema (positive and negative cases per operation);
* hypothesis, for what a schema does not describe: raw bytes, random paths and methods, random
  headers (auth, ``x-tiergate-*``, content types).

``make test`` runs a short profile (``FUZZ_EXAMPLES``, default 60 per generator and operation);
``make fuzz-long`` runs ``FUZZ_EXAMPLES=2500`` (over 10,000 cases) and writes the counts to
``FUZZ_REPORT`` when set.
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
from tests.fake_provider import FakeProvider
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


def check_response(
    kind: str, status: int, body: bytes | None, content_type: str, where: str
) -> None:
    """No 5xx; a 4xx is ``{"error": {"message": str, "type": str, "code": ...}}``.

    ``body`` is None for HEAD, which has none to check.
    """
    STATS["cases"] += 1
    STATS[f"{kind}_cases"] += 1
    STATS[f"status_{status // 100}xx"] += 1
    assert status < 500, f"{where}: {status} {body[:300]!r}"
    if status >= 400 and body is not None:
        assert content_type.startswith("application/json"), f"{where}: {content_type}"
        error = json.loads(body)["error"]
        assert isinstance(error["message"], str) and error["message"], where
        assert isinstance(error["type"], str) and error["type"], where
        assert "code" in error, where


def test_openapi_operations(api_schema: Any, server: LiveServer) -> None:
    """Every operation in the OpenAPI document, positive and negative cases."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {"/v1/chat/completions", "/v1/route"} <= {op.path for op in operations}
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
        )

    run()


_text = st.text(max_size=40)
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
        "max_tokens": _json,
        "n": _json,
        "tools": _json,
        "temperature": _json,
        "stream_options": _json,
        "metadata": _json,
    },
)
_body = (
    st.binary(max_size=200)
    | _json.map(lambda v: json.dumps(v).encode())
    | _chatish.map(lambda v: json.dumps(v).encode())
)
_path = st.sampled_from(
    ["/v1/chat/completions", "/v1/route", "/v1/models", "/healthz", "/readyz", "/docs", "/"]
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
    response = httpx.request(method, server.url + path, headers=headers, content=body, timeout=30)
    check_response(
        "raw",
        response.status_code,
        response.content
        if method != "HEAD"
        else b'{"error": {"message": "-", "type": "-", "code": 0}}',
        response.headers.get("content-type", ""),
        f"{method} {path} {headers} {body[:200]!r}",
    )
