"""Structured JSON logs on stderr: one object per line, with the request id where there is one,
and the trace and span ids of the traced request a line was written in.

Prompt text and secrets are never logged: handlers log ids, decisions and error codes only.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from types import TracebackType
from typing import Any

from opentelemetry import trace

# uvicorn's ``color_message`` repeats the message with ANSI colour codes for its own console
# formatter: in a JSON line it is escape codes a log pipeline stores and nobody reads.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",
}


class JSONFormatter(logging.Formatter):
    """Formats a record as one JSON object; ``extra={...}`` fields are kept."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        data: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            # A bare object() is a library's private marker (litellm stamps the records its
            # redaction filter saw), not a field: "<object object at 0x...>" tells no one anything.
            if key not in _STANDARD and not key.startswith("_") and type(value) is not object:
                data[key] = value
        if "trace_id" not in data:
            # Formatted as it is written, in the writer's context: inside a traced request, its
            # span (a no-op span, whose context is not valid, when tracing is off).
            context = trace.get_current_span().get_span_context()
            if context.is_valid:
                data["trace_id"] = f"{context.trace_id:032x}"
                data["span_id"] = f"{context.span_id:016x}"
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def configure_logging(level: str = "info") -> None:
    """Send ``tiergate.*`` and uvicorn logs to stderr as JSON lines.

    Python prints some failures straight to stderr, outside logging: an exception that ends a
    thread or the main thread, one raised in ``__del__`` or an async generator's finaliser,
    and warnings. Those hooks are pointed at the log too, so a traceback is always the ``exc``
    field of one JSON line and never raw lines a log collector would split apart.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_thread
    sys.unraisablehook = _log_unraisable


_crash = logging.getLogger("tiergate.crash")


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    _crash.critical("uncaught exception", exc_info=(kind, exc, tb))


def _log_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return  # as the default hook: a thread's sys.exit() is not an error
    name = args.thread.name if args.thread is not None else "?"
    _crash.error(
        "uncaught exception in thread %s",
        name,
        exc_info=(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback),
    )


def _log_unraisable(args: Any) -> None:
    # args: sys.UnraisableHookArgs (not importable as a type)
    what = args.err_msg or "exception ignored"
    where = f" in {args.object!r}" if args.object is not None else ""
    exc = args.exc_value or args.exc_type()
    _crash.error("%s%s", what, where, exc_info=(args.exc_type, exc, args.exc_traceback))
