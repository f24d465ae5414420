"""The HTTP server ``tiergate serve`` runs: uvicorn, with a bound on a request's head.

uvicorn's default parser (httptools) buffers a request line and headers for as long as a client
sends them, so a few unauthenticated connections could grow the server without bound.
:class:`BoundedHttpTools` counts the bytes of each request head and answers
431 and closes the connection past :data:`MAX_HEAD_BYTES`. Where httptools is missing, uvicorn's
h11 parser is used with the same bound (``h11_max_incomplete_event_size``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import uvicorn

    from router.config import Settings

# A request line plus headers past this is refused (nginx: 32 KiB, Node: 16 KiB by default).
MAX_HEAD_BYTES = 64 * 1024

_REFUSAL = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
)
_BODY = (
    b'{"error":{"message":"request line and headers are over the %d-byte limit",'
    b'"type":"invalid_request_error","param":null,"code":"headers_too_large"}}' % MAX_HEAD_BYTES
)


def _bounded_httptools() -> type[Any] | None:
    """uvicorn's httptools protocol with a bounded request head, or None without httptools."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class BoundedHttpTools(HttpToolsProtocol):
        """Counts the bytes received while a request's head is incomplete; past
        :data:`MAX_HEAD_BYTES` the client gets a 431 and the connection is closed."""

        _in_head = True
        _head_bytes = 0
        _messages = 0

        def data_received(self, data: bytes) -> None:
            # Counted after parsing, and only when all of ``data`` went into one unfinished
            # head: body bytes read together with a head's end, or a request that ended in
            # this read (a read is up to 256 KiB), do not count.
            messages = self._messages
            super().data_received(data)
            if not self._in_head or self._messages != messages or self.transport.is_closing():
                return
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._in_head = False
                self.transport.write(_REFUSAL % (len(_BODY), _BODY))
                self.transport.close()

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            # The next bytes on a kept-alive connection start the next request's head.
            self._in_head, self._head_bytes = True, 0
            self._messages += 1
            super().on_message_complete()

    return BoundedHttpTools


def uvicorn_config(
    app: Any, settings: Settings, *, lifespan: Literal["on", "off"] = "on"
) -> uvicorn.Config:
    """The uvicorn configuration ``tiergate serve`` runs ``app`` with (``lifespan="off"`` when
    the caller runs the app's lifespan itself)."""
    import uvicorn

    protocol = _bounded_httptools()
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        log_config=None,  # keep the JSON logging configured by the caller
        lifespan=lifespan,
        http=protocol if protocol is not None else "h11",
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
    )
