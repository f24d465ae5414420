"""The JSON log: every line ``tiergate serve`` writes to stderr is one JSON object, and a
traceback is a field of it, wherever the exception was raised."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tests.conftest import REPO

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


def test_every_stderr_line_is_json_and_tracebacks_are_a_field() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "always"}
    done = subprocess.run(
        [sys.executable, "-c", _PROGRAM],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"raw line on stderr: {line!r}\n{done.stderr}") from None
    text = json.dumps(records)
    for raised in ("ZeroDivisionError", "raised in __del__", "KeyError", "SystemError"):
        assert any(raised in str(r.get("exc", "")) for r in records), (raised, text)
    assert any("a library warns" in r["msg"] for r in records), text
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)


def test_fields_are_kept_but_a_library_s_bare_marker_is_not() -> None:
    import logging

    from router.logs import JSONFormatter

    record = logging.LogRecord("tiergate.x", logging.INFO, __file__, 1, "done %s", ("ok",), None)
    record.request_id = "req_1"
    record.litellm_redacted = object()  # what litellm's redaction filter stamps on a record
    line = json.loads(JSONFormatter().format(record))
    assert line["msg"] == "done ok" and line["request_id"] == "req_1"
    assert "litellm_redacted" not in line
