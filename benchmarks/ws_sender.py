"""A websocket sender that is not the bottleneck: pre-serialised frames over loopback, from its own process.

    python benchmarks/ws_sender.py ARCHIVE SYMBOLS N     (prints ``ready PORT E0_MS RATE``; ``start WALL`` per client)

Why: the replay server builds and JSON-encodes every message as it sends it (aiohttp, one ``send_str`` and one
event-loop turn per message), which caps a consumer on this machine near 10 k msgs/s, so a benchmark fed by it
measures the server. Here the first ``N`` messages of the replay server's own event sequence (the same
``{"stream", "data"}`` frames, from :class:`rltrader.sim.ReplayServer`'s generator) are encoded once, before
``ready``, into raw websocket frames (``RATE``: messages per exchange-second). Each connection asks with its
URL prefix ``/<speed>/<count>/`` for the first ``count`` frames, written in large chunks either as fast as the
socket drains (speed 0) or paced on exchange time (speed = exchange-seconds per wall-second: a frame with event
time E is written at ``start + (E - E0) / speed``). Connections are served one after the other. The handshake
and the control frames (ping, close) are handled by hand (RFC 6455), with nothing else in the loop.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
import sys
import time
from datetime import UTC, datetime

import orjson

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CHUNK = 256 * 1024


def frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One unmasked, unfragmented server frame (RFC 6455 §5.2)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


def build(archive: str, symbols: list[str], n: int) -> tuple[list[int], list[bytes]]:
    """Event times (ms) and encoded frames of the first ``n`` messages the replay server would send."""
    from rltrader.sim import ReplayServer

    start = datetime(2023, 2, 1, tzinfo=UTC)
    srv = ReplayServer.from_archive(archive, "futures-um", symbols, start, datetime(2023, 2, 28, tzinfo=UTC),
                                    agg_trades=False, heartbeat_s=None)
    streams = [f"{s.lower()}@{k}" for s in symbols for k in ("aggTrade", "kline_1m")]
    times: list[int] = []
    frames: list[bytes] = []
    for e_ms, stream, data in srv._events(streams, int(start.timestamp() * 1000), False):
        times.append(e_ms)
        frames.append(frame(orjson.dumps({"stream": stream, "data": data})))
        if len(frames) >= n:
            break
    if len(frames) < n:
        raise SystemExit(f"the replay has only {len(frames)} messages, {n} asked")
    return times, frames


async def _control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer the client's pings and close; everything else it sends is ignored."""
    try:
        while True:
            b0, b1 = await reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", await reader.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", await reader.readexactly(8))[0]
            mask = await reader.readexactly(4) if b1 & 0x80 else b"\0\0\0\0"
            data = bytes(c ^ mask[i % 4] for i, c in enumerate(await reader.readexactly(n)))
            op = b0 & 0x0F
            if op == 0x9:
                writer.write(frame(data, 0xA))
            elif op == 0x8:
                writer.write(frame(data[:2], 0x8))
                writer.close()
                return
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def serve(times: list[int], frames: list[bytes]) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        path = head.split(b" ", 2)[1].decode().strip("/").split("/")
        speed, n = float(path[0]), min(int(path[1]), len(frames))
        key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        await writer.drain()
        control = asyncio.create_task(_control(reader, writer))
        t0 = time.time()
        print(f"start {t0!r}", flush=True)
        i, e0 = 0, times[0]
        try:
            while i < n:
                if speed > 0:
                    due = e0 + (time.time() - t0) * speed * 1000
                    j = i
                    while j < n and times[j] <= due:
                        j += 1
                    if j == i:
                        await asyncio.sleep(0.001)
                        continue
                else:
                    j, size = i, 0
                    while j < n and size < CHUNK:
                        size += len(frames[j])
                        j += 1
                writer.write(b"".join(frames[i:j]))
                await writer.drain()
                i = j
            await control  # keep the connection open until the client closes it
        except ConnectionError:
            pass
        finally:
            control.cancel()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    rate = len(times) / max((times[-1] - times[0]) / 1000, 1e-9)
    print(f"ready {port} {times[0]} {rate!r}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    archive, symbols, n = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
    times, frames = build(archive, symbols, n)
    asyncio.run(serve(times, frames))


if __name__ == "__main__":
    main()
