"""Talk to any OpenAI-compatible ``/chat/completions`` endpoint over one pooled httpx client.

Used for closed ``openai/...`` models (OpenAI itself or any compatible base URL) and for an
external llama.cpp server on the local tier (``llama-server`` or ``llama_cpp.server``). Calling
the endpoint directly keeps the proxy's added latency far below a litellm round trip; see
``bench/README.md``. httpx failures are mapped to :mod:`router.errors` here, in one place.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from router.backends import Completion, Usage, usage_from_body
from router.errors import (
    BackendError,
    TiergateError,
    UpstreamBadRequestError,
    UpstreamRateLimitedError,
    UpstreamTimeoutError,
    scrub,
)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _upstream_message(response: httpx.Response) -> str:
    try:
        payload = response.json()
        message = payload.get("error", {}).get("message") if isinstance(payload, dict) else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        message = None
    return str(message or response.reason_phrase or "error")[:500]


def error_for_status(
    response: httpx.Response, label: str, api_key: str | None = None
) -> BackendError:
    """Map an upstream HTTP error status to the Tiergate error a client and the fallback see.

    The upstream's message is repeated with credentials scrubbed (some providers echo keys).
    """
    status = response.status_code
    message = f"{label} answered {status}: {scrub(_upstream_message(response), [api_key])}"
    if status == 429:
        return UpstreamRateLimitedError(
            message, upstream_status=status, retry_after=_retry_after(response)
        )
    if status in (400, 413, 422):
        return UpstreamBadRequestError(message, upstream_status=status)
    if status in (408, 504):
        return UpstreamTimeoutError(message, upstream_status=status)
    return BackendError(message, upstream_status=status)


def map_transport_error(exc: httpx.HTTPError, label: str) -> TiergateError:
    """Map an httpx transport failure (timeout, refused, reset) to a Tiergate error."""
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeoutError(f"{label} timed out ({type(exc).__name__})")
    return BackendError(f"{label} unreachable: {type(exc).__name__}", code="upstream_unreachable")


class OpenAIHTTP:
    """A pooled client for one or more OpenAI-compatible base URLs."""

    def __init__(self, *, timeout_s: float, max_connections: int = 512) -> None:
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )

    async def complete(
        self,
        base_url: str,
        body: dict[str, Any],
        *,
        api_key: str | None,
        label: str,
        timeout_s: float | None = None,
    ) -> Completion:
        """POST a non-streaming request; return the parsed body and its usage."""
        try:
            response = await self._client.post(
                _endpoint(base_url),
                json={**body, "stream": False},
                headers=_auth(api_key),
                timeout=timeout_s if timeout_s is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.HTTPError as exc:
            raise map_transport_error(exc, label) from exc
        if response.status_code >= 400:
            raise error_for_status(response, label, api_key)
        try:
            payload = response.json()
        except json.JSONDecodeError as exc:
            raise BackendError(f"{label} sent a body that is not JSON") from exc
        if not isinstance(payload, dict) or "choices" not in payload:
            raise BackendError(f"{label} sent a body without 'choices'")
        return Completion(body=payload, usage=usage_from_body(payload))

    async def stream(
        self,
        base_url: str,
        body: dict[str, Any],
        usage: Usage,
        *,
        api_key: str | None,
        label: str,
        timeout_s: float | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """POST a streaming request and yield each SSE ``data:`` chunk as a dict.

        Usage is always asked of the upstream (``stream_options.include_usage``) so the record
        has real token counts; the usage-only chunk is passed on only if the client asked for it.
        """
        options = dict(body.get("stream_options") or {})
        options["include_usage"] = True
        request = {**body, "stream": True, "stream_options": options}
        try:
            async with self._client.stream(
                "POST",
                _endpoint(base_url),
                json=request,
                headers=_auth(api_key),
                timeout=timeout_s if timeout_s is not None else httpx.USE_CLIENT_DEFAULT,
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise error_for_status(response, label, api_key)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        chunk = json.loads(data)
                    except json.JSONDecodeError as exc:
                        raise BackendError(f"{label} sent a chunk that is not JSON") from exc
                    if chunk.get("usage"):
                        got = usage_from_body(chunk)
                        usage.prompt_tokens = got.prompt_tokens
                        usage.completion_tokens = got.completion_tokens
                    yield chunk
        except httpx.HTTPError as exc:
            raise map_transport_error(exc, label) from exc

    async def aclose(self) -> None:
        """Close pooled connections."""
        await self._client.aclose()


def _endpoint(base_url: str) -> str:
    return base_url.rstrip("/") + "/chat/completions"


def _auth(api_key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}
