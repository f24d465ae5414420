"""A scripted local tier for fault, limit and fuzz tests: no real generation, exact behaviour.

It keeps the real :class:`~router.backends.local.Gate` so "queue full" is the production code
path, and it can fail mid-generation, hold requests until released, or pace its tokens.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from router.backends import Completion, ModelLike, Usage
from router.backends.local import Gate, check_local_request
from router.errors import BackendError


class ScriptedLocal:
    """``mode``: ok, fail (raises during generation), defect (a non-Tiergate exception after
    the first chunk), hold (waits for ``release``), hang_close (closed by its reader, never
    finishes closing, as a connection that does not close).

    It answers ``w0 w1 w2`` (``words`` of them), or, when ``reply`` is set, ``reply(body)``.
    Asked for ``logprobs``, every token gets log-probability ``logprob``, with one runner-up a
    nat behind it.

    It counts its answer's tokens as the real GGUF backend does (``router/backends/local.py``,
    ``_generate``): none while it streams, all of them as it stops, and, stopped by its reader
    (a client that left), ``stop_s`` later, as the GGUF's worker thread counts once its next
    token shows it the stop. Counting each token as it streamed hid a 0-token record (4977456).
    """

    def __init__(
        self,
        *,
        queue_size: int = 0,
        words: int = 3,
        reply: Callable[[dict[str, Any]], str] | None = None,
        mode: str = "ok",
    ) -> None:
        self.mode = mode
        self.logprob = -0.1
        self.words = words
        self.reply = reply
        self.stop_s = 0.05
        self.token_delay_s = 0.0
        self.gate = Gate(slots=1, queue_size=queue_size)
        self.release = threading.Event()  # set from the test's thread
        self.calls = 0
        self.cancelled = 0

    def unavailable_reason(self, model: ModelLike) -> str | None:
        """Always available."""
        return None

    async def complete(
        self, model: ModelLike, body: dict[str, Any], usage: Usage | None = None
    ) -> Completion:
        """Join the stream into one answer, counting into ``usage`` a token per piece of text as
        it goes, then the stream's own count, as the GGUF backend's ``complete`` does."""
        counted = usage if usage is not None else Usage()
        usage = Usage()  # the stream's own count, once it ends
        text = ""
        logprobs: list[dict[str, Any]] = []
        async for chunk in self.stream(model, body, usage):
            piece = chunk["choices"][0]["delta"].get("content") or ""
            text += piece
            counted.completion_tokens += bool(piece)
            logprobs += (chunk["choices"][0].get("logprobs") or {}).get("content") or []
        counted.prompt_tokens, counted.completion_tokens = (
            usage.prompt_tokens,
            usage.completion_tokens,
        )
        usage = counted
        return Completion(
            body={
                "id": "chatcmpl-local",
                "object": "chat.completion",
                "created": 0,
                "model": model.name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                        "logprobs": {"content": logprobs} if body.get("logprobs") else None,
                    }
                ],
                "usage": {
                    "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens,
                    "total_tokens": usage.prompt_tokens + usage.completion_tokens,
                },
            },
            usage=usage,
        )

    async def stream(
        self, model: ModelLike, body: dict[str, Any], usage: Usage
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield ``words`` chunks through the real gate."""
        check_local_request(body)
        self.calls += 1
        await self.gate.acquire()
        drawn = 0
        stopped = False  # by its reader
        try:
            while self.mode == "hold" and not self.release.is_set():
                await asyncio.sleep(0.01)
            pieces = [f"w{i} " for i in range(self.words)]
            if self.reply is not None:
                pieces = re.split(r"(?<=\s)(?=\S)", self.reply(body))
            for i, piece in enumerate(pieces):
                if self.mode == "fail" and i == 0:
                    raise BackendError("local generation failed: scripted failure")
                if self.mode == "defect" and i == 1:
                    raise RuntimeError("scripted defect")
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                usage.prompt_tokens, drawn = 5, i + 1
                choice: dict[str, Any] = {"index": 0, "delta": {"content": piece}}
                if body.get("logprobs"):
                    choice["logprobs"] = {"content": [self._entry(piece, body)]}
                yield {
                    "id": "chatcmpl-local",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": model.name,
                    "choices": [choice],
                }
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            stopped = True
            raise
        finally:
            self.gate.release()
            if stopped:
                loop = asyncio.get_running_loop()
                loop.call_later(self.stop_s, setattr, usage, "completion_tokens", drawn)
            else:
                usage.completion_tokens = drawn
            if stopped and self.mode == "hang_close":
                await asyncio.Event().wait()

    def _entry(self, piece: str, body: dict[str, Any]) -> dict[str, Any]:
        top = [
            {"token": piece, "logprob": self.logprob, "bytes": list(piece.encode())},
            {"token": "~", "logprob": self.logprob - 1.0, "bytes": [126]},
        ]
        return {**top[0], "top_logprobs": top[: int(body.get("top_logprobs") or 0)]}

    async def aclose(self) -> None:
        """Nothing to close."""
