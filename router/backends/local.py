"""The local tier: a GGUF in process through llama-cpp-python, or an external llama.cpp server.

In process, one ``Llama`` instance generates one answer at a time on a dedicated worker thread, so
inference never blocks the event loop. Requests wait in a bounded queue (:class:`Gate`); when it
is full the caller gets :class:`~router.errors.LocalOverloadedError` and the policy decides
whether to spill to the closed tier or answer 429. Streams are bridged from the worker thread to
asyncio; when the consumer goes away (client disconnect, timeout), generation stops at the next
token, or while the prompt is read, at its next ``n_batch`` tokens.

Asked for ``logprobs``, the in-process backend reads each sampled token's log-probability from
the logits llama.cpp computes for that step anyway (:class:`TokenLogprobs`), so it needs no
``logits_all`` model and costs one log-softmax over the vocabulary per token.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from router.backends import Completion, ModelLike, Usage, answered_as
from router.backends.openai_http import OpenAIHTTP
from router.config import Settings
from router.errors import (
    BackendError,
    BadRequestError,
    ConfigError,
    LocalOverloadedError,
    MissingExtraError,
    OverWindowError,
    UpstreamBadRequestError,
    UpstreamTimeoutError,
)
from router.signals import estimate_tokens

log = logging.getLogger("tiergate.local")

# Request fields llama-cpp-python's create_chat_completion honours, passed through unchanged
# (from top_k on, llama.cpp's own sampling settings, which some clients send).
_PASSTHROUGH = (
    "temperature",
    "top_p",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "response_format",
    "top_k",
    "min_p",
    "typical_p",
    "repeat_penalty",
    "tfs_z",
    "mirostat_mode",
    "mirostat_tau",
    "mirostat_eta",
)
# Fields the in-process backend honours in its own code, and fields that do not change the
# answer (identifiers and hints for a provider's billing, storage or latency).
_HANDLED = frozenset(
    {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens"}
    | {"n", "tools", "functions", "logit_bias", "logprobs", "top_logprobs"}
    | {"tool_choice", "parallel_tool_calls", "function_call"}
)
_NO_EFFECT = frozenset({"user", "metadata", "store", "service_tier", "prediction"})
# The ``response_format`` types the in-process backend honours (llama_response_format).
_FORMATS = ("text", "json_object", "json_schema")


class Gate:
    """At most ``slots`` callers run at once and at most ``queue_size`` wait; beyond that, full.

    A full gate's error says when to come back (``Retry-After``): about when the next slot
    frees, from how long callers have held one lately, so that a client's retries (OpenAI's
    SDKs wait as long as it says) come when a place may be free rather than spent in a second.
    """

    def __init__(self, slots: int, queue_size: int) -> None:
        self._sem = asyncio.Semaphore(slots)
        self._slots = slots
        self._queue_size = queue_size
        self.waiting = 0
        self.running = 0
        self._taken: collections.deque[float] = collections.deque()  # when each slot was taken
        self._held_s: float | None = None  # moving average of how long a slot is held
        # Told how long each caller waited for its slot (the queue-wait histogram).
        self.on_wait: Callable[[float], None] | None = None

    def retry_after(self) -> float:
        """Seconds until a slot is likely to free (at least 1; 1 before any was given back)."""
        if self._held_s is None or not self._taken:
            return 1.0
        oldest = time.monotonic() - self._taken[0]
        return max(1.0, min(self._held_s / self._slots, self._held_s - oldest))

    @property
    def depth(self) -> int:
        """Requests running plus waiting: the local tier's queue depth."""
        return self.waiting + self.running

    async def acquire(self) -> None:
        """Take a slot, or raise :class:`LocalOverloadedError` when the queue is full."""
        if self._sem.locked() and self.waiting >= self._queue_size:
            raise LocalOverloadedError(
                f"local model busy: {self.running} running, {self.waiting} waiting",
                retry_after=self.retry_after(),
            )
        self.waiting += 1
        asked = time.monotonic()
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        taken = time.monotonic()
        self._taken.append(taken)
        if self.on_wait is not None:
            self.on_wait(taken - asked)

    def release(self) -> None:
        """Give the slot back."""
        self.running -= 1
        if self._taken:  # the oldest: exact with one slot, an estimate's input with several
            held = time.monotonic() - self._taken.popleft()
            self._held_s = held if self._held_s is None else 0.8 * self._held_s + 0.2 * held
        self._sem.release()


@runtime_checkable
class Queued(Protocol):
    """A backend that queues its callers behind a :class:`Gate` (the local tier's)."""

    gate: Gate


def local_timeout(model: ModelLike, settings: Settings) -> float:
    """Seconds a local generation may take: the policy model's ``timeout_s`` wins over
    ``TIERGATE_LOCAL_TIMEOUT_S``, as for closed models."""
    return model.timeout_s or settings.local_timeout_s


def local_max_tokens(body: dict[str, Any], settings: Settings) -> int:
    """The request's ``max_completion_tokens`` or ``max_tokens``, else ``local_max_tokens``: a
    local answer is always bounded, since it holds one of the few local slots while it runs."""
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    return int(max_tokens) if max_tokens is not None else settings.local_max_tokens


def with_system_prompt(messages: list[dict[str, Any]], system_prompt: str) -> list[dict[str, Any]]:
    """Small instruct models answer sensibly only with a system message: add one if absent."""
    if any(m.get("role") in ("system", "developer") for m in messages):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def check_local_request(body: dict[str, Any]) -> None:
    """Refuse, with a clear 400, what the local tier cannot honour instead of dropping it."""
    if body.get("tools") or body.get("functions"):
        raise BadRequestError("the local model does not support tools", param="tools")
    if int(body.get("n") or 1) != 1:
        raise BadRequestError("the local model generates one choice (n=1) only", param="n")
    for message in body.get("messages") or []:
        content = message.get("content")
        if isinstance(content, list) and any(
            isinstance(p, dict) and p.get("type") not in (None, "text") for p in content
        ):
            raise BadRequestError("the local model does not accept images", param="messages")


def _text_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flatten text-only content-part arrays into strings, which every chat template accepts
    (llama-cpp-python's server, too, fails on arrays and on the developer role). The parts go
    on separate lines, as llama-server and vLLM join them and as the routing signals read
    them: joined as they came, ``["Translate:", "Bonjour"]`` read ``Translate:Bonjour``.

    A ``developer`` message (OpenAI's newer name for the system message) becomes a ``system``
    one: chat templates know no developer role, so it was written into the prompt as a turn the
    model never saw in training, and templates that supply their own system message when the
    first is not ``system`` added theirs before it.
    """
    out = []
    for sent in messages:
        message = {**sent, "role": "system"} if sent.get("role") == "developer" else sent
        content = message.get("content")
        if isinstance(content, list):
            text = "\n".join(str(p.get("text", "")) for p in content)
            out.append({**message, "content": text})
        elif content is None:  # an assistant's tool call: chat templates expect text
            out.append({**message, "content": ""})
        else:
            out.append(message)
    return out


def llama_response_format(response_format: Any) -> Any:
    """OpenAI's ``response_format`` as llama-cpp-python reads it.

    llama-cpp-python constrains the answer only for ``{"type": "json_object"}`` (with an optional
    ``schema``) and ignores OpenAI's structured-output form, ``{"type": "json_schema",
    "json_schema": {"schema": ...}}``, which the Responses front's ``text.format`` also becomes:
    passed as it came, a request for JSON got free text. The schema moves to where llama.cpp
    turns it into a grammar.
    """
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return response_format
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if isinstance(schema, dict):
        return {"type": "json_object", "schema": schema}
    return {"type": "json_object"}


def cannot_take(names: Collection[str]) -> frozenset[str]:
    """Of the request fields ``names``, those the in-process backend cannot honour: neither
    honoured (:data:`_PASSTHROUGH`, :data:`_HANDLED`) nor without effect (:data:`_NO_EFFECT`)."""
    return frozenset(names).difference(_PASSTHROUGH, _HANDLED, _NO_EFFECT)


def check_in_process_fields(body: dict[str, Any]) -> None:
    """Refuse (400) a request field the in-process backend would otherwise drop: each field is
    honoured (:data:`_PASSTHROUGH`, :data:`_HANDLED`), has no effect on the answer
    (:data:`_NO_EFFECT`), or is refused here."""
    if body.get("top_logprobs") is not None and not body.get("logprobs"):
        raise BadRequestError("top_logprobs needs logprobs set to true", param="top_logprobs")
    response_format = body.get("response_format")
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind not in (None, *_FORMATS):
        raise BadRequestError(
            f"the in-process local model cannot honour response_format type '{kind}' (it "
            f"honours {', '.join(_FORMATS)})",
            param="response_format.type",
        )
    choice = body.get("tool_choice", body.get("function_call"))
    if choice not in (None, "none", "auto"):
        raise BadRequestError("the local model does not support tools", param="tool_choice")
    refused = cannot_take(body)
    key = next((key for key in body if key in refused), None)  # the first, in the body's order
    if key is not None:
        raise BadRequestError(
            f"the in-process local model cannot honour '{key}' (it honours "
            f"{', '.join(sorted(_PASSTHROUGH))}, max_tokens, max_completion_tokens, "
            "logit_bias, logprobs, top_logprobs, stream_options and n=1)",
            param=key,
        )


class TokenLogprobs:
    """The log-probabilities of one generation's tokens, in OpenAI's ``logprobs.content`` shape.

    llama.cpp computes the next-token logits at every step; :meth:`process` (a llama-cpp-python
    logits processor, first in the sampler chain) turns them into log-probabilities before
    temperature, top-k or penalties change them, and :meth:`sampled` pairs them with the token
    drawn. ``bias``: the request's ``logit_bias``, applied here after reading, since
    llama-cpp-python drops its own bias when a request also has a logits processor.
    """

    def __init__(self, llm: Any, top: int, bias: dict[int, float] | None = None) -> None:
        self._llm = llm
        self._top = top
        self._bias = bias or {}
        self._step: NDArray[np.float64] | None = None
        self._pending: list[dict[str, Any]] = []

    def process(self, input_ids: NDArray[Any], logits: NDArray[np.float32]) -> NDArray[np.float32]:
        """Read one step's logits (and return them, biased as the request asks)."""
        z = logits.astype(np.float64)
        top = z.max()
        self._step = z - (top + np.log(np.exp(z - top).sum()))
        if not self._bias:
            return logits
        biased = logits.copy()
        for token, value in self._bias.items():
            biased[token] += value
        return biased

    def _entry(self, token: int, logprob: float) -> dict[str, Any]:
        raw = bytes(self._llm.detokenize([token]))
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

    def sampled(self, token: int, *, end: bool) -> None:
        """The token the step drew; an end-of-generation token is not part of the answer."""
        step, self._step = self._step, None
        if step is None or end:
            return
        entry = self._entry(token, float(step[token]))
        best: list[int] = []
        if self._top:
            best = np.argpartition(-step, self._top)[: self._top].tolist()
            best.sort(key=lambda t: -step[t])
        entry["top_logprobs"] = [self._entry(t, float(step[t])) for t in best]
        self._pending.append(entry)

    def take(self) -> list[dict[str, Any]]:
        """The entries of the tokens drawn since the last call."""
        out, self._pending = self._pending, []
        return out


def _trained_context(llm: Any) -> int | None:
    """The context length the loaded model was trained on (its GGUF says), or None."""
    try:
        return int(llm._model.n_ctx_train())
    except (AttributeError, TypeError, ValueError):
        return None


class _OverWindowError(ValueError):
    """A prompt that leaves no room for the answer the client asked for (in
    :func:`_recording_llama`): its tokens, the output limit and the window, for
    :func:`_generation_error`."""

    def __init__(self, prompt_tokens: int, asked: int, window: int) -> None:
        super().__init__(prompt_tokens, asked, window)
        self.prompt_tokens, self.asked, self.window = prompt_tokens, asked, window


@functools.cache
def _recording_llama() -> type[Any]:
    # llama_cpp.Llama that tells a TokenLogprobs which token each sampling step drew, and stops
    # reading a prompt once its generation is cancelled; built on first use, since
    # llama-cpp-python is the optional ``local`` extra.
    import llama_cpp

    class RecordingLlama(llama_cpp.Llama):
        recorder: TokenLogprobs | None = None
        cancel: threading.Event | None = None
        asked: int | None = None  # the client's own max_tokens, if it sent one
        read: int | None = None  # the prompt's tokens, once it is read
        drawn = 0  # the answer's tokens, the end of generation left out
        tokens: list[int]  # the tokens drawn, for the stop sequence that ended the answer
        ended = False  # whether the last token drawn ended generation (else a stop sequence did)

        def create_completion(self, prompt: Any, *args: Any, **kwargs: Any) -> Any:
            # llama.cpp refuses only a prompt that fills the window by itself, and cuts a
            # max_tokens past what is left down to it: an answer the client asked for at length
            # ended early with finish_reason 'length'. Refused as OpenAI does, before it is read.
            tokens = len(prompt) if isinstance(prompt, list) else 0  # chat handlers' form
            if self.asked is not None and tokens + self.asked > self.n_ctx():
                raise _OverWindowError(tokens, self.asked, self.n_ctx())
            return super().create_completion(prompt, *args, **kwargs)

        def eval(self, tokens: Sequence[int]) -> None:
            # llama.cpp reads a prompt in one call that nothing stops (a long one takes
            # seconds to minutes on a CPU): fed here n_batch tokens at a time, a generation
            # whose client left or whose time is up frees the model at the next batch.
            for start in range(0, len(tokens), self.n_batch):
                if self.cancel is not None and self.cancel.is_set():
                    raise _CancelledError
                super().eval(tokens[start : start + self.n_batch])

        def sample(self, *args: Any, **kwargs: Any) -> int:
            # The counts usage reports: a chunk is not a token, as llama.cpp holds back the
            # tokens of a character not yet whole (an emoji is three) and of a stop sequence.
            if self.read is None:  # at the first draw the context holds the prompt alone
                self.read = int(self.n_tokens)
            token = int(super().sample(*args, **kwargs))
            end = bool(llama_cpp.llama_vocab_is_eog(self._model.vocab, token))
            self.drawn += not end
            self.ended = end
            self.tokens.append(token)
            if self.recorder is not None:
                self.recorder.sampled(token, end=end)
            return token

    return RecordingLlama


def _attach_logprobs(chunk: dict[str, Any], recorder: TokenLogprobs) -> None:
    # The tokens drawn since the last chunk go with the chunk that shows their text; tokens whose
    # text is never shown (a stop sequence) are dropped with it.
    for choice in chunk.get("choices") or []:
        if choice.get("delta", {}).get("content"):
            choice["logprobs"] = {"content": recorder.take(), "refusal": None}
        else:
            choice["logprobs"] = None


def _name_the_stop(chunk: dict[str, Any], llm: Any, stop: str | list[str] | None) -> None:
    # A chat answer says only "stop", whether the model ended it or a stop sequence did; the
    # Messages front reports which (stop_reason "stop_sequence"). The sequence goes in the
    # choice's "stop_reason", as vLLM puts it, when the last token drawn did not end generation:
    # the first of ``stop`` in the text drawn, as llama.cpp picks it.
    for choice in chunk.get("choices") or []:
        if choice.get("finish_reason") != "stop" or not stop or llm.ended:
            continue
        text = llm.detokenize(llm.tokens).decode("utf-8", errors="ignore")
        stops = [stop] if isinstance(stop, str) else stop
        choice["stop_reason"] = next((s for s in stops if s in text), None)


def _generation_error(exc: BaseException) -> BadRequestError | BackendError:
    """What a failed local generation is to the client.

    A prompt longer than the context window is the request's fault, as at OpenAI: a 400
    ``context_length_exceeded`` (which a request that did not pin the local model falls back
    from) rather than a 502 that SDKs retry. Prompts reach llama.cpp over the window when the
    policy's character-based estimate undercounts them (Chinese, code, emoji). Named in the
    chat request's fields, as the gateway names them for the client's front
    (:meth:`~router.errors.TiergateError.name_fields`).
    """
    if isinstance(exc, _OverWindowError):
        return OverWindowError("the local model", exc.prompt_tokens, exc.asked, exc.window)
    if isinstance(exc, ValueError) and "exceed context window" in str(exc):
        return BadRequestError(
            f"the prompt is longer than the local model's context window: {exc}",
            code="context_length_exceeded",
            param="messages",
        )
    return BackendError(f"local generation failed: {exc}")


class _CancelledError(Exception):
    """Raised inside the worker when the consumer has gone away."""


class LlamaCppBackend:
    """A GGUF model in this process (CPU, or GPU with ``n_gpu_layers``)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._llm: Any = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")
        self.gate = Gate(slots=1, queue_size=settings.local_queue_size)
        self.load_error: str | None = None

    def load(self) -> None:
        """Load the GGUF (blocking; call from a thread at start-up)."""
        path = self._settings.local_model_path
        if not path.is_file():
            self.load_error = f"GGUF not found at {path} (run 'tiergate fetch-model')"
            raise ConfigError(self.load_error)
        try:
            llama_class = _recording_llama()
        except ImportError as exc:
            error = MissingExtraError("the in-process local model (llama-cpp-python)", "local")
            self.load_error = error.message
            raise error from exc
        try:
            self._llm = llama_class(
                model_path=str(path),
                n_ctx=self._settings.n_ctx,
                # Reading a prompt takes the same bound: llama.cpp's default for it is every
                # core the machine has, whatever the container may use.
                n_threads=self._settings.n_threads,
                n_threads_batch=self._settings.n_threads,
                n_batch=self._settings.n_batch,
                n_gpu_layers=self._settings.n_gpu_layers,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            self.load_error = f"cannot load GGUF {path}: {exc}"
            raise ConfigError(self.load_error) from exc
        self.load_error = None
        trained = _trained_context(self._llm)
        if trained and self._settings.n_ctx > trained:
            log.warning(
                "TIERGATE_N_CTX=%d is over the %d tokens %s was trained on: answers to prompts "
                "past %d tokens are likely to be poor; set TIERGATE_N_CTX (and the policy's "
                "context_window for the local model) to %d or less",
                self._settings.n_ctx,
                trained,
                path.name,
                trained,
                trained,
            )

    @property
    def loaded(self) -> bool:
        """Whether the model is in memory."""
        return self._llm is not None

    def unavailable_reason(self, model: ModelLike) -> str | None:
        """None once the model is loaded."""
        return None if self._llm is not None else (self.load_error or "local model not loaded")

    def _kwargs(self, body: dict[str, Any]) -> dict[str, Any]:
        check_local_request(body)
        check_in_process_fields(body)
        messages = with_system_prompt(
            _text_messages(list(body["messages"])), self._settings.default_system_prompt
        )
        kwargs: dict[str, Any] = {"messages": messages}
        for key in _PASSTHROUGH:
            if body.get(key) is not None:
                kwargs[key] = body[key]
        if "response_format" in kwargs:
            kwargs["response_format"] = llama_response_format(kwargs["response_format"])
        kwargs["max_tokens"] = local_max_tokens(body, self._settings)
        if body.get("logit_bias"):
            kwargs["logit_bias"] = self._logit_bias(body["logit_bias"])
        return kwargs

    def _logit_bias(self, bias: dict[str, float]) -> dict[int, float]:
        # The wire schema checked the types; the token ids must also exist in this model.
        vocab = int(self._llm.n_vocab()) if self._llm is not None else 0
        out = {int(k): float(v) for k, v in bias.items()}
        if vocab and any(t >= vocab for t in out):
            raise BadRequestError(
                f"logit_bias names a token id past the local model's vocabulary ({vocab})",
                param="logit_bias",
            )
        return out

    async def complete(
        self, model: ModelLike, body: dict[str, Any], usage: Usage | None = None
    ) -> Completion:
        """Generate one answer on the worker thread; ``usage`` counts its tokens as they come.

        Cancelling the call (the client went away) stops generation at the next token and frees
        the slot, as a stream's consumer leaving does.
        """
        kwargs = self._kwargs(body)
        counted = usage if usage is not None else Usage()
        usage = Usage()  # the worker's own count, exact once generation ends
        parts: list[str] = []
        logprobs: list[dict[str, Any]] = []
        finish: str | None = None
        stopped_by: str | None = None
        async for chunk in self.stream(model, body, usage, _kwargs=kwargs):
            for choice in chunk.get("choices") or []:
                text = choice.get("delta", {}).get("content") or ""
                parts.append(text)
                logprobs.extend((choice.get("logprobs") or {}).get("content") or [])
                counted.completion_tokens += bool(text)
                finish = choice.get("finish_reason") or finish
                stopped_by = choice.get("stop_reason") or stopped_by
        counted.prompt_tokens, counted.completion_tokens = (
            usage.prompt_tokens,
            usage.completion_tokens,
        )
        counted.generation_s = usage.generation_s
        usage = counted
        return Completion(
            body={
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model.name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(parts)},
                        "finish_reason": finish or "stop",
                        **({"stop_reason": stopped_by} if stopped_by else {}),
                        "logprobs": (
                            {"content": logprobs, "refusal": None} if body.get("logprobs") else None
                        ),
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
        self,
        model: ModelLike,
        body: dict[str, Any],
        usage: Usage,
        *,
        _kwargs: dict[str, Any] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream chunks from the worker thread; stop generating when the consumer leaves."""
        if self._llm is None:
            raise BackendError(self.unavailable_reason(model) or "local model not loaded")
        kwargs = dict(_kwargs if _kwargs is not None else self._kwargs(body))
        asked = body.get("max_completion_tokens") or body.get("max_tokens")
        recorder = None
        if body.get("logprobs"):
            recorder = TokenLogprobs(
                self._llm, int(body.get("top_logprobs") or 0), kwargs.pop("logit_bias", None)
            )
            kwargs["logits_processor"] = [recorder.process]
        await self.gate.acquire()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()
        done = object()

        def emit(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                for chunk in self._generate(kwargs, cancel, usage, recorder, asked):
                    emit(chunk)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                emit(exc)
            finally:
                emit(done)

        future = loop.run_in_executor(self._executor, work)
        # The slot is released when the worker has really finished, not when the consumer
        # leaves, so two generations never share one llama.cpp context.
        future.add_done_callback(lambda _f: self.gate.release())
        chat_id = f"chatcmpl-{uuid.uuid4().hex}"
        # The model's timeout_s (else local_timeout_s) bounds the whole generation (waiting in
        # the queue excluded): past it the worker is told to stop and the request fails like
        # any local failure (fallback).
        limit = local_timeout(model, self._settings)
        deadline = loop.time() + limit
        began = time.perf_counter()
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        item = await queue.get()
                except TimeoutError as exc:
                    raise UpstreamTimeoutError(f"local generation exceeded {limit:g}s") from exc
                if item is done:
                    return
                if isinstance(item, _CancelledError):
                    return
                if isinstance(item, BaseException):
                    raise _generation_error(item) from item
                item["id"] = chat_id
                item["model"] = model.name
                yield item
        finally:
            cancel.set()
            # Closed early, the worker stops at its next token and only then times itself:
            # until it has, the time so far stands (a cascade records it at once).
            usage.generation_s = usage.generation_s or time.perf_counter() - began

    def _generate(
        self,
        kwargs: dict[str, Any],
        cancel: threading.Event,
        usage: Usage,
        recorder: TokenLogprobs | None = None,
        asked: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        llm = self._llm
        started = time.perf_counter()
        llm.recorder, llm.cancel, llm.asked = recorder, cancel, asked
        llm.read, llm.drawn, llm.tokens, llm.ended = None, 0, [], False
        chunks = llm.create_chat_completion(**kwargs, stream=True)
        try:
            for chunk in chunks:
                if cancel.is_set():
                    raise _CancelledError
                usage.prompt_tokens = llm.read or 0
                if recorder is not None:
                    _attach_logprobs(chunk, recorder)
                _name_the_stop(chunk, llm, kwargs.get("stop"))
                yield chunk
        finally:
            with contextlib.suppress(Exception):
                chunks.close()
            llm.recorder = llm.cancel = llm.asked = None
            usage.completion_tokens = llm.drawn
            # Stopped while it read the prompt: the tokens it had read.
            usage.prompt_tokens = llm.read if llm.read is not None else int(llm.n_tokens)
            usage.generation_s = time.perf_counter() - started

    async def aclose(self) -> None:
        """Stop the worker thread and free the model."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        llm, self._llm = self._llm, None
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.close()


#: How an OpenAI-compatible server gives the numbers of a request over its context: vLLM's
#: words for a prompt that fits with an answer asked that does not, and OpenAI's own words
#: (vLLM before, llama_cpp.server), which give the prompt and the answer asked.
_OVER_WINDOW_NUMBERS = (
    re.compile(
        r"'max_tokens' or 'max_completion_tokens' is too large: (?P<asked>\d+)\. This model's "
        r"maximum context length is (?P<window>\d+) tokens and your request has "
        r"(?P<prompt>\d+) input tokens",
        re.IGNORECASE,
    ),
    re.compile(
        r"maximum context length is (?P<window>\d+) tokens\. However, you requested \d+ "
        r"tokens \((?P<prompt>\d+) in the messages, (?P<asked>\d+) in the completion\)",
        re.IGNORECASE,
    ),
)


def _external_error(exc: UpstreamBadRequestError) -> BadRequestError | None:
    """An external server's 400 for a prompt over its context, as the in-process backend
    reports one (:func:`_generation_error`): a request that did not pin the local model falls
    back from it. It is one where the closed providers' 400s are
    (:func:`~router.backends.openai_http.provider_failure`): by its code (llama_cpp.server's
    ``context_length_exceeded``), llama-server's type ``exceed_context_size_error``, or the
    words its message begins with (llama-server's before it had that type), answered with a
    status or as a stream's error event. Any other 400 stands as the server's, one that only
    quotes those words from the request included. Where the server gives the prompt's and
    the answer's tokens (:data:`_OVER_WINDOW_NUMBERS`), the error says which is over, as
    the in-process one does: a prompt that fits is not called longer than the window."""
    if exc.code != "context_length_exceeded":
        return None
    for words in _OVER_WINDOW_NUMBERS:
        if said := words.search(exc.message):
            prompt, asked, window = (int(said[k]) for k in ("prompt", "asked", "window"))
            return OverWindowError("the local server", prompt, asked, window)
    return BadRequestError(
        f"the prompt is longer than the local server's context window: {exc.message}",
        code="context_length_exceeded",
        param="messages",
    )


def _has_text(choice: Any) -> bool:
    delta = choice.get("delta") if isinstance(choice, dict) else None
    return isinstance(delta, dict) and bool(delta.get("content"))


# Fields of a streamed request that a request without streaming must not carry.
_STREAM_ONLY = frozenset({"stream", "stream_options", "max_completion_tokens"})


class ExternalLlamaBackend:
    """A llama.cpp OpenAI-compatible server reached by URL: how the local tier scales out."""

    def __init__(self, settings: Settings, http: OpenAIHTTP) -> None:
        if not settings.local_base_url:
            raise ConfigError("local_backend=openai_http needs TIERGATE_LOCAL_BASE_URL")
        self._settings = settings
        self._base = settings.local_base_url
        self._http = http
        self.gate = Gate(slots=settings.local_slots, queue_size=settings.local_queue_size)

    def unavailable_reason(self, model: ModelLike) -> str | None:
        """Always None: reachability shows per request and triggers the fallback."""
        return None

    def server_url(self, model: ModelLike) -> str:
        """The server's URL (``TIERGATE_LOCAL_BASE_URL``), whatever the model."""
        return self._base

    def _body(self, model: ModelLike, body: dict[str, Any]) -> dict[str, Any]:
        check_local_request(body)
        messages = with_system_prompt(
            _text_messages(list(body["messages"])), self._settings.default_system_prompt
        )
        request = {
            **body,
            "model": model.litellm_model or model.name,
            "messages": messages,
            "max_tokens": local_max_tokens(body, self._settings),
        }
        if "response_format" in body:  # llama-cpp-python's server refuses json_schema
            request["response_format"] = llama_response_format(body["response_format"])
        return request

    async def complete(
        self, model: ModelLike, body: dict[str, Any], usage: Usage | None = None
    ) -> Completion:
        """One answer from the external server (its usage comes with the answer)."""
        request = self._body(model, body)
        await self.gate.acquire()
        started = time.perf_counter()
        try:
            result = await self._complete(model, request)
        finally:
            self.gate.release()
        result.usage.generation_s = time.perf_counter() - started
        answered_as(result.body, model.name, result.usage)
        return result

    async def _complete(self, model: ModelLike, request: dict[str, Any]) -> Completion:
        try:
            return await self._http.complete(
                self._base,
                request,
                api_key=self._settings.local_api_key,
                label="local llama.cpp server",
                timeout_s=local_timeout(model, self._settings),
            )
        except UpstreamBadRequestError as exc:
            if (over := _external_error(exc)) is None:
                raise
            raise over from exc

    async def stream(
        self, model: ModelLike, body: dict[str, Any], usage: Usage
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream from the external server.

        A server that streams no usage (llama_cpp.server) is counted here: a llama.cpp server
        streams a token a chunk, and the prompt it read is estimated from the messages it was
        sent (with the system prompt added here, which the request's own estimate lacks)."""
        request = self._body(model, body)
        await self.gate.acquire()
        started = time.perf_counter()
        streamed = False
        tokens = 0
        try:
            async for chunk in self._http.stream(
                self._base,
                request,
                usage,
                api_key=self._settings.local_api_key,
                label="local llama.cpp server",
                timeout_s=local_timeout(model, self._settings),
            ):
                streamed = True
                tokens += sum(map(_has_text, chunk.get("choices") or ()))
                answered_as(chunk, model.name, usage)
                yield chunk
        except UpstreamBadRequestError as exc:
            if (over := _external_error(exc)) is None:
                raise
            raise over from exc
        except BackendError as exc:
            if streamed or exc.upstream_status != 200:  # not a 200 stream that ended empty
                raise
            await self._why_the_stream_ended(model, request, exc)
            raise
        finally:
            usage.generation_s = time.perf_counter() - started
            self.gate.release()
            if tokens and not usage.completion_tokens:
                usage.completion_tokens = tokens
                usage.prompt_tokens = estimate_tokens(request["messages"])

    async def _why_the_stream_ended(
        self, model: ModelLike, request: dict[str, Any], exc: BackendError
    ) -> None:
        """Raise the context error when a stream that ended before its first chunk did so for a
        prompt over the server's context. llama_cpp.server finds that only once it has answered
        200 and then drops the stream; asked without streaming it says so with a 400. Returns
        (the caller raises ``exc``) when the server says anything else or cannot be reached.
        The server closes the stream's connection only after aiohttp has pooled it: the
        client sends the probe again on a fresh connection (:class:`OpenAIHTTP`)."""
        probe = {k: v for k, v in request.items() if k not in _STREAM_ONLY} | {"max_tokens": 1}
        try:
            await self._complete(model, probe)
        except BadRequestError as over:  # the context error (another 400 is a BackendError)
            raise over from exc
        except BackendError:
            return

    async def aclose(self) -> None:
        """Nothing of its own to close: the HTTP pool is shared."""
