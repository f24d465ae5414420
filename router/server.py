"""The HTTP server ``tiergate serve`` runs: uvicorn, with a bound on a request's head.

uvicorn's default parser (httptools) buffers a request line and headers for as long as a client
sends them, so a few unauthenticated connections could grow the server without bound, and it
passes on a head of any size that arrives in one read. :class:`BoundedHttpTools` answers 431
and closes the connection when a request head is over :data:`MAX_HEAD_BYTES`: one still
unfinished after that many bytes, or a parsed one whose line and headers add up to more. Where
httptools is missing, uvicorn's h11 parser is used with the same two bounds
(``h11_max_incomplete_event_size``, :class:`BoundedH11`).

Both also bound how long a request may take to arrive, which uvicorn does not (its keep-alive
timeout runs only between requests): a client that opens a connection and sends nothing, or
trickles a head or a body a byte at a time, would hold its connection, and a file descriptor,
for ever. A head must be whole within :data:`HEAD_TIMEOUT_S` of its first byte (or of the
connection's opening), a body within :data:`BODY_TIMEOUT_S` of its head; past either, the
client gets a 408 and the connection is closed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import uvicorn

    from router.config import Settings

# A request line plus headers past this is refused (nginx: 32 KiB, Node: 16 KiB by default).
MAX_HEAD_BYTES = 64 * 1024
# Seconds for a request's head to arrive whole (nginx: 60, Apache: 20 to 40), and for its body
# after that (8 MiB at 70 KB/s; Node gives a whole request 300).
HEAD_TIMEOUT_S = 30.0
BODY_TIMEOUT_S = 120.0

_REFUSAL = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
)
_BODY = (
    b'{"error":{"message":"request line and headers are over the %d-byte limit",'
    b'"type":"invalid_request_error","param":null,"code":"headers_too_large"}}' % MAX_HEAD_BYTES
)


_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
)
_TIMEOUT_BODY = (
    b'{"error":{"message":"the request %s did not arrive within %d seconds",'
    b'"type":"invalid_request_error","param":null,"code":"request_timeout"}}'
)


def _head_size(method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]]) -> int:
    # The bytes of a request line and headers as sent: "GET /x HTTP/1.1\r\n", "name: value\r\n"
    # each, and the blank line that ends them.
    return len(method) + len(target) + 11 + sum(len(k) + len(v) + 4 for k, v in headers) + 2


class _HeadLimit:
    """What both bounded protocols share: the bytes of the request head parsed so far and,
    past :data:`MAX_HEAD_BYTES`, a parse error that uvicorn answers through
    ``send_400_response``, which then sends the 431 instead of its 400."""

    transport: Any
    loop: Any
    cycle: Any
    _parsed = 0
    _refused = False
    _deadline: Any = None  # the TimerHandle of the part of a request now awaited

    def _await_part(self, part: str | None) -> None:
        """Start the clock for ``part`` of a request ("head" or "body"), or stop it (None)."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if part is not None:
            seconds = HEAD_TIMEOUT_S if part == "head" else BODY_TIMEOUT_S
            self._deadline = self.loop.call_later(seconds, self._too_slow, part, seconds)

    def _too_slow(self, part: str, seconds: float) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        # Answered only where no answer is under way on the connection: for a slow head, the
        # one to the request before it has ended; for a slow body, its own has not begun (and
        # none to an earlier request it is pipelined behind). Else just closed.
        cycle = self.cycle
        if part == "head":
            idle = cycle is None or cycle.response_complete
        else:
            idle = not cycle.response_started
        if idle and not getattr(self, "pipeline", ()):
            body = _TIMEOUT_BODY % (part.encode(), seconds)
            self.transport.write(_TIMEOUT % (len(body), body))
        self.transport.close()

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._await_part("head")

    def connection_lost(self, exc: Exception | None) -> None:
        self._await_part(None)
        super().connection_lost(exc)  # type: ignore[misc]

    def _count(self, n: int, error: type[Exception] = ValueError) -> None:
        self._parsed += n
        if self._parsed > MAX_HEAD_BYTES:
            self._refused = True
            raise error("request head over the limit")

    def send_400_response(self, msg: str) -> None:
        if not self._refused:
            super().send_400_response(msg)  # type: ignore[misc]
        elif not self.transport.is_closing():
            _refuse(self.transport)


def _refuse(transport: Any) -> None:
    transport.write(_REFUSAL % (len(_BODY), _BODY))
    transport.close()


def _bounded_httptools() -> type[Any] | None:
    """uvicorn's httptools protocol with a bounded request head, or None without httptools."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class BoundedHttpTools(_HeadLimit, HttpToolsProtocol):
        """Counts the bytes received while a request's head is incomplete, and the bytes of
        its line and headers as the parser hands them over; past :data:`MAX_HEAD_BYTES` by
        either count the client gets a 431 and the connection is closed. A head or body too
        slow to arrive gets a 408 (:meth:`_HeadLimit._await_part`)."""

        _in_head = True
        _head_bytes = 0
        _messages = 0

        def data_received(self, data: bytes) -> None:
            # Counted after parsing, and only when all of ``data`` went into one unfinished
            # head: body bytes read together with a head's end, or a request that ended in
            # this read, do not count (the parser callbacks below count those heads).
            messages = self._messages
            super().data_received(data)
            if not self._in_head or self._messages != messages or self.transport.is_closing():
                return
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._in_head = False
                _refuse(self.transport)

        def on_message_begin(self) -> None:
            if self._deadline is None:  # a later request's head begins
                self._await_part("head")
            self._parsed = 0
            self._count(_head_size(b"OPTIONS", b"", ()))  # the longest common method
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:  # called once per read the URL spans
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._await_part("body")
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            # The next bytes on a kept-alive connection start the next request's head.
            self._in_head, self._head_bytes = True, 0
            self._messages += 1
            self._await_part(None)  # the next head's clock starts with its first byte
            super().on_message_complete()

    return BoundedHttpTools


def _bounded_h11() -> type[Any]:
    """uvicorn's h11 protocol refusing a parsed request whose head is over the limit (h11's
    ``max_incomplete_event_size`` bounds only heads still unfinished)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class BoundedH11(_HeadLimit, H11Protocol):
        """Answers 431 and closes for a request whose line and headers are over
        :data:`MAX_HEAD_BYTES`, before the application sees it, and 408 for one whose head or
        body is too slow to arrive."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            next_event = self.conn.next_event

            def bounded() -> Any:
                event = next_event()
                if isinstance(event, h11.Request):
                    self._parsed = 0
                    self._count(
                        _head_size(event.method, event.target, event.headers.raw_items()),
                        h11.RemoteProtocolError,
                    )
                    self._in_head = False
                    self._await_part("body")
                elif isinstance(event, h11.EndOfMessage):
                    # The next head's clock starts with its first byte, which may be here.
                    self._in_head = True
                    self._await_part("head" if self.conn.trailing_data[0] else None)
                return event

            self.conn.next_event = bounded  # type: ignore[method-assign]

        _in_head = True

        def data_received(self, data: bytes) -> None:
            if self._in_head and self._deadline is None:  # a later request's head begins
                self._await_part("head")
            super().data_received(data)

    return BoundedH11


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
        http=protocol if protocol is not None else _bounded_h11(),
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        # No timeout_graceful_shutdown: tiergate serve keeps TIERGATE_SHUTDOWN_TIMEOUT_S
        # itself, so that it, not uvicorn, stops the requests still running (router.cli).
    )
