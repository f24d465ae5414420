"""The JSON log: every line ``tiergate serve`` writes to stderr is one JSON object, and a
traceback is a field of it, wherever the exception was raised."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from router.logs import JSONFormatter
from tests.conftest import REPO, live, policy_yaml
from tests.fake_provider import Behaviour, FakeProvider
from tests.scripted_local import ScriptedLocal

_PROGRAM = textwrap.dedent(
    """
    import asyncio, gc, logging, threading, warnings

    from router.logs import configure_logging

    configure_logging("info")
    logging.getLogger("tiergate.test").error("handled", exc_info=ZeroDivisionError("one"))
    thread = threading.Thread(target=lambda: 1 / 0, name="writer")
    thread.start()
    thread.join()
    warnings.warn("a library warns", DeprecationWarning, stacklevel=1)

    class Broken:
        def __del__(self) -> None:
            raise RuntimeError("raised in __del__")

    Broken()
    gc.collect()

    async def main() -> None:
        async def fail() -> None:
            raise KeyError("task")

        task = asyncio.get_running_loop().create_task(fail())
        await asyncio.sleep(0.01)
        del task
        gc.collect()

    asyncio.run(main())
    raise SystemError("the main thread gives up")
    """
)


def _json_lines(program: str, **env: str) -> tuple[int, list[dict[str, Any]]]:
    """Run ``program`` in a fresh interpreter: its exit status and the JSON object of every
    line it wrote to stdout or stderr (a line that is not one fails the test)."""
    done = subprocess.run(
        [sys.executable, "-c", program],
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    records = []
    for line in (done.stdout + done.stderr).splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise AssertionError(f"raw line: {line!r}\n{done.stdout}{done.stderr}") from None
    return done.returncode, records


def test_every_stderr_line_is_json_and_tracebacks_are_a_field() -> None:
    returncode, records = _json_lines(_PROGRAM, PYTHONWARNINGS="always")
    assert returncode != 0
    text = json.dumps(records)
    for raised in ("ZeroDivisionError", "raised in __del__", "KeyError", "SystemError"):
        assert any(raised in str(r.get("exc", "")) for r in records), (raised, text)
    assert any("a library warns" in r["msg"] for r in records), text
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)


def test_fields_are_kept_but_a_library_s_bare_marker_is_not() -> None:
    import logging

    record = logging.LogRecord("tiergate.x", logging.INFO, __file__, 1, "done %s", ("ok",), None)
    record.request_id = "req_1"
    record.litellm_redacted = object()  # what litellm's redaction filter stamps on a record
    record.color_message = "\x1b[32mdone ok\x1b[0m"  # uvicorn's, for its console formatter
    line = json.loads(JSONFormatter().format(record))
    assert line["msg"] == "done ok" and line["request_id"] == "req_1"
    assert "litellm_redacted" not in line and "color_message" not in line


_LITELLM_CALL = textwrap.dedent(
    """
    from router.backends.closed import quiet_litellm
    from router.logs import configure_logging
    from tests.fake_provider import FakeProvider

    configure_logging("info")
    litellm = quiet_litellm()
    with FakeProvider() as fake:
        litellm.completion(
            model="anthropic/claude-3-5-sonnet-20241022",
            api_base=fake.base_url.removesuffix("/v1"),
            api_key="k",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
        )
    """
)


def test_a_call_through_litellm_logs_json_lines_only() -> None:
    """litellm writes its records with a plain-text handler of its own (INFO to stdout, two
    lines per call); under Tiergate they are JSON lines like every other record."""
    returncode, records = _json_lines(_LITELLM_CALL, LITELLM_LOCAL_MODEL_COST_MAP="True")
    assert returncode == 0, records
    assert any(r["logger"] == "LiteLLM" for r in records), records  # its record, kept


def test_a_failed_attempt_s_line_names_its_request_model_and_error(
    tmp_path: Path, fake: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    """On call, the warning a failed model call writes is found by field, not by parsing its
    message: the request it belongs to, the model that failed and how (without tracing on)."""
    fake.reset(Behaviour(mode="status", status=500, failing_path="/chat/completions"))
    with live(
        tmp_path, policy_yaml(fake, on_failure="closed"), local_backend_obj=ScriptedLocal()
    ) as srv:
        body = {"model": "auto", "messages": [{"role": "user", "content": "HARD"}]}
        with caplog.at_level("WARNING", logger="tiergate.gateway"):
            response = srv.http.post("/v1/chat/completions", json=body)
    assert response.headers["x-tiergate-fallback"] == "closed->closed"
    (record,) = [r for r in caplog.records if "failed for" in r.getMessage()]
    line = json.loads(JSONFormatter().format(record))
    assert line["request_id"] == response.headers["x-request-id"]
    assert line["model"] == "gpt-4o" and line["tier"] == "closed"
    assert line["error_type"] == "upstream_error" and line["upstream_status"] == 500
