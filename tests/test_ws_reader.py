"""The ingester's own websocket client against the ``websockets`` library: its frames byte for byte (every length
encoding, fragmentation with control frames in between, every possible read boundary) and a live ``websockets``
server on loopback (handshake, fragmented sends, ping/pong, close codes, a refused handshake)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Request, Response

from rltrader.data.ws_reader import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    FrameParser,
    WebSocketClosed,
    WebSocketProtocolError,
    client_frame,
    connect,
)


def ser(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
    """A server frame as the ``websockets`` library writes it."""
    return Frame(opcode, data, fin).serialize(mask=False)


def feed_split(stream: bytes, cuts: list[int], max_size: int = 1 << 24) -> FrameParser:
    p = FrameParser(max_size)
    prev = 0
    for c in [*cuts, len(stream)]:
        p.feed(stream[prev:c])
        prev = c
    return p


SMALL = b'{"e":"aggTrade","s":"BTCUSDT","a":1}'
MID = json.dumps({"pad": "x" * 300}).encode()  # 16-bit length
BIG = json.dumps({"pad": "y" * 70_000}).encode()  # 64-bit length

# text, 16-bit, a fragmented message with a ping and a pong between its fragments, binary, close
MIXED = b"".join([
    ser(Opcode.TEXT, SMALL),
    ser(Opcode.TEXT, MID),
    ser(Opcode.TEXT, b'{"part":', fin=False),
    ser(Opcode.PING, b"are you there"),
    ser(Opcode.CONT, b'"one', fin=False),
    ser(Opcode.PONG, b""),
    ser(Opcode.CONT, b'"}'),
    ser(Opcode.BINARY, b"[1,2,3]"),
    ser(Opcode.CLOSE, Close(1001, "going away").serialize()),
])
MIXED_MESSAGES = [SMALL, MID, b'{"part":"one"}', b"[1,2,3]"]
MIXED_CONTROLS = [(OP_PING, b"are you there"), (OP_PONG, b""), (OP_CLOSE, Close(1001, "going away").serialize())]


def test_parser_reads_websockets_frames_split_at_every_byte_boundary() -> None:
    for cut in range(len(MIXED) + 1):
        p = feed_split(MIXED, [cut])
        assert p.messages == MIXED_MESSAGES, cut
        assert p.controls == MIXED_CONTROLS, cut
    one_by_one = feed_split(MIXED, list(range(1, len(MIXED))))
    assert one_by_one.messages == MIXED_MESSAGES and one_by_one.controls == MIXED_CONTROLS


def test_parser_64_bit_length_and_long_frames_over_many_reads() -> None:
    stream = ser(Opcode.TEXT, SMALL) + ser(Opcode.TEXT, BIG) + ser(Opcode.TEXT, SMALL)
    assert stream[len(ser(Opcode.TEXT, SMALL)) + 1] == 127  # really the 64-bit length form
    for step in (1, 7, 4096, 65_536, 100_000):
        p = feed_split(stream, list(range(step, len(stream), step)))
        assert p.messages == [SMALL, BIG, SMALL], step
    # a fragmented big message whose fragments use every length form
    frags = ser(Opcode.TEXT, BIG[:100], fin=False) + ser(Opcode.CONT, BIG[100:400], fin=False) + \
        ser(Opcode.CONT, BIG[400:])
    assert feed_split(frags, list(range(999, len(frags), 999))).messages == [BIG]


@pytest.mark.parametrize(("stream", "match"), [
    (Frame(Opcode.TEXT, SMALL).serialize(mask=True), "masked"),
    (bytes((0xC1, len(SMALL))) + SMALL, "reserved bits"),  # RSV1: compression we never asked for
    (bytes((0x83, 1)) + b"x", "unknown data opcode"),
    (bytes((0x8B, 0)), "unknown control opcode"),
    (ser(Opcode.CONT, SMALL), "continuation frame without"),
    (ser(Opcode.TEXT, b"a", fin=False) + ser(Opcode.TEXT, b"b"), "inside a fragmented message"),
    (bytes((0x09, 0)), "fragmented or oversized control"),
    (bytes((0x89, 126, 0, 200)) + b"p" * 200, "fragmented or oversized control"),
    (bytes((0x81, 127)) + (1 << 63).to_bytes(8, "big"), "most significant bit"),
    (ser(Opcode.TEXT, b"z" * 2000), "exceeds the limit"),
    (ser(Opcode.TEXT, b"z" * 600, fin=False) + ser(Opcode.CONT, b"z" * 600), "exceeds the limit"),
])
def test_parser_rejects_protocol_violations(stream: bytes, match: str) -> None:
    with pytest.raises(WebSocketProtocolError, match=match):
        FrameParser(max_size=1000).feed(stream)


def test_client_frames_are_masked_and_read_back_by_websockets() -> None:
    from websockets.streams import StreamReader

    for op, payload in ((OP_PONG, b"are you there"), (OP_CLOSE, (1000).to_bytes(2, "big")), (OP_PING, b"")):
        raw = client_frame(op, payload)
        assert raw[1] & 0x80  # the mask bit
        reader = StreamReader()
        reader.feed_data(raw)
        gen = Frame.parse(reader.read_exact, mask=True)
        try:
            next(gen)
        except StopIteration as stop:
            frame: Frame = stop.value
        assert frame.opcode.value == op and frame.data == payload and frame.fin


# -- against a live websockets server ---------------------------------------------------------------------------
async def _serve(handler: Callable[[ServerConnection], object], **kw: object) -> tuple[object, str]:
    server = await serve(handler, "127.0.0.1", 0, **kw)  # type: ignore[arg-type]
    port = next(iter(server.sockets)).getsockname()[1]
    return server, f"ws://127.0.0.1:{port}/stream?streams=a@b/c@d"


def test_live_server_fragments_ping_and_close_code() -> None:
    seen: dict[str, object] = {}

    async def handler(ws: ServerConnection) -> None:
        seen["path"] = ws.request.path if ws.request else None
        await ws.send(SMALL.decode())
        await ws.send([b'{"part":', b'"one"}'])  # a fragmented binary message
        pong = await ws.ping(b"keepalive")
        await asyncio.wait_for(pong, 5)  # fails the handler unless our client answered the ping
        seen["pong"] = True
        await ws.send(BIG.decode())
        await ws.close(1001, "going away")

    async def main() -> None:
        server, url = await _serve(handler, compression=None)
        async with server:  # type: ignore[attr-defined]
            conn = await connect(url)
            got: list[bytes] = []
            with pytest.raises(WebSocketClosed) as closed:
                while True:
                    got += await conn.batch(5.0)
            await conn.close()
        assert got == [SMALL, b'{"part":"one"}', BIG]
        assert closed.value.code == 1001 and "going away" in str(closed.value)

    asyncio.run(main())
    assert seen == {"path": "/stream?streams=a@b/c@d", "pong": True}


def test_live_server_sees_our_close_and_a_refused_handshake_fails() -> None:
    codes: list[int | None] = []

    async def handler(ws: ServerConnection) -> None:
        await ws.send("hello")
        await ws.wait_closed()
        codes.append(ws.close_code)

    def refuse(conn: ServerConnection, request: Request) -> Response | None:
        return conn.respond(403, "no") if "forbidden" in request.path else None

    async def main() -> None:
        server, url = await _serve(handler, process_request=refuse)
        async with server:  # type: ignore[attr-defined]
            conn = await connect(url)  # the server offers compression only if asked: we do not ask
            assert await conn.batch(5.0) == [b"hello"]
            await conn.close(1000)
            with pytest.raises(WebSocketClosed):
                await conn.batch(0.1)
            with pytest.raises(WebSocketProtocolError, match=r"handshake refused.*403"):
                await connect(url.replace("/stream", "/forbidden"))
            for _ in range(100):
                if codes:
                    break
                await asyncio.sleep(0.01)
        assert codes == [1000]

    asyncio.run(main())


def test_batch_times_out_empty_and_caps_its_size() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.send([f"{i}" for i in range(1)])
        for i in range(50):
            await ws.send(str(i))
        await ws.wait_closed()

    async def main() -> None:
        server, url = await _serve(handler)
        async with server:  # type: ignore[attr-defined]
            conn = await connect(url)
            got: list[bytes] = []
            while len(got) < 51:
                part = await conn.batch(5.0, max_n=7)
                assert 0 < len(part) <= 7
                got += part
            assert await conn.batch(0.05) == []  # nothing more: a timeout is an empty batch, not an error
            await conn.close()
        assert got == [b"0", *(str(i).encode() for i in range(50))]

    asyncio.run(main())


def test_connect_failures_are_connection_errors_or_timeouts() -> None:
    """What the ingester reconnects on: a refused port, a server that never answers the handshake."""
    from rltrader.testing import free_port

    async def main() -> None:
        with pytest.raises(ConnectionError):
            await connect(f"ws://127.0.0.1:{free_port()}/")

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(65536)
            await asyncio.sleep(5)

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            with pytest.raises(TimeoutError):
                await connect(f"ws://127.0.0.1:{port}/", timeout=0.2)
        with pytest.raises(ValueError, match="not a websocket URL"):
            await connect("http://127.0.0.1/")

    asyncio.run(main())
