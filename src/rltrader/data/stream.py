"""Live ingestion: Binance combined websocket streams → store, with REST repair so nothing closed is missed.

One connection per market carries every symbol's ``<symbol>@aggTrade`` and ``<symbol>@kline_1m`` streams
(the URL python-binance's ``BinanceSocketManager`` builds for a multiplex socket, opened by our own client,
:mod:`rltrader.data.ws_reader`). Stored are every aggregate trade, every *closed*
kline (``x = true``; an open candle is never final) and 5 s bars built from the trades
(:mod:`rltrader.data.bars`, including ``trades = 0`` rows for windows without trades).

Correctness rests on per-symbol cursors, not on the connection behaving:

* **Cursors**: the last accepted closed candle (open time) and the last accepted ``agg_trade_id``. Start-up
  reads them from the store; every accepted row advances them. A row at or below its cursor is a duplicate
  (REST repair and the stream overlap on purpose) and is dropped; a row that skips ahead of the cursor
  (``agg_trade_id`` is gap-free per symbol; candles are consecutive) reveals a hole, which is repaired through
  REST before the row is accepted. So no closed candle or trade is ever missing or stored twice, whatever the
  timing of drops, reconnects and restarts.
* **Reconnect**: the websocket is opened *before* the REST repair, so anything newer than the repair is
  already buffered; then the repair runs from the cursors to the server's now (closed candles only), then the
  buffered stream is consumed (the socket keeps reading during the repair; past ``queue_size`` buffered
  messages, at most 200 k, it stops reading and TCP holds the rest). Reconnects use exponential back-off with
  jitter; the socket never reconnects by itself (python-binance's did, silently, leaving a hole).
* **Staleness**: no message for ``stale_seconds`` → the connection is presumed dead and replaced (logged).
* **Every network wait is bounded**, so a dead or silent peer costs a reconnect, never a hang: the websocket
  connect + handshake by ``connect_timeout_s``, every REST request (the client's ping included) by
  ``rest_timeout_s`` (:class:`~rltrader.data.rest.RestTimeout` naming the endpoint, retried by the REST policy,
  then a reconnect), silence on the socket by ``stale_seconds``, the close handshake by 2 s. The REST repair
  asks the stop/deadline before every page and during back-offs, and each connection attempt runs as a task
  that the stop event or ``max_seconds`` cancels if it has not returned within ``stop_grace_s``: whatever it is
  awaiting, :meth:`StreamIngester.run` ends within about deadline + grace + close bounds.
* **Malformed frames** are logged, counted and skipped; they never reach the buffers (a message is fully
  parsed before any state changes). A frame that breaks the websocket protocol itself ends the connection
  (reconnect and repair).
* **Batching**: rows go to in-memory buffers; a writer task commits them (COPY on PostgreSQL) as soon as the
  previous commit finished and at least ``min_flush_seconds`` passed, and at the latest every
  ``flush_seconds`` — an adaptive group commit: small batches and low lag when the store keeps up, larger
  batches when it does not. Store calls run in a worker thread so the socket keeps being read. A clean stop
  (SIGINT/SIGTERM, ``stop_event``) flushes everything.
* A metrics line (msgs/s, lag p50/p99 from exchange event time to commit, reconnects, …) is logged every
  ``metrics_seconds``; :class:`StreamStats` exposes the same counters to tests and benchmarks.

Logs are single-line JSON objects (``{"event": …}``) so they can be shipped and queried as is. Store URLs
and API keys are never logged (keys come from the environment, see :mod:`rltrader.data.rest`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import numpy as np
import orjson
import polars as pl

from rltrader.config import Settings, StreamSettings
from rltrader.data.bars import BarBuilder, BarRow, bars_frame
from rltrader.data.rest import (
    DEFAULT_POLICY,
    RestPolicy,
    RestStopped,
    make_async_client,
    make_socket_manager,
)
from rltrader.data.schema import AGG_TRADE_SCHEMA, KLINE_SCHEMA, Market, interval_us
from rltrader.data.store import Store, WriteResult, open_store
from rltrader.data.stream_common import (
    END_TASK_S,
    GAP_KLINE,
    GAP_TRADE,
    Columns,
    Reconnect,
    dt,
    end_task,
    epoch_us,
    event,
    run_until_stopped,
)
from rltrader.data.stream_messages import MessageAccounting
from rltrader.data.stream_repair import RestRepair
from rltrader.data.ws_reader import WebSocketClosed, WebSocketProtocolError, WsConnection
from rltrader.data.ws_reader import connect as ws_connect

StopEvent = asyncio.Event | threading.Event


# -- knobs and counters ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Backoff:
    """Reconnect delays: ``base * factor**attempt`` capped at ``max_s``, then "equal jitter" (50–100 %), so
    many clients dropped at once do not reconnect in lockstep."""

    base_s: float = 0.2
    factor: float = 2.0
    max_s: float = 30.0

    def delay(self, attempt: int) -> float:
        d = min(self.max_s, self.base_s * self.factor ** min(attempt, 30))
        return d / 2 + random.random() * d / 2


@dataclass
class StreamStats:
    """Counters of one ingester run; safe to read from another thread (plain ints and a deque)."""

    messages: int = 0
    malformed: int = 0
    kline_updates: int = 0
    trades_received: int = 0
    klines_received: int = 0
    duplicates: int = 0
    trades_stored: int = 0
    klines_stored: int = 0
    bars_stored: int = 0
    empty_bars: int = 0
    late_trades: int = 0
    connections: int = 0
    reconnects: int = 0
    stale_reconnects: int = 0
    repairs: int = 0
    repaired_candles: int = 0
    repaired_trades: int = 0
    flushes: int = 0
    rows_committed: int = 0
    started_at: float = field(default_factory=time.time)
    lag_samples: deque[float] = field(default_factory=lambda: deque(maxlen=2_000_000))
    """Seconds from exchange event time to commit, one per live trade and closed kline (REST rows excluded)."""

    def lag_quantiles(self, *qs: float) -> list[float | None]:
        if not self.lag_samples:
            return [None for _ in qs]
        arr = np.fromiter(self.lag_samples, dtype=np.float64)
        return [float(np.quantile(arr, q)) for q in qs]

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "lag_samples"}
        p50, p99 = self.lag_quantiles(0.5, 0.99)
        d.update(lag_p50_s=p50, lag_p99_s=p99, lag_samples=len(self.lag_samples))
        return d


@dataclass
class _SymbolState:
    last_kline_us: int | None
    last_trade_id: int | None
    bars: BarBuilder


_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (OSError, asyncio.TimeoutError, Reconnect)


def _connection_errors() -> tuple[type[BaseException], ...]:
    """Exceptions after which reconnecting (and repairing) is the right answer."""
    import aiohttp
    from binance.exceptions import (
        BinanceAPIException,
        BinanceRequestException,
        BinanceWebsocketClosed,
        BinanceWebsocketQueueOverflow,
        BinanceWebsocketUnableToConnect,
        ReadLoopClosed,
    )
    from websockets.exceptions import WebSocketException

    return (*_CONNECTION_ERRORS, aiohttp.ClientError, WebSocketException, BinanceWebsocketUnableToConnect,
            BinanceWebsocketClosed, BinanceWebsocketQueueOverflow, ReadLoopClosed, BinanceRequestException,
            BinanceAPIException)


# -- the ingester --------------------------------------------------------------------------------------------
class StreamIngester(MessageAccounting, RestRepair):
    """State and loops of one live ingestion run (one market, many symbols). Use :func:`run_stream`."""

    def __init__(
        self,
        store: Store,
        market: Market | str,
        symbols: Sequence[str],
        *,
        rest_base: str | None = None,
        ws_base: str | None = None,
        flush_seconds: float = 2.0,
        min_flush_seconds: float = 0.05,
        stale_seconds: float = 30.0,
        metrics_seconds: float = 10.0,
        bar_width: str = "5s",
        allowed_lateness_s: float = 2.0,
        kline_interval: str = "1m",
        since: datetime | None = None,
        backoff: Backoff = Backoff(),
        max_failures: int | None = None,
        rest_policy: RestPolicy = DEFAULT_POLICY,
        queue_size: int = 1_000_000,
        max_pending_rows: int = 500_000,
        event_clock: Callable[[float], float] | None = None,
        stats: StreamStats | None = None,
        on_kline: Callable[[tuple[Any, ...]], None] | None = None,
        rest_timeout_s: float | None = None,
        connect_timeout_s: float = 10.0,
        stop_grace_s: float = 2.0,
    ) -> None:
        """``on_kline``: called with every accepted closed kline row (``KLINE_SCHEMA`` order, times in µs), live
        or REST-repaired, in open-time order per symbol and exactly once — the trader's closed-bar hook.

        ``rest_timeout_s`` bounds one REST request (None: ``rest_policy.timeout_s``, 10 s by default),
        ``connect_timeout_s`` the websocket's TCP connect + handshake, ``stop_grace_s`` how long a connection
        attempt may take to return by itself once the stop event or the deadline fired before it is cancelled.
        """
        if not symbols:
            raise ValueError("no symbols to stream")
        if flush_seconds <= 0 or stale_seconds <= 0 or metrics_seconds <= 0:
            raise ValueError("flush_seconds, stale_seconds and metrics_seconds must be > 0")
        if (rest_timeout_s is not None and rest_timeout_s <= 0) or connect_timeout_s <= 0 or stop_grace_s < 0:
            raise ValueError("rest_timeout_s and connect_timeout_s must be > 0, stop_grace_s >= 0")
        self.store = store
        self.market = Market(market)
        self._market_value = self.market.value
        self.symbols = [s.strip().upper() for s in symbols]
        self.rest_base = rest_base
        self.ws_base = ws_base
        self.flush_seconds = flush_seconds
        self.min_flush_seconds = min(min_flush_seconds, flush_seconds)
        self.stale_seconds = stale_seconds
        self.metrics_seconds = metrics_seconds
        self.bar_width = bar_width
        self.lateness_us = int(allowed_lateness_s * 1_000_000)
        self.interval = kline_interval
        self.step_us = interval_us(kline_interval)
        interval_us(bar_width)  # validate
        self.since = since
        self.backoff = backoff
        self.max_failures = max_failures
        self.rest_policy = rest_policy if rest_timeout_s is None else replace(rest_policy, timeout_s=rest_timeout_s)
        self.connect_timeout_s = connect_timeout_s
        self.stop_grace_s = stop_grace_s
        self.queue_size = queue_size
        self.max_pending_rows = max_pending_rows
        self.event_clock = event_clock
        self.stats = stats if stats is not None else StreamStats()
        self.on_kline = on_kline
        self.streams = [f"{s.lower()}@{k}" for s in self.symbols for k in ("aggTrade", f"kline_{kline_interval}")]
        self._state: dict[str, _SymbolState] = {}
        self._trades = Columns(AGG_TRADE_SCHEMA, ("transact_time",))
        self._klines = Columns(KLINE_SCHEMA, ("open_time", "close_time"))
        self._bars: list[BarRow] = []
        self._events: list[float] = []  # exchange event times (s) of live rows in the buffers
        self._interval_lags: list[float] = []
        self._flush_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._client: Any = None
        self._stop: StopEvent | None = None
        self._deadline: float | None = None
        self._reconnect_errors = _connection_errors()

    # -- lifecycle ---------------------------------------------------------------------------------------
    def _stopping(self) -> bool:
        if self._stop is not None and self._stop.is_set():
            return True
        return self._deadline is not None and time.monotonic() >= self._deadline

    async def _sleep(self, seconds: float) -> None:
        """Sleep unless asked to stop (polled: the stop event may be a thread's)."""
        end = time.monotonic() + seconds
        while not self._stopping() and (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 0.05))

    async def run(self, stop_event: StopEvent | None = None, max_seconds: float | None = None) -> StreamStats:
        self._stop = stop_event
        self._deadline = None if max_seconds is None else time.monotonic() + max_seconds
        await asyncio.to_thread(self._load_state)
        event(logging.INFO, "stream_start", market=self.market.value, symbols=self.symbols,
               store=type(self.store).__name__, cursors={s: {"kline": st.last_kline_us, "trade": st.last_trade_id}
                                                         for s, st in self._state.items()})
        writer = asyncio.create_task(self._writer_loop(), name="stream-writer")
        metrics = asyncio.create_task(self._metrics_loop(), name="stream-metrics")
        failures = 0
        try:
            while not self._stopping():
                try:
                    streamed = await run_until_stopped(self._attempt(), self._stopping, self.stop_grace_s)
                    if streamed is None:  # cancelled on stop/deadline
                        break
                    failures = 0 if streamed else failures + 1
                except RestStopped:
                    break
                except self._reconnect_errors as exc:
                    failures += 1
                    event(logging.WARNING, "stream_disconnected", error=type(exc).__name__, detail=str(exc)[:300],
                           failures=failures)
                if writer.done():
                    writer.result()  # a store that keeps failing ends the run (the supervisor restarts it)
                if self._stopping():
                    break
                if self.max_failures is not None and failures > self.max_failures:
                    raise ConnectionError(f"stream: {failures} consecutive failed connections; giving up")
                self.stats.reconnects += 1
                delay = self.backoff.delay(max(failures - 1, 0))
                event(logging.WARNING, "stream_reconnect", attempt=failures, delay_s=round(delay, 3),
                       reconnects=self.stats.reconnects)
                await self._sleep(delay)
        finally:
            await end_task(metrics)
            writer_error = await end_task(writer)
            for st in self._state.values():
                self._bars += st.bars.drain(final=True)
            await self._flush()
            if self._client is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(END_TASK_S):
                        await self._client.close_connection()
                self._client = None
            self._log_metrics(final=True)
        if writer_error is not None:
            raise writer_error  # the store failed for good while stopping
        return self.stats

    # -- start-up state ----------------------------------------------------------------------------------
    def _load_state(self) -> None:
        """Cursors from the store, and the bar builder re-seeded with stored trades not yet in a stored bar."""
        last: dict[tuple[str, str], datetime] = {}
        for s in self.store.stats():
            if s.market != self.market.value or s.symbol not in self.symbols or s.last is None:
                continue
            if (s.kind, s.interval) in (("klines", self.interval), ("agg_trades", ""), ("bars", self.bar_width)):
                last[(s.kind, s.symbol)] = s.last
        width = interval_us(self.bar_width)
        for sym in self.symbols:
            kl = last.get(("klines", sym))
            tr = last.get(("agg_trades", sym))
            br = last.get(("bars", sym))
            bar_start = epoch_us(br) + width if br is not None else None
            builder = BarBuilder(self.market.value, sym, self.bar_width, self.lateness_us, start=bar_start)
            last_id: int | None = None
            if tr is not None:
                tr_us = epoch_us(tr)
                seed_from = bar_start if bar_start is not None else tr_us - tr_us % width
                if tr_us - seed_from > 86_400_000_000:  # bars far behind trades: do not rebuild a day of bars
                    seed_from = tr_us - tr_us % width
                    builder = BarBuilder(self.market.value, sym, self.bar_width, self.lateness_us, start=seed_from)
                trades = self.store.read_agg_trades(self.market.value, sym, start=dt(min(seed_from, tr_us)))
                if trades.height:
                    last_id = int(trades.get_column("agg_trade_id").max())  # type: ignore[arg-type]
                    cols = trades.filter(pl.col("transact_time") >= dt(seed_from)).select(
                        pl.col("transact_time").dt.epoch("us"), "agg_trade_id", "price", "quantity",
                        "is_buyer_maker")
                    for t, a, p, q, m in cols.iter_rows():
                        builder.add(t, a, p, q, m)
            self._state[sym] = _SymbolState(epoch_us(kl) if kl is not None else None, last_id, builder)

    # -- one connection ----------------------------------------------------------------------------------
    def _socket_url(self) -> str:
        """The combined-stream URL, built by python-binance (base URL, path, ``timeUnit``) but not opened by it."""
        bm = make_socket_manager(self._client, self.ws_base)
        if self.market is Market.SPOT:
            sock = bm.multiplex_socket(self.streams)
        else:
            sock = bm.futures_multiplex_socket(self.streams)
        return f"{sock._url}{getattr(sock, '_prefix', '')}{sock._path}"

    async def _attempt(self) -> bool:
        """One connection attempt: the REST client if there is none yet, then a session."""
        if self._client is None:
            self._client = await make_async_client(
                self.market, self.rest_base, time_unit="MICROSECOND" if self.market is Market.SPOT else None,
                timeout_s=self.rest_policy.timeout_s)
        return await self._session()

    async def _session(self) -> bool:
        """Connect, repair the hole since the cursors, stream until stop/stale/error; True if data flowed.

        The socket is our own (:mod:`rltrader.data.ws_reader`), not python-binance's: it has no silent
        reconnect of its own (which would hide a hole from us) and costs a fraction of the CPU per message.
        """
        conn = await ws_connect(self._socket_url(), timeout=self.connect_timeout_s,
                                high_water=min(self.queue_size, 200_000))
        self.stats.connections += 1
        before = self.stats.messages
        try:
            event(logging.INFO, "stream_connected", streams=len(self.streams), connection=self.stats.connections)
            for sym in self.symbols:
                await self._repair(sym)
            await self._consume(conn)
        finally:
            await conn.close()
        return self.stats.messages > before

    async def _consume(self, conn: WsConnection) -> None:
        """Take the messages the socket has buffered in batches, decode and account them; raise to reconnect."""
        loads, decode_error = orjson.loads, orjson.JSONDecodeError
        on_message = self._on_message
        last_msg = time.monotonic()
        while not self._stopping():
            wait = min(0.25, self.stale_seconds - (time.monotonic() - last_msg))
            if wait <= 0:
                self.stats.stale_reconnects += 1
                event(logging.WARNING, "stream_stale", silent_s=round(time.monotonic() - last_msg, 3))
                raise Reconnect(f"no message for {self.stale_seconds} s")
            try:
                batch = await conn.batch(wait)
            except (WebSocketClosed, WebSocketProtocolError) as exc:
                event(logging.WARNING, "websocket_error", type=type(exc).__name__, detail=str(exc)[:300])
                raise Reconnect(f"websocket closed: {exc}") from exc
            if not batch:
                continue
            last_msg = time.monotonic()
            self.stats.messages += len(batch)
            for raw in batch:
                try:
                    msg = loads(raw)
                except decode_error:
                    self.stats.messages -= 1
                    self.stats.malformed += 1
                    event(logging.WARNING, "malformed_frame", reason="not json", frame=str(raw)[:200])
                    continue
                code = on_message(msg)
                if code in (GAP_TRADE, GAP_KLINE):
                    await self._resolve_gap(msg, code)
            self._after_batch()
            if self._pending_rows() >= self.max_pending_rows:
                await self._flush()  # back-pressure: the store is slower than the stream
            await asyncio.sleep(0)  # batch() does not suspend while messages wait: let the writer and reads run

    # -- after each batch (the messages themselves: stream_messages.MessageAccounting) ----------------
    def _after_batch(self) -> None:
        for st in self._state.values():
            if st.bars.watermark is not None:
                self._bars += st.bars.drain()
        self.stats.late_trades = sum(st.bars.late_trades for st in self._state.values())
        if len(self._trades) or len(self._klines) or self._bars:
            self._wake.set()
    # -- writing -----------------------------------------------------------------------------------------
    def _pending_rows(self) -> int:
        return len(self._trades) + len(self._klines) + len(self._bars)

    async def _writer_loop(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for runs the wait as a task of its own and
            # swallows a cancel that arrives once that task is done but before wait_for resumes (wake set,
            # then stop, in one loop turn) — the writer then loops on and `run()`'s end waited for it forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.flush_seconds):
                    await self._wake.wait()
            self._wake.clear()
            await self._flush()
            await asyncio.sleep(self.min_flush_seconds)

    async def _flush(self) -> None:
        async with self._flush_lock:
            trades, klines, bars, events = self._trades, self._klines, self._bars, self._events
            if not (len(trades) or len(klines) or bars):
                return
            self._trades, self._klines, self._bars, self._events = trades.empty(), klines.empty(), [], []
            write = asyncio.ensure_future(asyncio.to_thread(self._write, trades, klines, bars))
            try:
                results = await asyncio.shield(write)
            except asyncio.CancelledError:
                # stopped mid-write (SIGTERM): the thread still commits these rows, so wait for it and count
                # them before honouring the cancel, or the stats would miss rows that are in the store
                self._account(await write, trades, klines, bars, events, time.time())
                raise
            committed = time.time()
        self._account(results, trades, klines, bars, events, committed)

    def _account(self, results: tuple[WriteResult, WriteResult, WriteResult], trades: Columns,
                 klines: Columns, bars: list[Any], events: list[float], committed: float) -> None:
        clock = self.event_clock
        lags = [committed - (clock(e) if clock else e) for e in events]
        self.stats.lag_samples.extend(lags)
        self._interval_lags.extend(lags)
        self.stats.trades_stored += results[0].inserted
        self.stats.klines_stored += results[1].inserted
        self.stats.bars_stored += results[2].inserted
        self.stats.empty_bars += sum(1 for b in bars if b[9] == 0)
        self.stats.rows_committed += len(trades) + len(klines) + len(bars)
        self.stats.flushes += 1

    def _write(self, trades: Columns, klines: Columns,
               bars: list[BarRow]) -> tuple[WriteResult, WriteResult, WriteResult]:
        """Trades, then bars, then klines; each call atomic. Retries transient failures, then gives up loudly
        (in-memory rows are then lost, but the cursors in the store are behind them: the next start repairs)."""
        attempt = 0
        while True:
            try:
                t = self.store.write_agg_trades(trades.frame())
                b = self.store.write_bars(bars_frame(bars), self.bar_width)
                k = self.store.write_klines(klines.frame())
                return t, k, b
            except Exception as exc:
                if attempt >= 4:
                    event(logging.ERROR, "store_write_failed", error=type(exc).__name__, attempts=attempt + 1)
                    raise
                delay = self.backoff.delay(attempt)
                event(logging.WARNING, "store_write_retry", error=type(exc).__name__, detail=str(exc)[:200],
                       delay_s=round(delay, 3))
                time.sleep(delay)
                attempt += 1

    # -- metrics -----------------------------------------------------------------------------------------
    async def _metrics_loop(self) -> None:
        while True:
            await asyncio.sleep(self.metrics_seconds)
            self._log_metrics()

    _last_metrics: tuple[float, int] = (0.0, 0)

    def _log_metrics(self, *, final: bool = False) -> None:
        now = time.monotonic()
        t0, m0 = self._last_metrics if self._last_metrics[0] else (now - self.metrics_seconds, 0)
        self._last_metrics = (now, self.stats.messages)
        lags = np.asarray(self._interval_lags, dtype=np.float64)
        self._interval_lags = []
        fields: dict[str, Any] = {
            "msgs_per_s": round((self.stats.messages - m0) / max(now - t0, 1e-9), 1),
            "lag_p50_s": round(float(np.quantile(lags, 0.5)), 4) if lags.size else None,
            "lag_p99_s": round(float(np.quantile(lags, 0.99)), 4) if lags.size else None,
            "pending_rows": self._pending_rows(),
        }
        fields.update({k: v for k, v in self.stats.as_dict().items() if not k.startswith("lag_")})
        event(logging.INFO, "stream_final" if final else "stream_metrics", **fields)


# -- entry points --------------------------------------------------------------------------------------------
async def run_stream(
    store: Store,
    market: Market | str,
    symbols: Sequence[str],
    *,
    rest_base: str | None = None,
    ws_base: str | None = None,
    flush_seconds: float = 2.0,
    stale_seconds: float = 30.0,
    metrics_seconds: float = 10.0,
    bar_width: str = "5s",
    stop_event: StopEvent | None = None,
    max_seconds: float | None = None,
    stats: StreamStats | None = None,
    **options: Any,
) -> StreamStats:
    """Stream ``symbols`` of ``market`` into ``store`` until ``stop_event`` is set or ``max_seconds`` pass.

    ``stats`` (optional) is filled live, for a caller watching from another thread. Further keyword options
    go to :class:`StreamIngester` (``min_flush_seconds``, ``allowed_lateness_s``, ``since``, ``backoff``,
    ``max_failures``, ``rest_policy``, ``rest_timeout_s``, ``connect_timeout_s``, ``stop_grace_s``, ``event_clock``,
    …). Returns the final counters.
    """
    ingester = StreamIngester(store, market, symbols, rest_base=rest_base, ws_base=ws_base,
                              flush_seconds=flush_seconds, stale_seconds=stale_seconds,
                              metrics_seconds=metrics_seconds, bar_width=bar_width, stats=stats, **options)
    return await ingester.run(stop_event, max_seconds)


def stream(settings: StreamSettings, store: Store, *, stop_event: threading.Event | None = None,
           max_seconds: float | None = None, handle_signals: bool = True, stats: StreamStats | None = None,
           **options: Any) -> StreamStats:
    """Blocking entry for the CLI and flows: run :func:`run_stream` with ``settings``; SIGINT/SIGTERM stop it
    cleanly (buffers flushed) when called from the main thread."""

    async def main() -> StreamStats:
        stop = asyncio.Event()
        if handle_signals and threading.current_thread() is threading.main_thread():
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(sig, _on_signal, stop, sig)
        bridge = None
        if stop_event is not None:
            bridge = asyncio.create_task(_bridge(stop_event, stop))
        bounds = {"rest_timeout_s": settings.rest_timeout_seconds,
                  "connect_timeout_s": settings.connect_timeout_seconds,
                  "stop_grace_s": settings.stop_grace_seconds}
        try:
            return await run_stream(
                store, settings.market, settings.symbols, rest_base=settings.rest_base, ws_base=settings.ws_base,
                flush_seconds=settings.flush_seconds, stale_seconds=settings.stale_seconds,
                metrics_seconds=settings.metrics_seconds, bar_width=settings.bar_width, stop_event=stop,
                max_seconds=max_seconds, stats=stats, **{**bounds, **options})
        finally:
            if bridge is not None:
                bridge.cancel()

    return asyncio.run(main())


def _on_signal(stop: asyncio.Event, sig: signal.Signals) -> None:
    event(logging.WARNING, "stream_signal", signal=sig.name)
    stop.set()


async def _bridge(src: threading.Event, dst: asyncio.Event) -> None:
    while not src.is_set():
        await asyncio.sleep(0.05)
    dst.set()


def run_live(settings: Settings, *, store_url: str | None = None, market: str | None = None,
             symbols: Sequence[str] | None = None, rest_base: str | None = None, ws_base: str | None = None,
             max_seconds: float | None = None, handle_signals: bool = True) -> dict[str, Any]:
    """Open the configured store and stream into it (overrides win over ``settings.stream``); counters as a dict.

    The plain function behind the ``ingest_live`` flow.
    """
    update: dict[str, Any] = {}
    if market is not None:
        update["market"] = Market(market)
    if symbols is not None:
        update["symbols"] = [s.strip().upper() for s in symbols]
    if rest_base is not None:
        update["rest_base"] = rest_base
    if ws_base is not None:
        update["ws_base"] = ws_base
    cfg = settings.stream.model_copy(update=update)
    store = open_store(store_url or settings.data.store_url, settings.data.dir, settings.postgres.bounds())
    try:
        result = stream(cfg, store, max_seconds=max_seconds, handle_signals=handle_signals)
    finally:
        store.close()
    return result.as_dict()


__all__ = ["Backoff", "StreamIngester", "StreamStats", "run_live", "run_stream", "stream"]
