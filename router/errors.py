"""Tiergate's one exception hierarchy.

Every failure a client can see is a :class:`TiergateError`. Backend exceptions (httpx, litellm,
llama.cpp) are mapped into it in one place per backend (``raise ... from exc``), and one handler in
``app.py`` turns it into OpenAI-shaped JSON: ``{"error": {"message", "type", "code"}}``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# Credentials as providers and clients send them; scrubbed from any upstream text we repeat.
_CREDENTIAL = re.compile(
    r"(?i)(bearer\s+|x-api-key[\"':=\s]+|api[_-]?key[\"':=\s]+)[^\s\"',;}]+"
    r"|\b(sk|tg|pk|rk)-[A-Za-z0-9_\-]{8,}"
)


def scrub(text: str, known: Iterable[str | None] = ()) -> str:
    """``text`` with ``known`` secrets and anything shaped like a credential replaced.

    Upstream error bodies are repeated to clients and logs; some providers echo the key they
    were sent, so every such text passes through here first.
    """
    for secret in known:
        if secret:
            text = text.replace(secret, "[redacted]")
    return _CREDENTIAL.sub(lambda m: (m.group(1) or "") + "[redacted]", text)


class TiergateError(Exception):
    """Base class: carries the HTTP status and OpenAI error ``type``/``code`` for the client."""

    status_code: int = 500
    error_type: str = "server_error"
    code: str = "internal_error"
    # False for failures a retry cannot fix (configuration): sent as ``x-should-retry: false``,
    # which the OpenAI SDKs honour instead of retrying a 5xx three times. None: no header.
    should_retry: bool | None = None
    # Anthropic's own type for this error where it has one that its status does not give
    # (ANTHROPIC_ERROR_TYPES), and its own code (``error.details.error_code``) where its SDKs
    # act on one; both sent only on the /v1/messages front.
    anthropic_type: str | None = None
    anthropic_code: str | None = None
    # The status Anthropic answers this error with where it is not ``status_code`` (its 529
    # for an overload, which its SDKs raise as ``OverloadedError``): sent only on that front.
    anthropic_status: int | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if should_retry is not None:
            self.should_retry = should_retry
        self.param = param
        self.headers: dict[str, str] = dict(headers or {})
        if self.should_retry is not None:
            self.headers["x-should-retry"] = "true" if self.should_retry else "false"

    def name_fields(self, name: Callable[[str], str]) -> None:
        """Name the chat request field this error is about (``param``) as ``name`` gives it.

        Every front is served as a chat request, so the backends name chat fields; the gateway
        names them as the client's front does where the error leaves it. A subclass whose
        message names a field words it again."""
        if self.param is not None:
            self.param = name(self.param)

    def to_body(self) -> dict[str, Any]:
        """The OpenAI error envelope for this error."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


#: Anthropic's error ``type`` for each HTTP status Tiergate answers (else ``api_error``).
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


#: The path of Anthropic's front, whose errors take Anthropic's shape.
MESSAGES_PATH = "/v1/messages"


def on_messages_front(path: str) -> bool:
    """Whether ``path`` is Anthropic's front (``/v1/messages`` and below)."""
    return path == MESSAGES_PATH or path.startswith(MESSAGES_PATH + "/")


def error_status(exc: TiergateError, anthropic: bool) -> int:
    """The HTTP status ``exc`` is answered (and recorded) with: on Anthropic's front
    (``anthropic``), Anthropic's own where it has one (``anthropic_status``), else
    ``status_code``."""
    if anthropic and exc.anthropic_status is not None:
        return exc.anthropic_status
    return exc.status_code


def error_body(exc: TiergateError, path: str) -> dict[str, Any]:
    """The error JSON for a request to ``path``: Anthropic's shape on its front, else
    OpenAI's."""
    if on_messages_front(path):
        return anthropic_error_body(exc)
    return exc.to_body()


def anthropic_error_body(exc: TiergateError) -> dict[str, Any]:
    """``exc`` in Anthropic's error shape, for the ``/v1/messages`` front: the same status and
    message as the OpenAI shape, the error type named as Anthropic names it, and Anthropic's
    ``details.error_code`` where the error has one."""
    kind = exc.anthropic_type or ANTHROPIC_ERROR_TYPES.get(exc.status_code, "api_error")
    error: dict[str, Any] = {"type": kind, "message": exc.message}
    if exc.anthropic_code is not None:
        error["details"] = {"error_code": exc.anthropic_code}
    return {"type": "error", "error": error}


class ConfigError(TiergateError):
    """Settings, policy or model artifacts are invalid.

    Raised at start or on reload, never per request.
    """

    code = "config_error"
    should_retry = False


class MissingExtraError(ConfigError):
    """A feature needs an optional part of Tiergate that is not installed; the message names the
    extra to install, in one line."""

    code = "missing_extra"

    def __init__(self, feature: str, extra: str) -> None:
        super().__init__(f"{feature} needs the '{extra}' extra: pip install 'tiergate[{extra}]'")


class ArtifactError(ConfigError):
    """A model artifact is missing, foreign, tampered with, or from other library versions."""

    code = "model_artifact_error"


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    """One problem in a policy file, located for the person who wrote it.

    ``path`` is the key path in words (``rules[2].when.capability``; list indexes count from 0),
    ``line``/``column`` are 1-based and ``None`` when the problem has no place in the text (for
    example a file that cannot be read).
    """

    source: str
    line: int | None
    column: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.source
        if self.line is not None:
            where += f":{self.line}:{self.column or 1}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class PolicyError(ConfigError):
    """A policy file is invalid. ``issues`` lists every problem found, each with file and line."""

    code = "policy_error"

    def __init__(self, issues: Sequence[PolicyIssue]) -> None:
        self.issues: tuple[PolicyIssue, ...] = tuple(issues)
        count = len(self.issues)
        head = f"invalid policy: {count} problem{'s' if count != 1 else ''}"
        super().__init__("\n".join([head, *(f"  {issue}" for issue in self.issues)]))


class BadRequestError(TiergateError):
    """The request is malformed or asks for something the chosen tier cannot honour (400)."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class OverWindowError(BadRequestError):
    """A model found the prompt, with the room the request asked for the answer, over its
    context window (the policy's estimate let it through). Its ``param`` is the output limit
    where the prompt fits alone (the part a client can change without losing history), else
    the prompt; both, and the limit its message names, are the chat request's until
    :meth:`name_fields` names them as the client's front does. The message says which: a
    prompt that fits is not called longer than the window, and the room it leaves is the
    largest output limit the model takes with it."""

    code = "context_length_exceeded"

    def __init__(self, model: str, prompt_tokens: int, asked: int, window: int) -> None:
        self.model, self.prompt_tokens = model, prompt_tokens
        self.asked, self.window = asked, window
        # A prompt as long as the window leaves no room for any answer (llama.cpp needs one
        # token): no output limit fixes it, so the prompt is the field, as a longer one is.
        param = "max_tokens" if prompt_tokens < window else "messages"
        super().__init__(self._words("max_tokens"), param=param)

    def _words(self, output: str) -> str:
        if self.prompt_tokens < self.window:
            left = self.window - self.prompt_tokens
            why = (
                f"the prompt fits {self.model}'s context window but leaves {left} tokens, "
                "fewer than the answer asked"
            )
        elif self.prompt_tokens == self.window:
            why = f"the prompt fills {self.model}'s context window"
        else:
            why = f"the prompt is longer than {self.model}'s context window"
        return (
            f"{why}: Requested tokens ({self.prompt_tokens} in the prompt + {output} "
            f"{self.asked}) exceed context window of {self.window}"
        )

    def name_fields(self, name: Callable[[str], str]) -> None:
        """The param, and the output limit in the message, as ``name`` gives them."""
        super().name_fields(name)
        self.message = self._words(name("max_tokens"))
        self.args = (self.message,)


class ThreadUnsupportedError(BadRequestError):
    """A Messages request with ``thread``, Anthropic's conversation held by the server between
    turns: Tiergate holds none, and a later turn sends only its new messages. Anthropic's code
    for a request it cannot thread makes the Anthropic SDKs' tool runner send the whole
    conversation again, without ``thread``."""

    anthropic_code = "thread_unsupported_request"


class UnsupportedEncodingError(BadRequestError):
    """A request body in a ``Content-Encoding`` Tiergate does not decode (gzip and the like):
    415, rather than a 400 about the bytes it could not read as JSON."""

    status_code = 415
    code = "unsupported_content_encoding"


class AuthenticationError(TiergateError):
    """Missing or unknown API key (401)."""

    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(TiergateError):
    """The key is valid but may not do this (403)."""

    status_code = 403
    error_type = "permission_error"
    code = "permission_denied"


class NotFoundError(TiergateError):
    """Unknown model or resource (404)."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class PayloadTooLargeError(TiergateError):
    """Request body over the configured limit (413)."""

    status_code = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


class RateLimitError(TiergateError):
    """Too many requests: a tenant limit, a full local queue, or an upstream 429 (429)."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limited"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        code: str | None = None,
        should_retry: bool | None = None,
    ):
        headers = {"retry-after": str(max(1, round(retry_after)))} if retry_after else None
        super().__init__(message, code=code, headers=headers, should_retry=should_retry)
        self.retry_after = retry_after


class LocalOverloadedError(RateLimitError):
    """The local model's queue is full."""

    code = "local_queue_full"


#: The ``Retry-After`` of a budget refusal owed to the holds of requests in flight: they are
#: settled as those requests end (most within seconds), freeing what they did not spend.
BUDGET_HELD_RETRY_S = 5.0


class BudgetExceededError(RateLimitError):
    """The tenant's daily budget is spent (or held by requests in flight) and its policy says
    reject. Spent, a retry cannot help before the budget's day (UTC) ends:
    ``x-should-retry: false`` (OpenAI's SDKs would retry a 429 twice, each one recorded), and
    ``Retry-After`` says when it ends. ``held`` (the spend alone is under the budget): the
    holds free as their requests end, so ``x-should-retry: true`` and a ``Retry-After`` of
    :data:`BUDGET_HELD_RETRY_S`. ``outage_s`` (held, but by the outcome store's outage, which
    no hold's end frees): ``x-should-retry: false`` and a ``Retry-After`` of ``outage_s``, the
    wait before the replica asks the store again."""

    code = "budget_exceeded"
    should_retry = False

    def __init__(
        self,
        message: str,
        *,
        now: float | None = None,
        held: bool = False,
        outage_s: float | None = None,
    ) -> None:
        if held and outage_s is not None:
            super().__init__(message, retry_after=outage_s, should_retry=False)
            return
        if held:
            super().__init__(message, retry_after=BUDGET_HELD_RETRY_S, should_retry=True)
            return
        now = time.time() if now is None else now
        super().__init__(message, retry_after=86400 - now % 86400)


#: The longest a provider's ``Retry-After`` is taken at its word: what a client is told to wait
#: (a final upstream 429 or 503) and how long the model cools (router.cooldown). A provider that
#: asks for a day (a spent quota) speaks of its own key; Tiergate probes the model again after
#: this long, and tells its clients no longer wait than it does itself.
MAX_RETRY_AFTER_S = 120.0


class BackendError(TiergateError):
    """A backend failed while serving (502).

    ``retryable`` failures may fall back to another tier.
    """

    status_code = 502
    error_type = "api_error"
    code = "upstream_error"
    retryable: bool = True
    # Whether it counts toward its model's cooldown (router.cooldown), when retryable: False
    # where nothing shows that the provider failed.
    cools: bool = True

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        upstream_status: int | None = None,
        retry_after: float | None = None,
        param: str | None = None,
    ) -> None:
        # An upstream Retry-After reaches the client when this error is the final answer (at
        # most MAX_RETRY_AFTER_S), and so does the request field a provider's 400 names.
        if retry_after is not None:
            retry_after = min(retry_after, MAX_RETRY_AFTER_S) if retry_after > 0 else None
        headers = {"retry-after": str(max(1, round(retry_after)))} if retry_after else None
        super().__init__(message, code=code, param=param, headers=headers)
        self.upstream_status = upstream_status
        self.retry_after = retry_after

    def restated(self, message: str) -> BackendError:
        """The same failure (class, status, code, param, Retry-After) with a new message."""
        return type(self)(
            message,
            code=self.code,
            upstream_status=self.upstream_status,
            retry_after=self.retry_after,
            param=self.param,
        )


class ClientLibraryError(BackendError):
    """The library that calls the provider (litellm) failed in this process with a Python error
    (reading an answer it did not expect, say) and called it a connection error: nothing shows
    that the provider failed (502 ``upstream_error``). The chain still tries its next model,
    but the failure does not cool its model: a tenant's request shaped to trip it would
    otherwise cool the model for every tenant. One while translating the request, before
    anything was sent, is the request's: a :class:`BadRequestError`."""

    cools = False


class ModelSettingsError(BackendError):
    """A closed model's own settings (its ``api_base``, its provider's variables) could not
    make the call: the client for it could not be built, and nothing was sent (502
    ``model_misconfigured``). Its operator fixes it, not a retry (``x-should-retry:
    false``). The chain still tries its next model; it does not cool its model, whose calls
    fail at once, before the provider (router.cooldown)."""

    code = "model_misconfigured"
    should_retry = False
    cools = False


class UpstreamRateLimitedError(BackendError):
    """The provider answered 429."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "upstream_rate_limited"


class UpstreamOverloadedError(BackendError):
    """The provider answered that it is overloaded: 503, or Anthropic's 529
    ``overloaded_error`` (503 ``upstream_overloaded``, with the provider's ``Retry-After``
    when it sent one; on the ``/v1/messages`` front 529 ``overloaded_error``, as Anthropic
    answers). Not a fault of the request: the chain tries its next model, and a client whose
    chain ends on it may retry later, as the status says."""

    status_code = 503
    error_type = "service_unavailable"
    code = "upstream_overloaded"
    anthropic_type = "overloaded_error"  # Anthropic's own word for it
    anthropic_status = 529  # and its status, which Anthropic's SDKs raise OverloadedError for


class UpstreamRequestTooLargeError(UpstreamRateLimitedError):
    """The provider answered 429 because this one request is over its tokens-per-minute limit
    (OpenAI's "Request too large ... on tokens per min"): every retry of it meets the same
    answer (``x-should-retry: false``, no ``Retry-After``). The chain still tries its next
    model, which may take it, but the model does not cool down (router.cooldown): as a rate
    limit, one tenant's one large request cooled the model for every tenant."""

    should_retry = False
    cools = False


class UpstreamBadResponseError(BackendError):
    """The provider answered 2xx with something that is not an OpenAI answer (502)."""

    code = "upstream_bad_response"


class UpstreamTimeoutError(BackendError):
    """The provider or local model did not answer in time (504)."""

    status_code = 504
    code = "upstream_timeout"


class UpstreamAuthError(BackendError):
    """The provider refused the key Tiergate sent it (401, 403): Tiergate's configuration, which
    a client's retry cannot fix (``x-should-retry: false``). The chain still tries its next
    model, which may be another provider's with a key that works. It does not cool its model
    (router.cooldown): a key is fixed by its operator, not by waiting."""

    should_retry = False
    cools = False


class UpstreamNotFoundError(BackendError):
    """The provider answered that the model does not exist (404, OpenAI's ``model_not_found``
    in an error event, Anthropic's ``not_found_error``), or the ``api_base`` is wrong (a 404
    that names no field or id of the request: one that does is the request's own,
    :class:`UpstreamBadRequestError`, router.backends.openai_http): the
    model's configuration, not the request's, and a client's retry cannot fix it (502,
    ``x-should-retry: false``). The chain goes on to its next model, and the model cools down
    as after any failure, so it is not tried on every request meanwhile."""

    should_retry = False


class UpstreamBadRequestError(BackendError):
    """The provider rejected the request as invalid (400); falling back would not help."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "upstream_bad_request"
    retryable = False


class TierUnavailableError(TiergateError):
    """No model on the request's chain could be tried (503): no provider key, the local model
    not loaded or switched off, or a tier that cannot honour the request. A model that was
    tried and failed is answered with its own :class:`BackendError` (502, 504, 429)."""

    status_code = 503
    error_type = "service_unavailable"
    code = "tier_unavailable"


class StoreUnavailableError(TiergateError):
    """The outcome store cannot be read right now (Redis down); writes are buffered meanwhile."""

    status_code = 503
    error_type = "server_error"
    code = "store_unavailable"


class ServerShuttingDownError(TiergateError):
    """The server stopped the request at shutdown: it was still running when
    ``TIERGATE_SHUTDOWN_TIMEOUT_S`` ran out (or at a second Ctrl-C). Another replica, or this
    one restarted, can serve it: 503 with ``x-should-retry: true``."""

    status_code = 503
    error_type = "service_unavailable"
    code = "server_shutting_down"
    should_retry = True


class ClientDisconnected(TiergateError):  # noqa: N818 (a state, not an error)
    """The client went away mid-request; recorded as ``aborted``, never sent."""

    status_code = 499
    error_type = "client_closed_request"
    code = "client_disconnected"
