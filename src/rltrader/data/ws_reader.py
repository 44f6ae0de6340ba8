"""The live ingester's websocket client: a Sans-I/O frame parser fed straight from the asyncio transport.

Why not python-binance's socket (``websockets`` underneath): profiled at full rate, ``websockets`` spent more
CPU per message than everything the ingester does with it: a frame object, an enum lookup, three
``read_exact`` generator steps, a message-assembler queue and a ``recv()`` coroutine per message. A server's
frames are simple (RFC 6455 §5.2: unmasked, a 2-10 byte header, then the payload), so here every buffer the
transport hands over (up to 256 KiB, hundreds of frames) is cut into payloads in one tight loop
(:class:`FrameParser`), and the consumer takes all complete messages in one call (:meth:`WsConnection.batch`).

What the protocol requires is still done: the opening handshake is verified (status 101, ``Sec-WebSocket-
Accept``, no extension we did not offer), fragmented messages are reassembled (control frames may arrive
between the fragments), pings are answered with pongs, a close frame is answered and ends the connection,
and anything malformed (masked server frame, reserved bits, unknown opcode, oversized control frame, a
message over ``max_size``) fails the connection with :class:`WebSocketProtocolError` (close code 1002).
All failures are :class:`ConnectionError` subclasses, so the ingester reconnects (and repairs) on them.

Flow control: when ``high_water`` messages are waiting the transport stops reading (TCP back-pressure on the
sender) until the consumer takes them, instead of python-binance's queue overflow that dropped the
connection. A paused transport does not read, so it cannot see the peer's EOF or close frame either: the
end shows once the consumer has taken the messages before it (which resumes reading), and :meth:`WsConnection.
close` resumes reading and drops what arrives, so closing a paused connection neither waits for a close reply
it could never read nor leaves the socket in CLOSE-WAIT. Every wait here is bounded: the handshake by
``connect``'s ``timeout``, :meth:`~WsConnection.batch` by its ``timeout``, the close handshake by ``close``'s.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import ssl
from urllib.parse import urlsplit

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
MAX_MESSAGE = 16 * 1024 * 1024
"""Largest message accepted (Binance's are < 10 KiB); bigger fails the connection instead of eating memory."""


class WebSocketProtocolError(ConnectionError):
    """The server broke RFC 6455 (or the handshake failed): the connection is unusable."""


class WebSocketClosed(ConnectionError):
    """The connection ended (close frame, reset, EOF); ``code`` is the close code when the server sent one."""

    def __init__(self, detail: str, code: int | None = None) -> None:
        super().__init__(detail)
        self.code = code


# -- Sans-I/O frame parsing ----------------------------------------------------------------------------------
class FrameParser:
    """Cuts a server's byte stream into messages; no I/O, so it is tested by feeding it bytes.

    ``feed`` appends every complete data message (text or binary payload, reassembled if fragmented) to
    ``messages`` and every control frame to ``controls`` as ``(opcode, payload)``, in arrival order within
    each list. Unfragmented text frames (opcode 1, FIN set: all of Binance's) take the fast path: two
    byte reads, a length and a slice. A frame cut by the read boundary waits for the rest; a long frame
    arriving in many reads is collected in a list and joined once (no quadratic re-copying).
    """

    def __init__(self, max_size: int = MAX_MESSAGE) -> None:
        self.max_size = max(max_size, 125)
        self.messages: list[bytes] = []
        self.controls: list[tuple[int, bytes]] = []
        self._buf = b""
        self._pending: list[bytes] = []  # reads of one frame longer than what has arrived so far
        self._pending_have = 0
        self._pending_need = 0
        self._frag: list[bytes] | None = None  # the fragments of a message in progress
        self._frag_size = 0

    def feed(self, data: bytes) -> None:
        if self._pending:
            self._pending.append(data)
            self._pending_have += len(data)
            if self._pending_have < self._pending_need:
                return
            buf = b"".join(self._pending)
            self._pending.clear()
            self._pending_have = self._pending_need = 0
        else:
            buf = self._buf + data if self._buf else data
        n = len(buf)
        pos = 0
        out = self.messages
        while n - pos >= 2:
            b0 = buf[pos]
            ln = buf[pos + 1]
            if ln < 126:
                start = pos + 2
            elif ln == 126:
                if n - pos < 4:
                    break
                ln = (buf[pos + 2] << 8) | buf[pos + 3]
                start = pos + 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln = int.from_bytes(buf[pos + 2:pos + 10], "big")
                start = pos + 10
                if ln >> 63:
                    raise WebSocketProtocolError("frame length has its most significant bit set")
            else:
                raise WebSocketProtocolError("masked frame from the server")
            if ln > 125 and ln > self.max_size:  # (max_size is at least 125: every frame < 126 passes)
                raise WebSocketProtocolError(f"frame of {ln} bytes exceeds the limit of {self.max_size}")
            end = start + ln
            if end > n:
                if end - pos > 65536:  # a long frame: collect its reads, join once
                    self._pending = [buf[pos:]]
                    self._pending_have = n - pos
                    self._pending_need = end - pos
                    self._buf = b""
                    return
                break
            if b0 == 0x81 and self._frag is None:  # FIN + text, not inside a fragmented message
                out.append(buf[start:end])
            else:
                self._frame(b0, buf[start:end])
            pos = end
        self._buf = buf[pos:] if pos < n else b""

    def _frame(self, b0: int, payload: bytes) -> None:
        if b0 & 0x70:
            raise WebSocketProtocolError("reserved bits set (no extension was negotiated)")
        op, fin = b0 & 0x0F, b0 & 0x80
        if op >= OP_CLOSE:
            if op not in (OP_CLOSE, OP_PING, OP_PONG):
                raise WebSocketProtocolError(f"unknown control opcode {op:#x}")
            if not fin or len(payload) > 125:
                raise WebSocketProtocolError("fragmented or oversized control frame")
            self.controls.append((op, payload))
            return
        if op == OP_CONT:
            if self._frag is None:
                raise WebSocketProtocolError("continuation frame without a message to continue")
            self._frag.append(payload)
            self._frag_size += len(payload)
        elif op in (OP_TEXT, OP_BINARY):
            if self._frag is not None:
                raise WebSocketProtocolError("new data frame inside a fragmented message")
            self._frag, self._frag_size = [payload], len(payload)
        else:
            raise WebSocketProtocolError(f"unknown data opcode {op:#x}")
        if self._frag_size > self.max_size:
            raise WebSocketProtocolError(f"message exceeds the limit of {self.max_size} bytes")
        if fin:
            self.messages.append(b"".join(self._frag))
            self._frag = None
            self._frag_size = 0


def client_frame(opcode: int, payload: bytes = b"") -> bytes:
    """One masked client frame (clients must mask, RFC 6455 §5.3); only small control frames are sent."""
    n = len(payload)
    if n > 125:
        raise ValueError("control payloads are at most 125 bytes")
    mask = os.urandom(4)
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes((mask * (n // 4 + 1))[:n], "big")).to_bytes(n, "big")
    return bytes((0x80 | opcode, 0x80 | n)) + mask + masked


# -- the connection --------------------------------------------------------------------------------------------
class WsConnection(asyncio.Protocol):
    """One client connection; create with :func:`connect`. The consumer calls :meth:`batch` in a loop."""

    def __init__(self, host: str, path: str, *, max_size: int = MAX_MESSAGE, high_water: int = 100_000) -> None:
        self.parser = FrameParser(max_size)
        self.high_water = high_water
        self._host, self._path = host, path
        self._key = base64.b64encode(os.urandom(16))
        self._head = b""
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self._lost: asyncio.Future[None] = loop.create_future()
        self._waiter: asyncio.Future[None] | None = None
        self._transport: asyncio.Transport | None = None
        self._paused = False
        self._close_sent = False
        self._discard = False  # closing: what still arrives is dropped, never buffered (nor pauses reading)
        self.closed: WebSocketClosed | WebSocketProtocolError | None = None

    # asyncio.Protocol -------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(
            f"GET {self._path} HTTP/1.1\r\nHost: {self._host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {self._key.decode()}\r\nSec-WebSocket-Version: 13\r\n"
            "User-Agent: rltrader\r\n\r\n".encode())

    def data_received(self, data: bytes) -> None:
        if not self.opened.done():
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > 65536:
                    self._fail(WebSocketProtocolError("handshake response headers too long"))
                return
            head, data = self._head[:end], self._head[end + 4:]
            self._head = b""
            try:
                self._check_handshake(head)
            except WebSocketProtocolError as exc:
                self._fail(exc)
                return
            self.opened.set_result(None)
            if not data:
                return
        parser = self.parser
        try:
            parser.feed(data)
        except WebSocketProtocolError as exc:
            self._fail(exc, 1002)
        if parser.controls:
            self._on_controls()
        if self._discard:
            parser.messages.clear()
        elif len(parser.messages) >= self.high_water and not self._paused and self._transport is not None:
            self._transport.pause_reading()
            self._paused = True
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost reports it

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed is None:
            detail = (f"connection lost: {type(exc).__name__}: {exc}" if exc
                      else "connection closed without a close frame")
            self.closed = WebSocketClosed(detail, 1006)
        if not self.opened.done():
            self.opened.set_exception(self.closed)
        if not self._lost.done():
            self._lost.set_result(None)
        self._wake()

    # internals --------------------------------------------------------------------------------------------
    def _check_handshake(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)
        if len(status) < 2 or status[1] != "101":
            raise WebSocketProtocolError(f"handshake refused: {lines[0][:200]!r}")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        expected = base64.b64encode(hashlib.sha1(self._key + GUID).digest()).decode()
        if headers.get("upgrade", "").lower() != "websocket" or headers.get("sec-websocket-accept") != expected:
            raise WebSocketProtocolError("handshake response lacks the websocket upgrade or the right accept key")
        if headers.get("sec-websocket-extensions"):
            raise WebSocketProtocolError(f"server chose an extension we did not offer: "
                                         f"{headers['sec-websocket-extensions'][:100]!r}")

    def _on_controls(self) -> None:
        for op, payload in self.parser.controls:
            if op == OP_PING:
                self._send(OP_PING + 1, payload)  # the pong echoes the ping's payload
            elif op == OP_CLOSE and self.closed is None:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                reason = payload[2:].decode("utf-8", "replace")
                self.closed = WebSocketClosed(f"closed by the server: {code} {reason}".strip(), code)
                self._send(OP_CLOSE, payload[:2])
                if self._transport is not None:
                    self._transport.close()  # flushes the close frame first
        self.parser.controls.clear()

    def _send(self, op: int, payload: bytes = b"") -> None:
        if self._transport is None or self._transport.is_closing() or self._close_sent:
            return
        if op == OP_CLOSE:
            self._close_sent = True
        self._transport.write(client_frame(op, payload))

    def _fail(self, exc: WebSocketProtocolError, code: int | None = None) -> None:
        if self.closed is None:
            self.closed = exc
        if code is not None:
            self._send(OP_CLOSE, code.to_bytes(2, "big"))
        if not self.opened.done():
            self.opened.set_exception(exc)
        if self._transport is not None:
            self._transport.abort()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    @property
    def paused(self) -> bool:
        """Reading is paused by back-pressure (``high_water`` messages wait for the consumer)."""
        return self._paused

    # the consumer's side ----------------------------------------------------------------------------------
    async def batch(self, timeout: float, max_n: int = 20_000) -> list[bytes]:
        """Up to ``max_n`` complete messages, waiting at most ``timeout`` s for the first ([] on timeout).

        Raises the reason the connection ended once every message received before the end was taken.
        """
        msgs = self.parser.messages
        if not msgs:
            if self.closed is not None:
                raise self.closed
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._waiter
            except TimeoutError:
                return []
            finally:
                self._waiter = None
            msgs = self.parser.messages
            if not msgs:
                if self.closed is not None:
                    raise self.closed
                return []
        if len(msgs) > max_n:
            out = msgs[:max_n]
            del msgs[:max_n]
        else:
            out = msgs
            self.parser.messages = []
        if self._paused and self._transport is not None and len(self.parser.messages) < self.high_water:
            self._paused = False
            self._transport.resume_reading()
        return out

    async def close(self, code: int = 1000, timeout: float = 2.0) -> None:
        """Send a close frame, wait briefly (``timeout``) for the server's close, then drop the connection.

        Buffered messages are dropped and reading resumes if back-pressure paused it: otherwise the server's
        close reply (or its EOF) could never be read and the wait would always run to its end.
        """
        if self._transport is None:
            return
        self._discard = True
        self.parser.messages = []
        if self._paused:
            self._paused = False
            with contextlib.suppress(Exception):
                self._transport.resume_reading()
        if not self._transport.is_closing():
            self._send(OP_CLOSE, code.to_bytes(2, "big"))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.shield(self._lost)
        self._transport.abort()
        if self.closed is None:
            self.closed = WebSocketClosed("closed by us", code)


async def connect(url: str, *, timeout: float = 10.0, max_size: int = MAX_MESSAGE,
                  high_water: int = 100_000) -> WsConnection:
    """Open ``ws://`` or ``wss://`` ``url`` and complete the handshake (within ``timeout`` s)."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a websocket URL: {url!r}")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    loop = asyncio.get_running_loop()
    conn = WsConnection(host, path, max_size=max_size, high_water=high_water)
    transport: asyncio.Transport | None = None
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(
                lambda: conn, parts.hostname, port, ssl=ssl.create_default_context() if secure else None)
            await conn.opened
    except BaseException as exc:
        conn.opened.cancel()  # (no-op if already failed) nobody awaits it any more: no "never retrieved" noise
        if transport is not None:
            transport.abort()
        if isinstance(exc, TimeoutError):
            stage = "handshake" if transport is not None else "TCP connect"
            raise TimeoutError(f"websocket {parts.scheme}://{host}{parts.path or '/'}: no {stage} within "
                               f"{timeout:g} s") from exc
        raise
    return conn


__all__ = ["FrameParser", "WebSocketClosed", "WebSocketProtocolError", "WsConnection", "client_frame", "connect"]
