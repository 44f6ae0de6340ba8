"""A Binance look-alike on loopback replaying archive data through Binance's own REST and websocket protocols.

Why it exists: the live ingester, REST gap repair and their tests must be exercised against something that
speaks exactly what ``python-binance`` speaks (URLs, query parameters, payload shapes, error JSON, weight
headers, reconnect behaviour), without the network and deterministically. Pointing the real ``Client``,
``AsyncClient`` and ``BinanceSocketManager`` at this server (only their base URLs change) tests the real
integration, not a mock of it.

Time is the central idea. A :class:`ReplayClock` plays the recorded market forward from ``--from`` at
``--speed``; the REST endpoints only reveal what had happened by the clock's "now" (the candle in progress is
returned unfinished, as Binance does), and websocket events are sent when the clock reaches their event
time. A client that reconnects continues from the clock's current position, so whatever was sent while it was
away is lost, exactly the situation REST repair exists for.

Faults (dropped connections, stalls, malformed frames) and an optional request-weight limit that answers
HTTP 429 make the failure paths testable; they can be changed at runtime through
:meth:`ReplayServer.set_faults` or ``POST /_replay/faults``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import math
import re
import signal
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

import polars as pl
from aiohttp import WSMsgType, web

from rltrader.data.archive import ArchiveSource, Kind, load_file
from rltrader.data.schema import AGG_TRADE_SCHEMA, KLINE_SCHEMA, US_THRESHOLD, Market, interval_us
from rltrader.errors import DataError, NotInArchiveError

log = logging.getLogger(__name__)

# Spot archive files (and spot's microsecond REST/ws mode) switched to µs timestamps on this date.
_SPOT_US_ERA = datetime(2025, 1, 1, tzinfo=UTC)
_QUOTE_ASSETS = ("FDUSD", "USDT", "USDC", "BUSD", "TUSD", "USDP", "DAI", "BTC", "ETH", "BNB", "EUR", "TRY",
                 "BRL", "JPY", "GBP", "AUD", "XRP", "DOGE")
_BINANCE_INTERVALS = {"1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d", "3d",
                      "1w", "1M"}
_MANDATORY = "Mandatory parameter '{}' was not sent, was empty/null, or malformed."
_STREAM_RE = re.compile(r"^([a-z0-9]+)@(aggTrade|kline_[0-9]+[smhdwM])$")
_CONTINUOUS_RE = re.compile(r"^([a-z0-9]+)_perpetual@continuousKline_([0-9]+[smhdwM])$")
MalformedKind = Literal["not_json", "bad_shape"]


# -- faults ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Faults:
    """Network misbehaviour applied to every websocket connection, counted per connection.

    ``drop_after``: after this many data messages, abruptly close the TCP connection (no close frame, like a
    network failure; a reconnecting client is dropped again after as many). The break replaces the next
    message: it happens when that message comes due on the replay clock, not in the same instant as the last
    write, so a client that keeps up with market time reads exactly ``drop_after`` messages before it sees the
    break (python-binance discards frames it has received but not yet read once it notices a closed
    connection). With no further event the connection is not dropped. ``stall_after``/``stall_seconds``:
    once per connection, after that many messages, send nothing for that long while keeping the socket open;
    the events that came due meanwhile follow in a burst, as after a real network stall. ``malformed_every``:
    after every N-th data message insert one extra broken frame (``not_json`` text, or ``bad_shape`` JSON
    whose payload misses the fields a consumer needs); no real message is lost to it.
    """

    drop_after: int | None = None
    stall_after: int | None = None
    stall_seconds: float = 0.0
    malformed_every: int | None = None
    malformed_kind: MalformedKind = "not_json"

    def __post_init__(self) -> None:
        for name in ("drop_after", "stall_after", "malformed_every"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"fault {name} must be a positive integer or null, not {v!r}")
        if self.stall_seconds < 0:
            raise ValueError(f"fault stall_seconds must be >= 0, not {self.stall_seconds!r}")
        if self.malformed_kind not in ("not_json", "bad_shape"):
            raise ValueError(f"fault malformed_kind must be 'not_json' or 'bad_shape', "
                             f"not {self.malformed_kind!r}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Faults:
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown fault setting(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RateLimit:
    """Request-weight budget per window; exceeding it answers HTTP 429 with Binance's -1003 error.

    The window is wall-clock time (Binance limits real requests, not market time); tests shorten it.
    """

    weight: int
    window_s: float = 60.0


# -- clock -------------------------------------------------------------------------------------------------
def _to_ms(t: datetime | int) -> int:
    if isinstance(t, datetime):
        if t.tzinfo is None:
            t = t.replace(tzinfo=UTC)
        return int(t.timestamp() * 1000)
    return int(t)


class ReplayClock:
    """Market time of the replay, in epoch milliseconds; thread-safe, never goes backwards.

    ``speed`` is market seconds per real second (60 = a minute per second). Speed 0 or ``inf`` is "as fast as
    possible": time then only moves when a websocket sender needs the next event (it jumps to that event) or
    when :meth:`advance_to` is called, so REST sees exactly as far as the streams have got. ``pause()``
    freezes the clock so tests can step it with :meth:`advance_to`/:meth:`advance` and nothing else moves it.
    """

    def __init__(self, start: datetime | int, speed: float = 60.0, *, paused: bool = False,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._mono = monotonic
        self._anchor_ms = float(_to_ms(start))
        self._anchor_mono = monotonic()
        self._speed = self._check_speed(speed)
        self._paused = paused

    @staticmethod
    def _check_speed(speed: float) -> float:
        if math.isnan(speed) or speed < 0:
            raise ValueError(f"replay speed must be >= 0 (0 or inf = as fast as possible), not {speed}")
        return speed

    @property
    def speed(self) -> float:
        return self._speed

    @property
    def fast(self) -> bool:
        return self._speed == 0 or math.isinf(self._speed)

    @property
    def paused(self) -> bool:
        return self._paused

    def _now_locked(self) -> float:
        if self._paused or self.fast:
            return self._anchor_ms
        return self._anchor_ms + (self._mono() - self._anchor_mono) * self._speed * 1000.0

    def _reanchor(self, ms: float) -> None:
        self._anchor_ms = ms
        self._anchor_mono = self._mono()

    def now_ms(self) -> int:
        with self._lock:
            return int(self._now_locked())

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.now_ms() / 1000, tz=UTC)

    def set_speed(self, speed: float) -> None:
        with self._lock:
            self._reanchor(self._now_locked())
            self._speed = self._check_speed(speed)

    def pause(self) -> None:
        with self._lock:
            self._reanchor(self._now_locked())
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._reanchor(self._now_locked())
            self._paused = False

    def advance_to(self, t: datetime | int) -> None:
        """Jump forward to ``t``; a time already passed is ignored (market time never runs backwards)."""
        with self._lock:
            self._reanchor(max(self._now_locked(), float(_to_ms(t))))

    def advance(self, delta: timedelta) -> None:
        with self._lock:
            self._reanchor(self._now_locked() + delta / timedelta(milliseconds=1))

    async def wait_until(self, t_ms: int) -> None:
        """Return once market time has reached ``t_ms``; in fast mode by moving the clock there.

        Polls in short real-time steps rather than computing one sleep, because speed, pause state and the
        time itself can be changed from another thread while we wait.
        """
        while True:
            with self._lock:
                if self.fast and not self._paused:
                    self._reanchor(max(self._anchor_ms, float(t_ms)))
                    return
                now = self._now_locked()
                if now >= t_ms:
                    return
                delay = 0.02 if self._paused else min((t_ms - now) / self._speed / 1000.0, 0.05)
            await asyncio.sleep(max(delay, 0.0005))


# -- data --------------------------------------------------------------------------------------------------
def _decimals(s: pl.Series, *, cap: int = 8) -> int | None:
    """Fewest decimals (≤ cap) that print every value back to the same float; None if none do.

    Values parsed from Binance's fixed-decimal strings always pass at 8, so printing with this many decimals
    gives the client exactly the float the archive holds.
    """
    s = s.drop_nulls()
    if s.is_empty():
        return 0
    for k in range(cap + 1):
        if bool((s.round(k) == s).all()):
            return k
    return None


def _fmt(x: float, decimals: int | None) -> str:
    if decimals is None:
        return format(Decimal(repr(x)), "f")
    return f"{x:.{decimals}f}"


@dataclass
class _K:
    """Running state of one candle (decimals as floats, as in KLINE_SCHEMA)."""

    o: float
    h: float
    l: float  # noqa: E741 - Binance's own field name
    c: float
    v: float = 0.0
    q: float = 0.0
    n: int = 0
    bv: float = 0.0
    bq: float = 0.0
    f: int = -1
    last: int = -1


def _us(col: str) -> pl.Expr:
    return pl.col(col).dt.epoch("us")


@dataclass
class _Symbol:
    """One symbol's candles and trades as plain lists: per-event access from Python must be cheap."""

    symbol: str
    open_us: list[int]
    close_us: list[int]
    open_ms: list[int]
    close_ms: list[int]
    o: list[float]
    h: list[float]
    l: list[float]  # noqa: E741
    c: list[float]
    v: list[float]
    q: list[float]
    n: list[int]
    bv: list[float]
    bq: list[float]
    first_id: list[int]  # first trade id of each candle (from trades, else synthetic but consistent)
    tr_lo: list[int]  # trades of candle i are trades[tr_lo[i]:tr_hi[i]]
    tr_hi: list[int]
    a: list[int]
    p: list[float]
    qty: list[float]
    f: list[int]
    last: list[int]
    t_us: list[int]
    t_ms: list[int]
    m: list[bool]
    best: list[bool]
    price_dec: int | None
    qty_dec: int | None
    quote_dec: int | None


class ReplayData:
    """The recorded market a server replays: 1m (or another base interval) klines and aggTrades per symbol.

    Candles missing from the klines but fully covered by trades (a trade exists at or after the candle's end)
    are derived from the trades, so an aggTrades-only day still streams klines. A trailing candle that the
    trades do not cover completely is left out rather than invented.
    """

    def __init__(self, market: Market, klines: pl.DataFrame, agg_trades: pl.DataFrame | None = None,
                 *, interval: str = "1m") -> None:
        self.market = market
        self.interval = interval
        self.interval_ms = interval_us(interval) // 1000
        klines = klines.filter(pl.col("interval") == interval) if klines.height else klines
        trades = agg_trades if agg_trades is not None else pl.DataFrame(schema=AGG_TRADE_SCHEMA)
        syms = sorted(set(klines.get_column("symbol").to_list()) | set(trades.get_column("symbol").to_list()))
        if not syms:
            raise DataError("replay data is empty: no klines and no aggTrades for any symbol")
        self.symbols: dict[str, _Symbol] = {
            s: self._build(s, klines.filter(pl.col("symbol") == s), trades.filter(pl.col("symbol") == s))
            for s in syms
        }

    @classmethod
    def from_archive(cls, archive_base: str, market: Market | str, symbols: Sequence[str], start: date,
                     end: date, *, interval: str = "1m", agg_trades: bool = True) -> ReplayData:
        """Load the inclusive date range from the archive; a symbol needs klines or aggTrades (or both)."""
        market = Market(market)
        source = ArchiveSource(archive_base)
        kl: list[pl.DataFrame] = []
        tr: list[pl.DataFrame] = []
        kinds: list[tuple[Kind, str | None, list[pl.DataFrame]]] = [("klines", interval, kl)]
        if agg_trades:
            kinds.append(("aggTrades", None, tr))
        for sym in symbols:
            sym = sym.upper()
            found = False
            for kind, iv, out in kinds:
                try:
                    files = source.plan(market, kind, sym, iv, start, end)
                except NotInArchiveError:
                    continue
                for f in files:
                    parsed = load_file(source, f)
                    if parsed.bad.height:
                        log.warning("replay: %d invalid rows skipped in %s", parsed.bad.height, f.relpath)
                    out.append(parsed.rows)
                    found = True
            if not found:
                raise NotInArchiveError(
                    f"{archive_base}: no {interval} klines or aggTrades for {sym} on {market.value} between "
                    f"{start} and {end}"
                )
        klines = pl.concat(kl) if kl else pl.DataFrame(schema=KLINE_SCHEMA)
        trades = pl.concat(tr) if tr else pl.DataFrame(schema=AGG_TRADE_SCHEMA)
        return cls(market, klines, trades, interval=interval)

    def _close_offset_us(self, open_us: int) -> int:
        """Close minus open time in the archive's convention: the last ms, or the last µs in spot's µs era."""
        step = self.interval_ms * 1000
        us_era = self.market is Market.SPOT and open_us >= int(_SPOT_US_ERA.timestamp() * 1_000_000)
        return step - 1 if us_era else step - 1000

    def _build(self, symbol: str, kl: pl.DataFrame, tr: pl.DataFrame) -> _Symbol:
        tr = tr.unique("agg_trade_id", keep="first").sort("agg_trade_id")
        kl = kl.unique("open_time", keep="first").sort("open_time")
        qty_dec = _decimals(tr.get_column("quantity")) if tr.height else None
        kcols = kl.select(
            _us("open_time").alias("open_us"), _us("close_time").alias("close_us"),
            "open", "high", "low", "close", "volume", "quote_volume", "trades", "taker_buy_volume",
            "taker_buy_quote_volume",
        )
        if tr.height:
            derived = self._from_trades(tr, qty_dec)
            kcols = pl.concat([kcols, derived.join(kcols.select("open_us"), on="open_us", how="anti")])
            kcols = kcols.sort("open_us")
        d = {c: kcols.get_column(c).to_list() for c in kcols.columns}
        t_us: list[int] = tr.select(_us("transact_time")).to_series().to_list()
        lo = [bisect_left(t_us, x) for x in d["open_us"]]
        hi = [bisect_left(t_us, x + self.interval_ms * 1000) for x in d["open_us"]]
        f_ids = tr.get_column("first_trade_id").to_list()
        first_id: list[int] = []
        counter = 1
        for i, n in enumerate(d["trades"]):
            if hi[i] > lo[i]:
                first_id.append(f_ids[lo[i]])
                counter = f_ids[lo[i]] + n
            else:
                first_id.append(counter if n else -1)
                counter += n
        prices = pl.concat([kcols.get_column(c) for c in ("open", "high", "low", "close")]
                           + [tr.get_column("price")])
        price_dec: int | None
        quote_dec: int | None
        if self.market is Market.SPOT:
            # Spot prints every decimal with 8 places ("7195.24000000").
            price_dec = qty_dec = quote_dec = 8
        else:
            price_dec = _decimals(prices)
            qty_dec = _decimals(pl.concat([kcols.get_column("volume"), kcols.get_column("taker_buy_volume"),
                                           tr.get_column("quantity")]))
            quote_dec = _decimals(pl.concat([kcols.get_column("quote_volume"),
                                             kcols.get_column("taker_buy_quote_volume")]))
        if self.market is Market.SPOT:
            # …unless a value needs more (not seen in archive data; keeps exactness if it ever is).
            price_dec = 8 if _decimals(prices) is not None else None
        return _Symbol(
            symbol=symbol,
            open_us=d["open_us"], close_us=d["close_us"],
            open_ms=[x // 1000 for x in d["open_us"]], close_ms=[x // 1000 for x in d["close_us"]],
            o=d["open"], h=d["high"], l=d["low"], c=d["close"], v=d["volume"], q=d["quote_volume"],
            n=d["trades"], bv=d["taker_buy_volume"], bq=d["taker_buy_quote_volume"],
            first_id=first_id, tr_lo=lo, tr_hi=hi,
            a=tr.get_column("agg_trade_id").to_list(), p=tr.get_column("price").to_list(),
            qty=tr.get_column("quantity").to_list(), f=f_ids, last=tr.get_column("last_trade_id").to_list(),
            t_us=t_us, t_ms=[x // 1000 for x in t_us], m=tr.get_column("is_buyer_maker").to_list(),
            best=tr.get_column("is_best_match").to_list(),
            price_dec=price_dec, qty_dec=qty_dec, quote_dec=quote_dec,
        )

    def _from_trades(self, tr: pl.DataFrame, qty_dec: int | None) -> pl.DataFrame:
        step = self.interval_ms * 1000
        last_t = tr.select(_us("transact_time").max()).item()
        taker_buy = ~pl.col("is_buyer_maker")
        notional = pl.col("price") * pl.col("quantity")
        out = (
            tr.with_columns(open_us=(_us("transact_time") // step) * step)
            .group_by("open_us", maintain_order=True)
            .agg(
                pl.col("price").first().alias("open"),
                pl.col("price").max().alias("high"),
                pl.col("price").min().alias("low"),
                pl.col("price").last().alias("close"),
                pl.col("quantity").sum().alias("volume"),
                notional.sum().alias("quote_volume"),
                (pl.col("last_trade_id") - pl.col("first_trade_id") + 1).sum().alias("trades"),
                pl.col("quantity").filter(taker_buy).sum().alias("taker_buy_volume"),
                notional.filter(taker_buy).sum().alias("taker_buy_quote_volume"),
            )
            .filter(pl.col("open_us") + step <= last_t)
        )
        rq = qty_dec if qty_dec is not None else 8
        out = out.with_columns(
            pl.col("volume").round(rq), pl.col("taker_buy_volume").round(rq),
            pl.col("quote_volume").round(8), pl.col("taker_buy_quote_volume").round(8),
            pl.col("trades").cast(pl.Int64),
        )
        closes = [o + self._close_offset_us(o) for o in out.get_column("open_us").to_list()]
        return out.with_columns(close_us=pl.Series(closes, dtype=pl.Int64)).select(
            "open_us", "close_us", "open", "high", "low", "close", "volume", "quote_volume", "trades",
            "taker_buy_volume", "taker_buy_quote_volume",
        )


# -- server ------------------------------------------------------------------------------------------------
class BinanceError(Exception):
    """A request error answered with Binance's ``{"code": …, "msg": …}`` JSON."""

    def __init__(self, code: int, msg: str, status: int = 400,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.status = status
        self.headers = dict(headers or {})


@dataclass
class ServerStats:
    """Counters tests and operators read to see what the server did."""

    connections: int = 0
    active_connections: int = 0
    messages_sent: int = 0
    malformed_sent: int = 0
    drops: int = 0
    stalls: int = 0
    requests: int = 0
    rate_limited: int = 0


@dataclass
class _Weight:
    window_start: float = 0.0
    used: int = 0


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _split_symbol(symbol: str) -> tuple[str, str]:
    for q in _QUOTE_ASSETS:
        if symbol.endswith(q) and len(symbol) > len(q):
            return symbol[: -len(q)], q
    return symbol[:-4], symbol[-4:]


class ReplayServer:
    """The replay server: REST under ``/api/v3`` (spot) or ``/fapi/v1`` (USDⓈ-M), websockets under
    ``/ws/<stream>`` and ``/stream?streams=…`` (also below ``/market/`` and ``/public/`` as python-binance's
    futures sockets use), and a small control API under ``/_replay/``.

    Point python-binance at it with ``API_URL = rest_base_url + "/api"``, ``FUTURES_URL = rest_base_url +
    "/fapi"`` and ``STREAM_URL``/``FSTREAM_URL = ws_base_url`` (see :mod:`rltrader.data.rest`).
    """

    def __init__(self, data: ReplayData, start: datetime | int | None = None, *, speed: float = 60.0,
                 host: str = "127.0.0.1", port: int = 0, faults: Faults | None = None,
                 rate_limit: RateLimit | None = None, clock: ReplayClock | None = None,
                 heartbeat_s: float | None = 20.0) -> None:
        self.data = data
        self.market = data.market
        if clock is None:
            if start is None:
                start = min(s.open_ms[0] if s.open_ms else s.t_ms[0] for s in data.symbols.values())
            clock = ReplayClock(start, speed)
        self.clock = clock
        self.host = host
        self._port = port
        self.faults = faults or Faults()
        self.rate_limit = rate_limit
        self.stats = ServerStats()
        self.heartbeat_s = heartbeat_s
        self._weights: dict[str, _Weight] = {}
        self._runner: web.AppRunner | None = None
        self._sockets: set[web.WebSocketResponse] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._spot = self.market is Market.SPOT
        self._update_ms = 2000 if self._spot else 250  # kline stream push interval on the real exchange

    @classmethod
    def from_archive(cls, archive_base: str, market: Market | str, symbols: Sequence[str],
                     start: datetime, end: datetime | None = None, *, days: int = 1, interval: str = "1m",
                     agg_trades: bool = True, **kwargs: Any) -> ReplayServer:
        """Load ``[start, end]`` (default ``start + days``) from the archive and replay it from ``start``.

        Whole days are loaded, so REST also serves the part of the first day before ``start`` as history.
        """
        if start.tzinfo is None:
            start = start.replace(tzinfo=UTC)
        last = end if end is not None else start + timedelta(days=days)
        data = ReplayData.from_archive(archive_base, market, symbols, start.date(), last.date(),
                                       interval=interval, agg_trades=agg_trades)
        return cls(data, start, **kwargs)

    # -- lifecycle -----------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._port

    @property
    def rest_base_url(self) -> str:
        return f"http://{self.host}:{self._port}"

    @property
    def ws_base_url(self) -> str:
        return f"ws://{self.host}:{self._port}/"

    def set_faults(self, faults: Faults | None = None, **changes: Any) -> Faults:
        """Replace the faults (or change some fields); applies from the next message of every connection."""
        base = faults if faults is not None else self.faults
        self.faults = replace(base, **changes) if changes else base
        log.info("replay: faults now %s", self.faults)
        return self.faults

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        # Both markets' prefixes: AsyncClient.create() pings spot's /api/v3 even for a futures user. On the
        # market not replayed the data endpoints know no symbol, which is what that market would answer.
        for prefix in ("/api/v3", "/fapi/v1"):
            app.router.add_get(f"{prefix}/ping", self._ping)
            app.router.add_get(f"{prefix}/time", self._time)
            app.router.add_get(f"{prefix}/exchangeInfo", self._exchange_info)
            app.router.add_get(f"{prefix}/klines", self._klines)
            app.router.add_get(f"{prefix}/aggTrades", self._agg_trades)
        for base in ("", "/market", "/public"):
            app.router.add_get(f"{base}/stream", self._ws_combined)
            app.router.add_get(base + "/ws/{streams:.+}", self._ws_raw)
        app.router.add_get("/_replay/status", self._ctl_status)
        app.router.add_get("/_replay/faults", self._ctl_get_faults)
        app.router.add_post("/_replay/faults", self._ctl_set_faults)
        app.router.add_post("/_replay/clock", self._ctl_clock)
        return app

    async def start(self) -> None:
        runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._port)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self._port = int(sockets[0].getsockname()[1])
        self._runner = runner
        log.info("replay: %s %s on %s (ws %s) from %s at speed %s", self.market.value,
                 ",".join(self.data.symbols), self.rest_base_url, self.ws_base_url, self.clock.now(),
                 self.clock.speed)

    async def stop(self) -> None:
        for ws in list(self._sockets):
            with contextlib.suppress(Exception):
                await ws.close(code=1001, message=b"server shutdown")
        for task in list(self._tasks):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> ReplayServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- REST plumbing -------------------------------------------------------------------------------------
    def _weight_of(self, request: web.Request) -> int:
        name = request.path.rsplit("/", 1)[-1]
        if request.path.startswith("/api/"):
            return {"ping": 1, "time": 1, "exchangeInfo": 20, "klines": 2, "aggTrades": 4}.get(name, 1)
        if name == "klines":
            try:
                limit = int(request.query.get("limit", "500"))
            except ValueError:
                limit = 500
            return 1 if limit < 100 else 2 if limit < 500 else 5 if limit <= 1000 else 10
        return {"ping": 1, "time": 1, "exchangeInfo": 1, "aggTrades": 20}.get(name, 1)

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        if request.path.startswith("/_replay/") or request.path.endswith("/stream") or "/ws/" in request.path:
            resp: web.StreamResponse = await handler(request)
            return resp
        self.stats.requests += 1
        ip = request.remote or "?"
        window = self.rate_limit.window_s if self.rate_limit else 60.0
        now = time.time()
        w = self._weights.setdefault(ip, _Weight())
        if now - w.window_start >= window:
            # Binance resets at each wall-clock minute; align the same way.
            w.window_start = now - (now % window) if window == 60.0 else now
            w.used = 0
        w.used += self._weight_of(request)
        headers = {"X-MBX-USED-WEIGHT-1m": str(w.used), "X-MBX-USED-WEIGHT": str(w.used)}
        try:
            if self.rate_limit is not None and w.used > self.rate_limit.weight:
                self.stats.rate_limited += 1
                retry = max(1, math.ceil(w.window_start + window - now))
                raise BinanceError(
                    -1003,
                    f"Too much request weight used; current limit is {self.rate_limit.weight} request weight "
                    f"per {window:g} SECONDS. Please use WebSocket Streams for live updates to avoid polling "
                    "the API.",
                    status=429, headers={"Retry-After": str(retry)},
                )
            resp = await handler(request)
        except BinanceError as exc:
            headers.update(exc.headers)
            return web.json_response({"code": exc.code, "msg": exc.msg}, status=exc.status, headers=headers,
                                     dumps=_dumps)
        resp.headers.update(headers)
        return resp

    def _served(self, request: web.Request) -> bool:
        """Whether the request is for the market this server replays (by its URL prefix)."""
        return request.path.startswith("/api/") == self._spot

    def _micro(self, request: web.Request) -> bool:
        unit = request.headers.get("X-MBX-TIME-UNIT", "") or request.query.get("timeUnit", "")
        if unit.upper() not in ("", "MILLISECOND", "MICROSECOND"):
            raise BinanceError(-1100, f"Illegal characters found in parameter 'timeUnit'; {unit!r} is not "
                                      "valid.")
        return self._spot and unit.upper() == "MICROSECOND"

    def _symbol(self, request: web.Request) -> _Symbol:
        raw = request.query.get("symbol", "")
        if not raw:
            raise BinanceError(-1102, _MANDATORY.format("symbol"))
        sd = self.data.symbols.get(raw.upper()) if self._served(request) else None
        if sd is None:
            raise BinanceError(-1121, "Invalid symbol.")
        return sd

    @staticmethod
    def _int(request: web.Request, name: str) -> int | None:
        raw = request.query.get(name)
        if raw is None or raw == "":
            return None
        if not re.fullmatch(r"-?[0-9]{1,20}", raw):
            raise BinanceError(-1100, f"Illegal characters found in parameter '{name}'; legal range is "
                                      "'^[0-9]{1,20}$'.")
        return int(raw)

    def _time_param(self, request: web.Request, name: str) -> int | None:
        """A time parameter in ms; µs values (spot accepts both) are recognised by their magnitude."""
        v = self._int(request, name)
        if v is not None and v >= US_THRESHOLD:
            v //= 1000
        return v

    def _limit(self, request: web.Request, maximum: int) -> int:
        limit = self._int(request, "limit")
        if limit is None:
            return 500
        if limit <= 0:
            raise BinanceError(-1130, "Data sent for parameter 'limit' is not valid.")
        return min(limit, maximum)

    # -- REST endpoints ------------------------------------------------------------------------------------
    async def _ping(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _time(self, request: web.Request) -> web.Response:
        return web.json_response({"serverTime": self.clock.now_ms()})

    async def _exchange_info(self, request: web.Request) -> web.Response:
        wanted = request.query.get("symbol")
        if wanted is not None:
            syms = [self._symbol(request)]
        else:
            syms = list(self.data.symbols.values()) if self._served(request) else []
        rate_weight = self.rate_limit.weight if self.rate_limit else (6000 if self._spot else 2400)
        body: dict[str, Any] = {
            "timezone": "UTC",
            "serverTime": self.clock.now_ms(),
            "rateLimits": [
                {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1,
                 "limit": rate_weight},
                {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100},
            ],
            "exchangeFilters": [],
            "symbols": [self._symbol_info(s) for s in syms],
        }
        if not self._spot:
            body["futuresType"] = "U_MARGINED"
            quotes = sorted({_split_symbol(s.symbol)[1] for s in syms})
            body["assets"] = [{"asset": q, "marginAvailable": True, "autoAssetExchange": "0"} for q in quotes]
        return web.json_response(body, dumps=_dumps)

    def _symbol_info(self, sd: _Symbol) -> dict[str, Any]:
        base, quote = _split_symbol(sd.symbol)
        pdec = sd.price_dec if sd.price_dec is not None else 8
        if self._spot:
            # Spot prints filters with 8 decimals whatever the tick; derive tick/step from the data itself.
            prices = [*sd.o, *sd.h, *sd.l, *sd.c, *sd.p]
            pdec = _decimals(pl.Series(prices, dtype=pl.Float64)) or 0
            qdec = _decimals(pl.Series(sd.qty if sd.qty else sd.v, dtype=pl.Float64)) or 0
        else:
            qdec = sd.qty_dec if sd.qty_dec is not None else 3
        tick, step = 10.0 ** -pdec, 10.0 ** -qdec
        hi_price = max([*sd.h, *sd.p], default=1.0)
        max_price = 10.0 ** (math.ceil(math.log10(max(hi_price, 1e-8))) + 2)
        max_qty = 10.0 ** (math.ceil(math.log10(max([*sd.v, *sd.qty, 1.0]))) + 1)
        min_notional = {"BTC": 0.0001, "ETH": 0.001, "BNB": 0.01}.get(quote, 5.0)
        if self._spot:

            def f8(x: float) -> str:
                return f"{x:.8f}"

            return {
                "symbol": sd.symbol, "status": "TRADING", "baseAsset": base, "baseAssetPrecision": 8,
                "quoteAsset": quote, "quotePrecision": 8, "quoteAssetPrecision": 8,
                "baseCommissionPrecision": 8, "quoteCommissionPrecision": 8,
                "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS", "STOP_LOSS_LIMIT",
                               "TAKE_PROFIT", "TAKE_PROFIT_LIMIT"],
                "icebergAllowed": True, "ocoAllowed": True, "otoAllowed": True,
                "quoteOrderQtyMarketAllowed": True,
                "allowTrailingStop": True, "cancelReplaceAllowed": True, "amendAllowed": True,
                "isSpotTradingAllowed": True, "isMarginTradingAllowed": False,
                "filters": [
                    {"filterType": "PRICE_FILTER", "minPrice": f8(tick), "maxPrice": f8(max_price),
                     "tickSize": f8(tick)},
                    {"filterType": "LOT_SIZE", "minQty": f8(step), "maxQty": f8(max_qty),
                     "stepSize": f8(step)},
                    {"filterType": "NOTIONAL", "minNotional": f8(min_notional), "applyMinToMarket": True,
                     "maxNotional": f8(9_000_000.0), "applyMaxToMarket": False, "avgPriceMins": 5},
                    {"filterType": "MARKET_LOT_SIZE", "minQty": f8(0.0), "maxQty": f8(max_qty),
                     "stepSize": f8(0.0)},
                    {"filterType": "MAX_NUM_ORDERS", "maxNumOrders": 200},
                ],
                "permissions": [], "permissionSets": [["SPOT"]],
                "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
                "allowedSelfTradePreventionModes": ["EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH",
                                                    "DECREMENT"],
            }

        def fp(x: float) -> str:
            return _fmt(x, pdec)

        def fq(x: float) -> str:
            return _fmt(x, qdec)

        return {
            "symbol": sd.symbol, "pair": sd.symbol, "contractType": "PERPETUAL",
            "deliveryDate": 4133404800000,
            "onboardDate": min(sd.open_ms[:1] + sd.t_ms[:1]), "status": "TRADING",
            "maintMarginPercent": "2.5000", "requiredMarginPercent": "5.0000",
            "baseAsset": base, "quoteAsset": quote, "marginAsset": quote,
            "pricePrecision": pdec, "quantityPrecision": qdec, "baseAssetPrecision": 8, "quotePrecision": 8,
            "underlyingType": "COIN", "underlyingSubType": [], "triggerProtect": "0.0500",
            "liquidationFee": "0.012500", "marketTakeBound": "0.05", "maxMoveOrderLimit": 10000,
            "filters": [
                {"filterType": "PRICE_FILTER", "minPrice": fp(tick), "maxPrice": fp(max_price),
                 "tickSize": fp(tick)},
                {"filterType": "LOT_SIZE", "minQty": fq(step), "maxQty": fq(max_qty), "stepSize": fq(step)},
                {"filterType": "MARKET_LOT_SIZE", "minQty": fq(step), "maxQty": fq(max_qty / 10),
                 "stepSize": fq(step)},
                {"filterType": "MAX_NUM_ORDERS", "limit": 200},
                {"filterType": "MAX_NUM_ALGO_ORDERS", "limit": 10},
                {"filterType": "MIN_NOTIONAL", "notional": _fmt(min_notional, None)},
                {"filterType": "PERCENT_PRICE", "multiplierUp": "1.0500", "multiplierDown": "0.9500",
                 "multiplierDecimal": "4"},
            ],
            "orderTypes": ["LIMIT", "MARKET", "STOP", "STOP_MARKET", "TAKE_PROFIT", "TAKE_PROFIT_MARKET",
                           "TRAILING_STOP_MARKET"],
            "timeInForce": ["GTC", "IOC", "FOK", "GTX", "GTD"],
        }

    # -- candle state --------------------------------------------------------------------------------------
    def _final(self, sd: _Symbol, i: int) -> _K:
        n = sd.n[i]
        f = sd.first_id[i]
        return _K(sd.o[i], sd.h[i], sd.l[i], sd.c[i], sd.v[i], sd.q[i], n, sd.bv[i], sd.bq[i],
                  f, f + n - 1 if f >= 0 else -1)

    def _synthetic(self, sd: _Symbol, i: int) -> list[tuple[int, _K]]:
        """Two in-progress states at 1/3 and 2/3 of the candle for candles without trades.

        The price path goes open → first extreme → second extreme → close (down first when the candle closes
        up), so every partial is a valid candle whose high/low never exceed the final ones and whose volumes
        only grow: consistent with the final candle, though not what really happened.
        """
        o, h, lo, c = sd.o[i], sd.h[i], sd.l[i], sd.c[i]
        e1, e2 = (lo, h) if c >= o else (h, lo)
        f = sd.first_id[i]
        out: list[tuple[int, _K]] = []
        for k, e in ((1, e1), (2, e2)):
            frac = k / 3
            n = int(sd.n[i] * frac)
            st = _K(o, max(o, e1, e if k == 2 else o), min(o, e1, e if k == 2 else o), e,
                    sd.v[i] * frac, sd.q[i] * frac, n, sd.bv[i] * frac, sd.bq[i] * frac,
                    f if n else -1, f + n - 1 if n else -1)
            out.append((sd.open_ms[i] + self.data.interval_ms * k // 3, st))
        return out

    @staticmethod
    def _add_trade(st: _K | None, sd: _Symbol, j: int) -> _K:
        p, q = sd.p[j], sd.qty[j]
        if st is None:
            st = _K(p, p, p, p, f=sd.f[j])
        st.h = max(st.h, p)
        st.l = min(st.l, p)
        st.c = p
        st.v += q
        st.q += p * q
        st.n += sd.last[j] - sd.f[j] + 1
        if not sd.m[j]:
            st.bv += q
            st.bq += p * q
        st.last = sd.last[j]
        return st

    def _state_at(self, sd: _Symbol, i: int, now_ms: int) -> _K:
        """The candle as the exchange shows it at ``now_ms`` while it is still open."""
        empty = _K(sd.o[i], sd.o[i], sd.o[i], sd.o[i])
        lo, hi = sd.tr_lo[i], sd.tr_hi[i]
        if hi > lo:
            st: _K | None = None
            for j in range(lo, hi):
                if sd.t_ms[j] > now_ms:
                    break
                st = self._add_trade(st, sd, j)
            return st or empty
        best = empty
        for t, s in self._synthetic(sd, i):
            if t <= now_ms:
                best = s
        return best

    # -- REST data endpoints -------------------------------------------------------------------------------
    async def _klines(self, request: web.Request) -> web.Response:
        sd = self._symbol(request)
        interval = request.query.get("interval", "")
        if not interval:
            raise BinanceError(-1102, _MANDATORY.format("interval"))
        if interval not in _BINANCE_INTERVALS:
            raise BinanceError(-1120, "Invalid interval.")
        if interval != self.data.interval:
            raise BinanceError(-1120, f"Invalid interval. (this replay serves {self.data.interval} "
                                      "klines only)")
        start = self._time_param(request, "startTime")
        end = self._time_param(request, "endTime")
        limit = self._limit(request, 1000 if self._spot else 1500)
        micro = self._micro(request)
        if start is not None and end is not None and start > end:
            raise BinanceError(-1023, "Start time is greater than end time.")
        now = self.clock.now_ms()
        # Visible: candles that have opened by now (the last one may still be in progress).
        hi = bisect_right(sd.open_ms, now if end is None else min(now, end))
        if start is not None:
            lo = bisect_left(sd.open_ms, start)
            idx = range(lo, min(hi, lo + limit))
        else:
            idx = range(max(0, hi - limit), hi)
        rows = []
        for i in idx:
            st = self._final(sd, i) if sd.close_ms[i] < now else self._state_at(sd, i, now)
            t_open = sd.open_us[i] if micro else sd.open_ms[i]
            t_close = sd.close_us[i] if micro else sd.close_ms[i]
            rows.append([
                t_open, _fmt(st.o, sd.price_dec), _fmt(st.h, sd.price_dec), _fmt(st.l, sd.price_dec),
                _fmt(st.c, sd.price_dec), _fmt(st.v, sd.qty_dec), t_close, _fmt(st.q, sd.quote_dec), st.n,
                _fmt(st.bv, sd.qty_dec), _fmt(st.bq, sd.quote_dec), "0",
            ])
        return web.json_response(rows, dumps=_dumps)

    def _trade(self, sd: _Symbol, j: int, micro: bool) -> dict[str, Any]:
        d: dict[str, Any] = {
            "a": sd.a[j], "p": _fmt(sd.p[j], sd.price_dec), "q": _fmt(sd.qty[j], sd.qty_dec), "f": sd.f[j],
            "l": sd.last[j], "T": sd.t_us[j] if micro else sd.t_ms[j], "m": sd.m[j],
        }
        if self._spot:
            d["M"] = sd.best[j]
        return d

    async def _agg_trades(self, request: web.Request) -> web.Response:
        sd = self._symbol(request)
        from_id = self._int(request, "fromId")
        start = self._time_param(request, "startTime")
        end = self._time_param(request, "endTime")
        limit = self._limit(request, 1000)
        micro = self._micro(request)
        if from_id is not None and (start is not None or end is not None):
            raise BinanceError(-1128, "Combination of optional parameters invalid.")
        if start is not None and end is not None:
            if start > end:
                raise BinanceError(-1023, "Start time is greater than end time.")
            if end - start >= 3_600_000:
                raise BinanceError(-1127, "More than 1 hours between startTime and endTime.")
        visible = bisect_right(sd.t_ms, self.clock.now_ms())
        if from_id is not None:
            lo = bisect_left(sd.a, from_id)
            idx = range(lo, min(visible, lo + limit))
        elif start is not None:
            lo = bisect_left(sd.t_ms, start)
            hi = visible if end is None else min(visible, bisect_right(sd.t_ms, end))
            idx = range(lo, min(hi, lo + limit))
        else:
            hi = visible if end is None else min(visible, bisect_right(sd.t_ms, end))
            idx = range(max(0, hi - limit), hi)
        return web.json_response([self._trade(sd, j, micro) for j in idx], dumps=_dumps)

    # -- websocket events ----------------------------------------------------------------------------------
    def _kline_event(self, sd: _Symbol, i: int, st: _K, closed: bool, e_ms: int,
                     micro: bool, continuous: bool = False) -> dict[str, Any]:
        event = {
            "e": "kline", "E": e_ms * 1000 if micro else e_ms, "s": sd.symbol,
            "k": {
                "t": sd.open_us[i] if micro else sd.open_ms[i],
                "T": sd.close_us[i] if micro else sd.close_ms[i],
                "s": sd.symbol, "i": self.data.interval, "f": st.f, "L": st.last,
                "o": _fmt(st.o, sd.price_dec), "c": _fmt(st.c, sd.price_dec), "h": _fmt(st.h, sd.price_dec),
                "l": _fmt(st.l, sd.price_dec), "v": _fmt(st.v, sd.qty_dec), "n": st.n, "x": closed,
                "q": _fmt(st.q, sd.quote_dec), "V": _fmt(st.bv, sd.qty_dec), "Q": _fmt(st.bq, sd.quote_dec),
                "B": "0",
            },
        }
        if continuous:  # futures' <pair>_perpetual@continuousKline_<interval>: same candle, other envelope
            k = event["k"]
            assert isinstance(k, dict)
            del k["s"]
            return {"e": "continuous_kline", "E": event["E"], "ps": sd.symbol, "ct": "PERPETUAL", "k": k}
        return event

    def _kline_events(self, sd: _Symbol, stream: str, from_ms: int, micro: bool,
                      continuous: bool = False) -> Iterator[tuple[int, str, dict[str, Any]]]:
        """In-progress updates then the closed candle, for every candle whose events are not yet due.

        With trades, an update goes out at the end of each push interval in which trades happened, carrying
        everything traded so far; without, the two synthetic states. The closed candle (x=true) follows at
        close time + 1 ms, when the exchange publishes it.
        """
        upd = self._update_ms
        for i in range(bisect_left(sd.close_ms, from_ms - 1), len(sd.open_ms)):
            t, t_close = sd.open_ms[i], sd.close_ms[i]
            lo, hi = sd.tr_lo[i], sd.tr_hi[i]
            if hi > lo:
                st: _K | None = None
                window: int | None = None
                for j in range(lo, hi):
                    w = (sd.t_ms[j] - t) // upd
                    if window is not None and w != window and st is not None:
                        e = t + (window + 1) * upd
                        if from_ms <= e <= t_close:
                            yield e, stream, self._kline_event(sd, i, st, False, e, micro, continuous)
                    st = self._add_trade(st, sd, j)
                    window = w
                if window is not None and st is not None:
                    e = t + (window + 1) * upd
                    if from_ms <= e <= t_close:
                        yield e, stream, self._kline_event(sd, i, st, False, e, micro, continuous)
            else:
                for e, s in self._synthetic(sd, i):
                    if e >= from_ms:
                        yield e, stream, self._kline_event(sd, i, s, False, e, micro, continuous)
            e = t_close + 1
            if e >= from_ms:
                yield e, stream, self._kline_event(sd, i, self._final(sd, i), True, e, micro,
                                                   continuous)

    def _trade_events(self, sd: _Symbol, stream: str, from_ms: int,
                      micro: bool) -> Iterator[tuple[int, str, dict[str, Any]]]:
        for j in range(bisect_left(sd.t_ms, from_ms), len(sd.a)):
            e = sd.t_ms[j]
            d = {"e": "aggTrade", "E": e * 1000 if micro else e, "s": sd.symbol, **self._trade(sd, j, micro)}
            yield e, stream, d

    def _events(self, streams: Sequence[str], from_ms: int,
                micro: bool) -> Iterator[tuple[int, str, dict[str, Any]]]:
        gens: list[Iterator[tuple[int, str, dict[str, Any]]]] = []
        for stream in streams:
            m = _STREAM_RE.match(stream)
            cm = None if m or self._spot else _CONTINUOUS_RE.match(stream)
            name = m.group(1) if m else cm.group(1) if cm else ""
            sd = self.data.symbols.get(name.upper())
            if sd is None:
                # The exchange accepts such subscriptions and sends nothing; say so here at least.
                log.warning("replay: stream %r has no data in this replay; nothing is sent for it", stream)
                continue
            kind = m.group(2) if m else f"continuous_{cm.group(2) if cm else ''}"
            if kind == f"continuous_{self.data.interval}":
                gens.append(self._kline_events(sd, stream, from_ms, micro, continuous=True))
            elif kind == "aggTrade":
                gens.append(self._trade_events(sd, stream, from_ms, micro))
            elif kind == f"kline_{self.data.interval}":
                gens.append(self._kline_events(sd, stream, from_ms, micro))
            else:
                log.warning("replay: %r: only kline_%s is replayed", stream, self.data.interval)
        return heapq.merge(*gens, key=lambda ev: ev[0])

    @staticmethod
    def _malformed(kind: MalformedKind, stream: str, data: Mapping[str, Any], combined: bool) -> str:
        if kind == "not_json":
            # A frame cut off mid-object, as a truncated write would leave it.
            return '{"stream":"' + stream + '","data":{"e":"' + str(data.get("e")) + '",'
        broken = {"e": data.get("e"), "E": data.get("E"), "s": data.get("s"),
                  "k": "?" if "k" in data else None}
        return _dumps({"stream": stream, "data": broken} if combined else broken)

    async def _ws_combined(self, request: web.Request) -> web.StreamResponse:
        raw = request.query.get("streams", "")
        micro = request.query.get("timeUnit", "").upper() == "MICROSECOND"
        if "?" in raw:  # python-binance appends "?timeUnit=…" to the path even after "?streams="
            raw, _, extra = raw.partition("?")
            micro = micro or extra.upper().endswith("MICROSECOND")
        streams = [s for s in raw.split("/") if s]
        if not streams:
            raise web.HTTPBadRequest(text=_dumps({"code": -1102, "msg": _MANDATORY.format("streams")}),
                                     content_type="application/json")
        return await self._serve_ws(request, streams, combined=True, micro=micro and self._spot)

    async def _ws_raw(self, request: web.Request) -> web.StreamResponse:
        streams = [s for s in request.match_info["streams"].split("/") if s]
        micro = request.query.get("timeUnit", "").upper() == "MICROSECOND"
        return await self._serve_ws(request, streams, combined=False, micro=micro and self._spot)

    async def _serve_ws(self, request: web.Request, streams: list[str], *, combined: bool,
                        micro: bool) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=self.heartbeat_s, autoping=True)
        await ws.prepare(request)
        self.stats.connections += 1
        self.stats.active_connections += 1
        self._sockets.add(ws)
        pump = asyncio.ensure_future(self._pump(ws, request, streams, combined, micro))
        self._tasks.add(pump)
        try:
            async for msg in ws:  # keeps control frames flowing and notices the client leaving
                if msg.type == WSMsgType.TEXT:
                    await self._on_client_text(ws, msg.data)
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
            self._tasks.discard(pump)
            self._sockets.discard(ws)
            self.stats.active_connections -= 1
        return ws

    async def _on_client_text(self, ws: web.WebSocketResponse, text: str) -> None:
        """Live SUBSCRIBE/UNSUBSCRIBE is not replayed; answer as the exchange answers a request it rejects."""
        try:
            req = json.loads(text)
            req_id = req.get("id") if isinstance(req, dict) else None
        except ValueError:
            req_id = None
        await ws.send_str(_dumps({"error": {"code": 2, "msg": "Invalid request: the replay server serves the "
                                            "streams named in the URL only"}, "id": req_id}))

    async def _pump(self, ws: web.WebSocketResponse, request: web.Request, streams: list[str], combined: bool,
                    micro: bool) -> None:
        sent = 0
        stalled = False
        try:
            for e_ms, stream, data in self._events(streams, self.clock.now_ms(), micro):
                await self.clock.wait_until(e_ms)
                faults = self.faults
                if faults.drop_after is not None and sent >= faults.drop_after:
                    # Break instead of sending message drop_after + 1, now that it is due. Not right after
                    # the last write: the client would then notice the closed connection while the last
                    # messages still sat unread in its buffers and lose a varying number of them.
                    self.stats.drops += 1
                    transport = request.transport
                    if transport is not None:
                        transport.abort()  # no close frame: the client sees a broken connection
                    return
                if faults.stall_after is not None and sent >= faults.stall_after and not stalled:
                    stalled = True
                    self.stats.stalls += 1
                    await asyncio.sleep(faults.stall_seconds)
                await ws.send_str(_dumps({"stream": stream, "data": data} if combined else data))
                sent += 1
                self.stats.messages_sent += 1
                # send_str only suspends when the socket buffer is full; without this a fast replay would
                # monopolise the event loop (and starve a client or other connections sharing it).
                await asyncio.sleep(0)
                if faults.malformed_every is not None and sent % faults.malformed_every == 0:
                    await ws.send_str(self._malformed(faults.malformed_kind, stream, data, combined))
                    self.stats.malformed_sent += 1
        except (ConnectionResetError, RuntimeError) as exc:  # client went away mid-send
            log.debug("replay: websocket send ended: %s", exc)

    # -- control API ---------------------------------------------------------------------------------------
    async def _ctl_status(self, request: web.Request) -> web.Response:
        return web.json_response(_status(self), dumps=_dumps)

    async def _ctl_get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self.faults.to_dict(), dumps=_dumps)

    async def _ctl_set_faults(self, request: web.Request) -> web.Response:
        """Body: a JSON object of Faults fields; ``{"reset": true}`` clears all faults first."""
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            base = Faults() if body.pop("reset", False) else self.faults
            faults = Faults.from_mapping({**base.to_dict(), **body})
        except (ValueError, TypeError) as exc:
            return web.json_response({"code": -1100, "msg": str(exc)}, status=400, dumps=_dumps)
        self.set_faults(faults)
        return web.json_response(faults.to_dict(), dumps=_dumps)

    async def _ctl_clock(self, request: web.Request) -> web.Response:
        """Body: any of ``advance_to`` (ISO time or epoch ms), ``advance_s``, ``speed``, ``paused``."""
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            unknown = set(body) - {"advance_to", "advance_s", "speed", "paused"}
            if unknown:
                raise ValueError(f"unknown clock setting(s): {', '.join(sorted(unknown))}")
            if "speed" in body:
                self.clock.set_speed(float(body["speed"]))
            if "paused" in body:
                (self.clock.pause if body["paused"] else self.clock.resume)()
            if "advance_to" in body:
                self.clock.advance_to(parse_when(str(body["advance_to"])))
            if "advance_s" in body:
                self.clock.advance(timedelta(seconds=float(body["advance_s"])))
        except (ValueError, TypeError, DataError) as exc:
            return web.json_response({"code": -1100, "msg": str(exc)}, status=400, dumps=_dumps)
        return web.json_response(_status(self), dumps=_dumps)


# -- running it ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def run_in_thread(server: ReplayServer, *, startup_timeout: float = 30.0) -> Iterator[ReplayServer]:
    """Run the server on its own event loop in a daemon thread, for synchronous code (tests, notebooks).

    The server's clock and faults may be changed from the calling thread while it runs.
    """
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    failure: list[BaseException] = []

    def target() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.start())
        except BaseException as exc:  # reported to the caller's thread below
            failure.append(exc)
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(server.stop())
            loop.close()

    thread = threading.Thread(target=target, name="binance-replay", daemon=True)
    thread.start()
    if not ready.wait(startup_timeout):
        raise DataError(f"replay server did not start within {startup_timeout} s")
    if failure:
        raise failure[0]
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)


def parse_when(text: str | datetime) -> datetime:
    """``2020-01-01``, ``2020-01-01T10:00``, ``…Z``/offset, or epoch ms → an aware UTC datetime."""
    if isinstance(text, datetime):
        return text if text.tzinfo else text.replace(tzinfo=UTC)
    if text.isdigit():
        return datetime.fromtimestamp(int(text) / 1000, tz=UTC)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise DataError(f"time {text!r} is not ISO-8601 (2020-01-01, 2020-01-01T10:00Z) or epoch ms") from exc
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def serve_forever(archive_base: str, market: Market | str, symbols: Sequence[str], start: datetime | str,
                  end: datetime | str | None = None, *, speed: float = 60.0, host: str = "127.0.0.1",
                  port: int = 0, days: int = 1, interval: str = "1m", agg_trades: bool = True,
                  faults: Faults | None = None, rate_limit_weight: int | None = None,
                  on_ready: Callable[[ReplayServer], None] | None = None) -> None:
    """Run a replay server until SIGINT/SIGTERM (the ``rltrader replay-server`` command).

    ``on_ready`` is called once the port is bound, so the CLI can print the URLs clients need.
    """
    server = ReplayServer.from_archive(
        archive_base, market, [s.upper() for s in symbols], parse_when(start),
        parse_when(end) if end is not None else None, days=days, interval=interval, agg_trades=agg_trades,
        speed=speed, host=host, port=port, faults=faults,
        rate_limit=RateLimit(rate_limit_weight) if rate_limit_weight else None,
    )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        async with server:
            if on_ready is not None:
                on_ready(server)
            await stop.wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


# -- control API -------------------------------------------------------------------------------------------
def _status(server: ReplayServer) -> dict[str, Any]:
    return {
        "market": server.market.value,
        "symbols": sorted(server.data.symbols),
        "interval": server.data.interval,
        "now": server.clock.now_ms(),
        "now_iso": server.clock.now().isoformat(),
        "speed": server.clock.speed if not math.isinf(server.clock.speed) else "inf",
        "paused": server.clock.paused,
        "faults": server.faults.to_dict(),
        "stats": asdict(server.stats),
    }


__all__ = [
    "BinanceError",
    "Faults",
    "RateLimit",
    "ReplayClock",
    "ReplayData",
    "ReplayServer",
    "ServerStats",
    "parse_when",
    "run_in_thread",
    "serve_forever",
]
