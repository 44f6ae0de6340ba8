"""No wait of the live ingester outlives its bound: a dead, silent or stalling peer costs a reconnect, and the
stop event or ``max_seconds`` ends :func:`run_stream` whatever it is awaiting.

Regression tests for a CI hang: the testnet trader's ingester thread was still alive 55 minutes after its
``max_seconds=600``, its loop waking only on the writer's 2 s flush timer. The await that never ended was
``run()``'s final ``await writer``: on Python 3.11 ``asyncio.wait_for`` swallows a cancel that arrives after the
waited-for task finished but before ``wait_for`` resumed, and exactly that happens when the batch that sets the
stop (the trader's last bar) also wakes the writer and the socket is already closing (the server's close frame
in the same read), so nothing suspends between the wake and ``writer.cancel()``. The writer then looped on.

Real components throughout: the replay server (REST, and websocket where it suffices), the ingester with a real
store, real loopback sockets. What the replay server cannot do (answer a handshake and then go silent, accept a
REST request and never answer it, send a close frame in the same write as the last message) is done by small raw
asyncio servers here. Each test is guarded by ``asyncio.wait_for`` (and pytest-timeout), so a regression fails
instead of hanging the suite; the bounds asserted are generous: the point is ending, not speed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from binance import AsyncClient
from conftest import SHARED_ARCHIVE, archive_rows

from rltrader.data.rest import RestPolicy, RestTimeout, _with_base, fetch_klines_async
from rltrader.data.schema import Market
from rltrader.data.store import Store, open_store
from rltrader.data.stream import Backoff, StreamIngester, StreamStats, run_stream
from rltrader.data.ws_reader import WebSocketClosed, connect
from rltrader.sim import ReplayClock, ReplayServer
from rltrader.sim.faults import RateLimit

pytestmark = pytest.mark.usefixtures("shared_archive")  # the replay server serves the real shared data

D0 = datetime(2020, 1, 1, tzinfo=UTC)  # spot BTCUSDT 1m klines (1440), no trades
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
FAST = Backoff(base_s=0.05, max_s=0.3)


# -- raw servers that misbehave on purpose ---------------------------------------------------------------------
def ws_frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked server frame (RFC 6455 §5.2)."""
    n = len(payload)
    head = bytes((0x80 | opcode, n)) if n < 126 else bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
    return head + payload


def kline_message(symbol: str, open_ms: int, *, closed: bool = True) -> bytes:
    """One combined-stream kline frame payload as Binance sends it."""
    k = {"t": open_ms, "T": open_ms + 59_999, "s": symbol, "i": "1m", "f": 1, "L": 2, "o": "100.0", "c": "101.0",
         "h": "102.0", "l": "99.0", "v": "3.0", "n": 2, "x": closed, "q": "300.0", "V": "1.0", "Q": "100.0",
         "B": "0"}
    return orjson.dumps({"stream": f"{symbol.lower()}@kline_1m",
                         "data": {"e": "kline", "E": open_ms + 60_000, "s": symbol, "k": k}})


async def read_handshake(reader: asyncio.StreamReader) -> bytes:
    """Read the client's upgrade request; the ``101`` answer that completes it."""
    head = await reader.readuntil(b"\r\n\r\n")
    key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key:"))
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")


class RawServer:
    """A loopback TCP server running ``handler`` per connection; counts connections, closes them all on exit."""

    def __init__(self, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]) -> None:
        self.handler = handler
        self.connections = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await self.handler(reader, writer)

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.transport.abort()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_base(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"


async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accept, read whatever comes, never write a byte (a hung REST server, or a websocket without handshake)."""
    while await reader.read(65536):
        pass
    await asyncio.Event().wait()  # the peer's EOF is not an answer either


class StallingProxy:
    """Forwards TCP to ``upstream_port`` until the client has sent ``stall_after`` HTTP requests; from the next
    request on nothing is forwarded either way (a REST server that stops answering in the middle of a repair)."""

    def __init__(self, upstream_port: int, stall_after: int) -> None:
        self.upstream_port = upstream_port
        self.stall_after = stall_after
        self.requests = 0
        self.stalled = asyncio.Event()
        self.raw = RawServer(self._handle)
        self._pumps: set[asyncio.Task[None]] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def client_to_upstream() -> None:
            while data := await reader.read(65536):
                self.requests += data.count(b"GET /")
                if self.requests > self.stall_after:
                    self.stalled.set()
                if not self.stalled.is_set():
                    up_w.write(data)

        async def upstream_to_client() -> None:
            while data := await up_r.read(65536):
                if not self.stalled.is_set():
                    writer.write(data)

        tasks = {asyncio.create_task(client_to_upstream()), asyncio.create_task(upstream_to_client())}
        self._pumps |= tasks
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            await asyncio.Event().wait()  # stalled or not, this connection is never closed by us
        finally:
            up_w.transport.abort()

    async def __aenter__(self) -> StallingProxy:
        await self.raw.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in self._pumps:
            t.cancel()
        await self.raw.__aexit__()

    @property
    def base(self) -> str:
        return self.raw.http_base


# -- helpers -------------------------------------------------------------------------------------------------
def replay(**kw: Any) -> ReplayServer:
    """The replay server on D0's spot BTCUSDT klines (its clock 1 h into the day)."""
    return ReplayServer.from_archive(str(SHARED_ARCHIVE), Market.SPOT, ["BTCUSDT"], D0, D0, agg_trades=False,
                                     clock=ReplayClock(D0 + timedelta(hours=1), 60.0), **kw)


def seeded_store(tmp_path: Path) -> Store:
    """A store holding D0's first 10 minutes: a kline cursor, so every (re)connect starts with a REST repair."""
    store = open_store(f"parquet://{tmp_path / 'store'}", tmp_path)
    rows = archive_rows(Market.SPOT, "klines", D0.date(), D0.date())
    store.write_klines(rows.head(10))
    return store


async def bounded(coro: Coroutine[Any, Any, StreamStats], limit: float) -> tuple[StreamStats, float]:
    """Await ``coro`` at most ``limit`` s, else fail (the hang is the regression); its result and seconds taken.

    Not ``asyncio.wait_for``: the old ingester swallowed the cancel that wait_for sends at its timeout and then
    returned normally, so a hang would have passed as a slow success.
    """
    started = time.monotonic()
    task = asyncio.ensure_future(coro)
    await asyncio.wait((task,), timeout=limit)
    if not task.done():
        task.cancel()
        await asyncio.wait((task,), timeout=10)
        pytest.fail(f"the ingester did not end within {limit} s")
    return task.result(), time.monotonic() - started


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    out = []
    for rec in caplog.records:
        if rec.name == "rltrader.data.stream" and rec.getMessage().startswith("{"):
            d = orjson.loads(rec.getMessage())
            if d.get("event") == name:
                out.append(d)
    return out


# -- the CI hang itself ------------------------------------------------------------------------------------------
def test_writer_loop_ends_when_cancelled_right_after_its_wake(tmp_path: Path) -> None:
    """The writer is woken (rows buffered) and cancelled in the same loop turn, before it resumed: it must end.
    With ``asyncio.wait_for`` (Python 3.11) the cancel was swallowed and the writer looped on for ever."""
    store = open_store(f"parquet://{tmp_path / 'store'}", tmp_path)

    async def main() -> None:
        ing = StreamIngester(store, "spot", ["BTCUSDT"], flush_seconds=2.0)
        writer = asyncio.create_task(ing._writer_loop())
        await asyncio.sleep(0.1)  # the writer waits for its wake-up
        ing._wake.set()
        await asyncio.sleep(0)  # the wait is over, the writer has not resumed yet
        writer.cancel()
        done, _ = await asyncio.wait((writer,), timeout=10)
        assert writer in done, "the writer swallowed its cancel and kept looping"
        assert writer.cancelled()

    try:
        asyncio.run(main())
    finally:
        store.close()


@pytest.mark.timeout(120)
def test_stop_by_the_last_kline_with_the_servers_close_in_the_same_read(tmp_path: Path) -> None:
    """The trader's situation at the end of a session: the batch carrying its last bar sets the stop (from
    ``on_kline``), and the server's close frame came in the same read. ``run_stream`` returns, that bar stored."""
    store = open_store(f"parquet://{tmp_path / 'store'}", tmp_path)
    open_ms = int((D0 + timedelta(minutes=5)).timestamp() * 1000)

    async def last_bar_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answer = await read_handshake(reader)
        writer.write(answer + ws_frame(0x1, kline_message("BTCUSDT", open_ms))
                     + ws_frame(0x8, (1001).to_bytes(2, "big") + b"going away"))
        while await reader.read(65536):  # until the client drops the connection
            pass

    async def main() -> tuple[StreamStats, float]:
        stop = asyncio.Event()
        async with replay() as srv, RawServer(last_bar_then_close) as ws:
            return await bounded(run_stream(
                store, "spot", ["BTCUSDT"], rest_base=srv.rest_base_url, ws_base=ws.ws_base, stop_event=stop,
                flush_seconds=2.0, backoff=FAST, on_kline=lambda row: stop.set()), 60)

    try:
        stats, _ = asyncio.run(main())
        assert stats.klines_received == 1 and stats.klines_stored == 1 and stats.connections == 1
        assert store.read_klines("spot", "BTCUSDT", "1m").height == 1
    finally:
        store.close()


class FailingWrites:
    """A real store whose writes fail (a full disk): reads and cursors are the store's own."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def write_agg_trades(self, *args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device (injected)")


@pytest.mark.timeout(120)
def test_store_failing_during_the_stop_fails_the_run_without_hanging(tmp_path: Path) -> None:
    """The last bar sets the stop while the store cannot write: the run ends (bounded) with the store's error,
    neither hanging in the writer's retries nor reporting success."""
    store = open_store(f"parquet://{tmp_path / 'store'}", tmp_path)
    open_ms = int((D0 + timedelta(minutes=5)).timestamp() * 1000)

    async def last_bar_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await read_handshake(reader) + ws_frame(0x1, kline_message("BTCUSDT", open_ms))
                     + ws_frame(0x8, (1001).to_bytes(2, "big")))
        while await reader.read(65536):
            pass

    async def main() -> None:
        stop = asyncio.Event()
        async with replay() as srv, RawServer(last_bar_then_close) as ws:
            await bounded(run_stream(
                FailingWrites(store), "spot", ["BTCUSDT"], rest_base=srv.rest_base_url, ws_base=ws.ws_base,  # type: ignore[arg-type]
                stop_event=stop, backoff=FAST, on_kline=lambda row: stop.set()), 60)

    try:
        with pytest.raises(OSError, match="injected"):
            asyncio.run(main())
        assert store.read_klines("spot", "BTCUSDT", "1m").height == 0
    finally:
        store.close()


# -- REST that stalls or never answers ---------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_rest_request_never_answered_times_out_naming_the_endpoint() -> None:
    """A REST server that accepts and never replies: the call ends with :class:`RestTimeout` naming the URL,
    after the policy's retries, instead of waiting for ever."""

    async def main() -> None:
        async with RawServer(never_answer) as rest:
            client = _with_base(AsyncClient, rest.http_base)(None, None)
            try:
                policy = RestPolicy(timeout_s=0.5, max_retries=1, backoff_base_s=0.05)
                with pytest.raises(RestTimeout, match=rf"127\.0\.0\.1:{rest.port}/api/v3/time.*0\.5 s"):
                    await asyncio.wait_for(fetch_klines_async(client, "spot", "BTCUSDT", "1m", D0, policy=policy),
                                           30)
                assert rest.connections >= 1
            finally:
                await client.close_connection()

    asyncio.run(main())


@pytest.mark.timeout(120)
def test_ingester_reconnects_when_rest_never_answers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The ingester's REST host accepts and never answers: the client's ping times out (``rest_timeout_s``), the
    failure names the endpoint, the ingester backs off and retries, and ``max_seconds`` still ends the run."""
    caplog.set_level(logging.INFO, logger="rltrader.data.stream")
    store = open_store(f"parquet://{tmp_path / 'store'}", tmp_path)

    async def main() -> tuple[StreamStats, float, int]:
        async with RawServer(never_answer) as rest, replay() as srv:
            stats, took = await bounded(run_stream(
                store, "spot", ["BTCUSDT"], rest_base=rest.http_base, ws_base=srv.ws_base_url, max_seconds=4.0,
                rest_timeout_s=0.5, backoff=FAST), 60)
            return stats, took, rest.connections

    try:
        stats, took, rest_connections = asyncio.run(main())
    finally:
        store.close()
    failures = events(caplog, "stream_disconnected")
    assert failures and all(f["error"] == "RestTimeout" for f in failures)
    assert "/api/v3/ping" in failures[0]["detail"] and "127.0.0.1" in failures[0]["detail"]
    assert stats.reconnects >= 2 and rest_connections >= 2 and stats.connections == 0
    assert took < 4.0 + 10


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["deadline", "stop_event"])
def test_rest_repair_stalled_and_server_gone_ends_by_deadline_or_stop(
        how: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Mid repair (the REST request after the client's two start-up requests) the REST side stops answering and
    the replay server shuts down. The REST bound (10 s) is longer than the run's deadline (5 s): the deadline —
    or the stop event, set once the repair hangs — must end ``run_stream`` by cancelling the attempt after the
    grace, not by waiting for the network."""
    caplog.set_level(logging.INFO, logger="rltrader.data.stream")
    store = seeded_store(tmp_path)

    async def main() -> tuple[StreamStats, float, float]:
        stop = asyncio.Event()
        srv = replay()
        await srv.start()
        try:
            async with StallingProxy(srv.port, stall_after=2) as proxy:
                run = asyncio.create_task(bounded(run_stream(
                    store, "spot", ["BTCUSDT"], rest_base=proxy.base, ws_base=srv.ws_base_url, stop_event=stop,
                    max_seconds=5.0 if how == "deadline" else None, rest_timeout_s=10.0, stop_grace_s=1.0,
                    backoff=FAST), 60))
                await asyncio.wait_for(proxy.stalled.wait(), 30)  # the repair's first request hangs now
                stalled_at = time.monotonic()
                await srv.stop()
                if how == "stop_event":
                    stop.set()
                stats, took = await run
                return stats, took, time.monotonic() - stalled_at
        finally:
            await srv.stop()

    try:
        stats, took, after_stall = asyncio.run(main())
    finally:
        store.close()
    assert stats.connections == 1 and stats.repairs == 0  # it really was inside the repair
    assert events(caplog, "stream_cancel_on_stop")  # ended by cancelling the attempt, not by a REST answer
    if how == "deadline":
        assert took < 5.0 + 10
    else:
        assert after_stall < 10  # well before the 10 s REST bound could have ended it


@pytest.mark.timeout(120)
def test_stop_wakes_a_rest_back_off_of_the_repair(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The repair runs into the weight limit (HTTP 429, ``Retry-After`` ~10 minutes): setting the stop event
    wakes the back-off and the repair ends itself (``RestStopped``), no cancel needed, nothing waits 10 minutes."""
    caplog.set_level(logging.INFO, logger="rltrader.data.stream")
    store = seeded_store(tmp_path)

    async def main() -> tuple[StreamStats, float]:
        stop = asyncio.Event()
        # weight: the client's ping 1 + time 1, the repair's time 1, then klines 2 > 3
        async with replay(rate_limit=RateLimit(3, window_s=600.0)) as srv:
            run = asyncio.create_task(bounded(run_stream(
                store, "spot", ["BTCUSDT"], rest_base=srv.rest_base_url, ws_base=srv.ws_base_url,
                stop_event=stop, stop_grace_s=30.0, backoff=FAST), 60))
            while not srv.stats.rate_limited:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)  # the repair sleeps on Retry-After now
            stopped_at = time.monotonic()
            stop.set()
            stats, _ = await run
            return stats, time.monotonic() - stopped_at

    try:
        stats, after_stop = asyncio.run(main())
    finally:
        store.close()
    assert after_stop < 20  # far below both the Retry-After (~600 s) and the 30 s grace that would cancel it
    assert not events(caplog, "stream_cancel_on_stop") and not events(caplog, "stream_disconnected")
    assert stats.connections == 1 and stats.repairs == 0


# -- websockets that go silent, never answer, or close while reading is paused ------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["no_handshake", "silent_after_handshake"])
def test_silent_websocket_is_replaced(how: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A websocket server that never answers the handshake (``connect_timeout_s``) or answers it and then neither
    writes nor reads (``stale_seconds``): each connection is given up within its bound and replaced."""
    caplog.set_level(logging.INFO, logger="rltrader.data.stream")
    store = open_store(f"parquet://{tmp_path / 'store'}", tmp_path)

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await read_handshake(reader))
        await asyncio.Event().wait()  # and never read again: our close frame goes unanswered too

    async def main() -> tuple[StreamStats, float, int]:
        async with replay() as srv, RawServer(never_answer if how == "no_handshake" else silent) as ws:
            stats, took = await bounded(run_stream(
                store, "spot", ["BTCUSDT"], rest_base=srv.rest_base_url, ws_base=ws.ws_base, max_seconds=5.0,
                connect_timeout_s=1.0, stale_seconds=1.0, backoff=FAST), 60)
            return stats, took, ws.connections

    try:
        stats, took, ws_connections = asyncio.run(main())
    finally:
        store.close()
    assert ws_connections >= 2 and stats.reconnects >= 1 and took < 5.0 + 10
    if how == "no_handshake":
        assert stats.connections == 0
        detail = events(caplog, "stream_disconnected")[0]["detail"]
        assert "no handshake within 1 s" in detail and "127.0.0.1" in detail
    else:
        assert stats.connections >= 2 and stats.stale_reconnects >= 1


@pytest.mark.timeout(120)
def test_close_while_reading_is_paused_is_not_hidden() -> None:
    """The server sends far more than ``high_water`` messages and closes while our reading is paused (so its close
    and EOF sit unread in the socket): the consumer still gets every message and then the close, and closing a
    paused connection resumes reading, so it does not wait out its close timeout for a reply it could not read."""
    n = 600  # ~600 KB: more than one read (256 KiB), so the close frame and the EOF lie behind the pause
    messages = [orjson.dumps({"n": i, "pad": "x" * 1000}) for i in range(n)]

    async def burst_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await read_handshake(reader))
        writer.write(b"".join(ws_frame(0x1, m) for m in messages))
        writer.write(ws_frame(0x8, (1001).to_bytes(2, "big")))
        writer.close()  # after the buffered bytes: no drain, the server must not wait for our reading

    async def paused_connection(ws: RawServer) -> Any:
        conn = await connect(f"{ws.ws_base}stream", high_water=20)
        while not conn.paused:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # the server has closed by now; our side has not read it
        return conn

    async def main() -> None:
        async with RawServer(burst_then_close) as ws:
            # the consumer drains: every message, then the server's close
            conn = await asyncio.wait_for(paused_connection(ws), 30)
            got: list[bytes] = []
            with pytest.raises(WebSocketClosed) as closed:
                while True:
                    got += await asyncio.wait_for(conn.batch(1.0), 10)
            assert got == messages
            assert closed.value.code == 1001
            # closing while paused: reading resumes, the server's close/EOF is seen, no 60 s wait
            conn = await asyncio.wait_for(paused_connection(ws), 30)
            await asyncio.wait_for(conn.close(timeout=60.0), 10)
            assert conn._transport is not None and conn._transport.is_closing()
            assert not conn.paused

    asyncio.run(main())
