"""Binance REST access through python-binance, for repairing gaps the websocket left.

Why through python-binance rather than raw HTTP: the ingester already depends on it for websockets, and using
the real client against the replay server tests exactly what runs in production. Only the base URLs change
(see :func:`make_client`), so the same code talks to Binance, its testnet, or :mod:`rltrader.sim`.

The paging logic is written once as generators that *yield* the next request and *receive* its response; a
small synchronous driver (``Client``) and an asynchronous one (``AsyncClient``) feed them. So the two
flavours cannot drift apart, and both share one retry/back-off policy:

* connection errors, timeouts and 5xx are retried with exponential back-off;
* 429 (rate limit) and 418 (IP ban) wait for the server's ``Retry-After`` before retrying;
* when ``X-MBX-USED-WEIGHT-1m`` nears the limit, the driver pauses until the weight window resets, so a
  long repair never runs into a ban in the first place.

Only candles that have closed by the *server's* clock are returned: the candle in progress is what the
websocket is for, and storing a partial one as final would corrupt the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import aiohttp
import polars as pl
import requests
from binance import AsyncClient, Client
from binance.exceptions import BinanceAPIException, BinanceRequestException
from binance.ws.streams import BinanceSocketManager

from rltrader.data.schema import AGG_TRADE_SCHEMA, KLINE_SCHEMA, Market, close_time_us, epoch_to_us, interval_us
from rltrader.errors import DataError

log = logging.getLogger(__name__)

TimeUnit = Literal["MILLISECOND", "MICROSECOND"]
KLINE_PAGE = 1000  # the largest page whose weight is still the middle tier on futures (5), the max on spot
TRADE_PAGE = 1000
_HOUR_MS = 3_600_000


class RestError(DataError):
    """Binance refused a request for a reason retrying cannot fix (bad symbol, bad parameter)."""

    def __init__(self, message: str, code: int | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class RestTimeout(TimeoutError):
    """A request got no (complete) answer within ``RestPolicy.timeout_s``; the message names the endpoint.

    A ``TimeoutError`` (so an ``OSError``): retried like any connection error, and the live ingester treats it as
    a reason to reconnect. Why our own bound on top of aiohttp's: a server that accepts and then never answers
    (or stops mid-body) must cost one timeout, not an await that never ends.
    """


class RestStopped(Exception):
    """The caller's ``stop()`` said to stop between requests or during a back-off (a live ingester's stop)."""


# -- clients -----------------------------------------------------------------------------------------------
def _credentials() -> tuple[str | None, str | None]:
    """Keys from the environment only, and only when set: market data needs none; keys never touch disk."""
    return os.environ.get("BINANCE_API_KEY") or None, os.environ.get("BINANCE_API_SECRET") or None


def _with_base(cls: type[Any], base_url: str | None) -> type[Any]:
    """A subclass whose class-level URLs point at ``base_url``.

    A subclass (not instance attributes) because ``AsyncClient.create()`` pings from inside the constructor
    call, before a caller could patch the instance.
    """
    if base_url is None:
        return cls
    base = base_url.rstrip("/")
    attrs = {"API_URL": f"{base}/api", "FUTURES_URL": f"{base}/fapi",
             "FUTURES_DATA_URL": f"{base}/futures/data"}
    return type(f"{cls.__name__}At", (cls,), attrs)


def make_client(market: Market | str, base_url: str | None = None, *, time_unit: TimeUnit | None = None,
                ping: bool = False, requests_params: dict[str, Any] | None = None) -> Client:
    """A synchronous python-binance ``Client`` for ``market``, optionally at another host.

    ``base_url`` is the host root, e.g. the replay server's ``rest_base_url``, ``https://testnet.binance.vision``
    (spot testnet) or ``https://testnet.binancefuture.com`` (futures testnet). ``time_unit="MICROSECOND"``
    asks spot for µs timestamps (the resolution of our store); futures ignore it.
    """
    Market(market)  # validate early: a typo should fail here, not at the first request
    key, secret = _credentials()
    cls = _with_base(Client, base_url)
    client: Client = cls(key, secret, requests_params=requests_params, ping=ping, time_unit=time_unit)
    return client


async def make_async_client(market: Market | str, base_url: str | None = None, *,
                            time_unit: TimeUnit | None = None, timeout_s: float | None = None) -> AsyncClient:
    """An ``AsyncClient`` for ``market`` at ``base_url``, started as ``AsyncClient.create`` does (ping, clock offset).

    ``timeout_s`` bounds every request of the client, the ping included (aiohttp's total timeout: connect,
    send and the whole body); None keeps python-binance's default (10 s). A ping without an answer in time
    raises :class:`RestTimeout` naming the URL. Close the client with ``await client.close_connection()``.
    """
    Market(market)
    key, secret = _credentials()
    cls = _with_base(AsyncClient, base_url)
    params = None if timeout_s is None else {"timeout": timeout_s}
    # what AsyncClient.create() does, but its session is also closed when the start is *cancelled* (a stop)
    client: AsyncClient = cls(key, secret, requests_params=params, time_unit=time_unit)
    try:
        await client.ping()
        res = await client.get_server_time()
        client.timestamp_offset = res["serverTime"] - int(time.time() * 1000)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            await client.close_connection()
        if isinstance(exc, TimeoutError):
            limit = timeout_s if timeout_s is not None else cls.REQUEST_TIMEOUT
            raise RestTimeout(f"binance rest: ping {client.API_URL}/v3/ping: no answer within {limit:g} s") from exc
        raise
    return client


def make_socket_manager(client: AsyncClient, ws_base_url: str | None = None, *,
                        max_queue_size: int = 10_000) -> BinanceSocketManager:
    """A ``BinanceSocketManager`` whose spot and futures stream URLs point at ``ws_base_url``.

    The default queue of 100 overflows (and python-binance then closes the read loop) whenever a burst
    arrives faster than the consumer runs, e.g. after a stall or in a fast replay; hence the larger default.
    """
    bm = BinanceSocketManager(client, max_queue_size=max_queue_size)
    if ws_base_url is not None:
        base = ws_base_url if ws_base_url.endswith("/") else ws_base_url + "/"
        bm.STREAM_URL = base
        bm.FSTREAM_URL = base
    return bm


# -- retry policy ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RestPolicy:
    """How hard to try and how politely.

    ``weight_limit`` None means the market's published default (spot 6000, futures 2400 per minute); the
    driver pauses until the next weight window once ``X-MBX-USED-WEIGHT-1m`` reaches ``high_water`` of it.
    """

    max_retries: int = 5
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    weight_limit: int | None = None
    high_water: float = 0.8
    weight_window_s: float = 60.0
    timeout_s: float = 10.0
    """Bound on one async request (connect, send, whole answer); past it :class:`RestTimeout`, retried."""

    def limit_for(self, market: Market) -> int:
        if self.weight_limit is not None:
            return self.weight_limit
        return 6000 if market is Market.SPOT else 2400


DEFAULT_POLICY = RestPolicy()

_RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    requests.ConnectionError, requests.Timeout, aiohttp.ClientError, asyncio.TimeoutError,
    BinanceRequestException, ConnectionError,
)


def _header(obj: Any, name: str) -> str | None:
    headers = getattr(obj, "headers", None)
    if headers is None:
        return None
    value = headers.get(name)
    return None if value is None else str(value)


def _retry_delay(exc: BaseException, attempt: int, policy: RestPolicy) -> float | None:
    """Seconds to wait before retrying after ``exc``, or None when retrying cannot help."""
    if attempt >= policy.max_retries:
        return None
    backoff = min(policy.backoff_max_s, policy.backoff_base_s * 2.0**attempt) * (0.5 + random.random() / 2)
    if isinstance(exc, BinanceAPIException):
        status = int(exc.status_code)
        fallback: float = max(backoff, 1.0)
        if status in (418, 429):
            retry_after = _header(exc.response, "Retry-After")
            try:
                return max(float(retry_after), 0.0) if retry_after is not None else fallback
            except ValueError:
                return fallback
        return backoff if status >= 500 else None
    if isinstance(exc, _RETRYABLE_ERRORS):
        return backoff
    return None


def _weight_pause(client: Client | AsyncClient, market: Market, policy: RestPolicy) -> float:
    """Seconds to pause because the last response reported weight near the limit (0 if not)."""
    used_raw = _header(getattr(client, "response", None), "X-MBX-USED-WEIGHT-1m")
    if used_raw is None:
        return 0.0
    try:
        used = int(used_raw)
    except ValueError:
        return 0.0
    if used < policy.high_water * policy.limit_for(market):
        return 0.0
    window = policy.weight_window_s
    pause = window - (time.time() % window) + 0.5  # Binance's window resets on the wall-clock minute
    log.warning("binance rest: used weight %d of %d; pausing %.1f s", used, policy.limit_for(market), pause)
    return pause


def _to_api_error(exc: BinanceAPIException, what: str) -> RestError:
    return RestError(f"{what}: Binance error {exc.code} (HTTP {exc.status_code}): {exc.message}",
                     code=exc.code, status=exc.status_code)


# -- drivers -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Call:
    op: Literal["time", "klines", "aggTrades"]
    params: dict[str, Any]


_METHODS = {
    (Market.SPOT, "time"): "get_server_time",
    (Market.SPOT, "klines"): "get_klines",
    (Market.SPOT, "aggTrades"): "get_aggregate_trades",
    (Market.FUTURES_UM, "time"): "futures_time",
    (Market.FUTURES_UM, "klines"): "futures_klines",
    (Market.FUTURES_UM, "aggTrades"): "futures_aggregate_trades",
}

T = TypeVar("T")
Plan = Generator[_Call, Any, T]


def _describe(market: Market, call: _Call) -> str:
    keys = ("symbol", "interval", "startTime", "endTime", "fromId")
    shown = {k: v for k, v in call.params.items() if k in keys}
    return f"{market.value} {call.op} {shown}"


def _endpoint(client: Any, market: Market, call: _Call) -> str:
    """The URL a call goes to (``API_URL``/``FUTURES_URL`` as the client has them), for error messages."""
    if market is Market.SPOT:
        return f"{getattr(client, 'API_URL', '?')}/v3/{call.op}"
    return f"{getattr(client, 'FUTURES_URL', '?')}/v1/{call.op}"


def _run_sync(client: Client, market: Market, plan: Plan[T], policy: RestPolicy,
              sleep: Callable[[float], None]) -> T:
    try:
        call = next(plan)
        while True:
            method = getattr(client, _METHODS[(market, call.op)])
            attempt = 0
            while True:
                try:
                    result = method(**call.params)
                    break
                except Exception as exc:
                    delay = _retry_delay(exc, attempt, policy)
                    if delay is None:
                        if isinstance(exc, BinanceAPIException):
                            raise _to_api_error(exc, _describe(market, call)) from exc
                        raise
                    log.warning("binance rest: %s failed (%s); retry %d in %.1f s", _describe(market, call),
                                type(exc).__name__, attempt + 1, delay)
                    sleep(delay)
                    attempt += 1
            pause = _weight_pause(client, market, policy)
            if pause:
                sleep(pause)
            call = plan.send(result)
    except StopIteration as stop:
        value: T = stop.value
        return value


async def _run_async(client: AsyncClient, market: Market, plan: Plan[T], policy: RestPolicy,
                     sleep: Callable[[float], Awaitable[None]], stop: Callable[[], bool] | None = None) -> T:
    """Drive ``plan`` over ``client``. Every request is bounded by ``policy.timeout_s`` (:class:`RestTimeout`);
    ``stop`` (optional) is asked before every request and after every pause, and True raises
    :class:`RestStopped`, so a long repair (many pages, retries, back-offs) never outlives its caller's stop."""

    def check(call: _Call) -> None:
        if stop is not None and stop():
            raise RestStopped(f"binance rest: stopped before {_describe(market, call)}")

    try:
        call = next(plan)
        while True:
            method = getattr(client, _METHODS[(market, call.op)])
            attempt = 0
            while True:
                check(call)
                try:
                    try:
                        async with asyncio.timeout(policy.timeout_s):
                            result = await method(**call.params)
                    except TimeoutError as exc:  # ours or aiohttp's own (both TimeoutError): name the endpoint
                        raise RestTimeout(f"binance rest: {_describe(market, call)} at "
                                          f"{_endpoint(client, market, call)}: no answer within "
                                          f"{policy.timeout_s:g} s") from exc
                    break
                except Exception as exc:
                    delay = _retry_delay(exc, attempt, policy)
                    if delay is None:
                        if isinstance(exc, BinanceAPIException):
                            raise _to_api_error(exc, _describe(market, call)) from exc
                        raise
                    log.warning("binance rest: %s failed (%s: %s); retry %d in %.1f s", _describe(market, call),
                                type(exc).__name__, str(exc)[:200], attempt + 1, delay)
                    await sleep(delay)
                    attempt += 1
            pause = _weight_pause(client, market, policy)
            if pause:
                await sleep(pause)
            call = plan.send(result)
    except StopIteration as stop_iteration:
        value: T = stop_iteration.value
        return value


# -- plans -------------------------------------------------------------------------------------------------
def _ms(t: datetime) -> int:
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return int(t.timestamp() * 1000)


def _server_ms(resp: Any) -> int:
    return int(resp["serverTime"])


def _klines_plan(symbol: str, interval: str, start_ms: int, end_ms: int | None) -> Plan[list[list[Any]]]:
    """Page forward by ``startTime`` through ``[start, end)``, keeping candles closed by server time."""
    server_ms = _server_ms((yield _Call("time", {})))
    stop_ms = server_ms if end_ms is None else min(end_ms, server_ms)
    step_ms = interval_us(interval) // 1000
    rows: list[list[Any]] = []
    cursor = start_ms
    while cursor < stop_ms:
        params = {"symbol": symbol, "interval": interval, "startTime": cursor, "endTime": stop_ms - 1,
                  "limit": KLINE_PAGE}
        page: list[list[Any]] = (yield _Call("klines", params)) or []
        if not page:
            break
        for r in page:
            open_ms = epoch_to_us(int(r[0])) // 1000
            close_ms = epoch_to_us(int(r[6])) // 1000
            if open_ms >= stop_ms:
                break
            if close_ms < server_ms and open_ms >= start_ms:
                rows.append(r)
        last_open = epoch_to_us(int(page[-1][0])) // 1000
        if len(page) < KLINE_PAGE or last_open + step_ms <= cursor:
            break
        cursor = last_open + step_ms
    return rows


def _agg_trades_plan(symbol: str, start_ms: int | None, end_ms: int | None,
                     from_id: int | None) -> Plan[list[dict[str, Any]]]:
    """Find the first trade (by id, or by time in <1 h windows), then page forward by ``fromId``.

    Paging by id, not time, because ids are gap-free and a time window can hold more trades than a page.
    """
    server_ms = _server_ms((yield _Call("time", {})))
    stop_ms = server_ms + 1 if end_ms is None else min(end_ms, server_ms + 1)
    out: list[dict[str, Any]] = []
    if from_id is None:
        assert start_ms is not None
        window = start_ms
        first: list[dict[str, Any]] = []
        while window < stop_ms and not first:
            hi = min(window + _HOUR_MS, stop_ms) - 1
            first = (yield _Call("aggTrades", {"symbol": symbol, "startTime": window, "endTime": hi,
                                               "limit": TRADE_PAGE})) or []
            window = hi + 1
        if not first:
            return out
        from_id = int(first[0]["a"])
    while True:
        page: list[dict[str, Any]] = (yield _Call("aggTrades", {"symbol": symbol, "fromId": from_id,
                                                                "limit": TRADE_PAGE})) or []
        done = len(page) < TRADE_PAGE
        for t in page:
            t_ms = epoch_to_us(int(t["T"])) // 1000
            if t_ms >= stop_ms:
                done = True
                break
            if start_ms is None or t_ms >= start_ms:
                out.append(t)
        if done or not page:
            return out
        from_id = int(page[-1]["a"]) + 1


# -- frames ------------------------------------------------------------------------------------------------
def klines_frame(rows: list[list[Any]], market: Market, symbol: str, interval: str) -> pl.DataFrame:
    """Binance kline arrays → KLINE_SCHEMA (timestamps in ms or µs, decimals as strings)."""
    if not rows:
        return pl.DataFrame(schema=KLINE_SCHEMA)
    cols = list(zip(*[r[:11] for r in rows], strict=True))
    return pl.DataFrame(
        {
            "market": [market.value] * len(rows),
            "symbol": [symbol] * len(rows),
            "interval": [interval] * len(rows),
            "open_time": [epoch_to_us(int(v)) for v in cols[0]],
            "open": [float(v) for v in cols[1]],
            "high": [float(v) for v in cols[2]],
            "low": [float(v) for v in cols[3]],
            "close": [float(v) for v in cols[4]],
            "volume": [float(v) for v in cols[5]],
            "close_time": [close_time_us(int(v)) for v in cols[6]],
            "quote_volume": [float(v) for v in cols[7]],
            "trades": [int(v) for v in cols[8]],
            "taker_buy_volume": [float(v) for v in cols[9]],
            "taker_buy_quote_volume": [float(v) for v in cols[10]],
        },
        schema_overrides={"open_time": pl.Int64, "close_time": pl.Int64},
    ).with_columns(
        pl.col("open_time").cast(pl.Datetime("us", "UTC")),
        pl.col("close_time").cast(pl.Datetime("us", "UTC")),
    ).cast(KLINE_SCHEMA)  # type: ignore[arg-type]


def agg_trades_frame(trades: list[dict[str, Any]], market: Market, symbol: str) -> pl.DataFrame:
    """Binance short-key aggTrade dicts → AGG_TRADE_SCHEMA (futures has no ``M``: taken as True)."""
    if not trades:
        return pl.DataFrame(schema=AGG_TRADE_SCHEMA)
    return pl.DataFrame(
        {
            "market": [market.value] * len(trades),
            "symbol": [symbol] * len(trades),
            "agg_trade_id": [int(t["a"]) for t in trades],
            "price": [float(t["p"]) for t in trades],
            "quantity": [float(t["q"]) for t in trades],
            "first_trade_id": [int(t["f"]) for t in trades],
            "last_trade_id": [int(t["l"]) for t in trades],
            "transact_time": [epoch_to_us(int(t["T"])) for t in trades],
            "is_buyer_maker": [bool(t["m"]) for t in trades],
            "is_best_match": [bool(t.get("M", True)) for t in trades],
        },
        schema_overrides={"transact_time": pl.Int64},
    ).with_columns(pl.col("transact_time").cast(pl.Datetime("us", "UTC"))).cast(
        AGG_TRADE_SCHEMA  # type: ignore[arg-type]
    )


# -- public API --------------------------------------------------------------------------------------------
def _check(market: Market | str, symbol: str, interval: str | None = None) -> tuple[Market, str]:
    m = Market(market)
    if interval is not None:
        interval_us(interval)  # raises ValueError naming the interval
    if not symbol:
        raise RestError("symbol is empty")
    return m, symbol.upper()


def fetch_klines(client: Client, market: Market | str, symbol: str, interval: str, start: datetime,
                 end: datetime | None = None, *, policy: RestPolicy = DEFAULT_POLICY,
                 sleep: Callable[[float], None] = time.sleep) -> pl.DataFrame:
    """Closed candles with ``start <= open_time < end`` (end None = up to the server's now), KLINE_SCHEMA."""
    m, sym = _check(market, symbol, interval)
    plan = _klines_plan(sym, interval, _ms(start), None if end is None else _ms(end))
    return klines_frame(_run_sync(client, m, plan, policy, sleep), m, sym, interval)


async def fetch_klines_async(client: AsyncClient, market: Market | str, symbol: str, interval: str,
                             start: datetime, end: datetime | None = None, *,
                             policy: RestPolicy = DEFAULT_POLICY,
                             sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                             stop: Callable[[], bool] | None = None) -> pl.DataFrame:
    """Async :func:`fetch_klines` over an ``AsyncClient``; each request bounded by ``policy.timeout_s``,
    ``stop()`` True ends it with :class:`RestStopped`."""
    m, sym = _check(market, symbol, interval)
    plan = _klines_plan(sym, interval, _ms(start), None if end is None else _ms(end))
    return klines_frame(await _run_async(client, m, plan, policy, sleep, stop), m, sym, interval)


def _trade_args(start: datetime | None, end: datetime | None,
                from_id: int | None) -> tuple[int | None, int | None]:
    if start is None and from_id is None:
        raise RestError("fetch_agg_trades needs a start time or a from_id")
    return (None if start is None else _ms(start)), (None if end is None else _ms(end))


def fetch_agg_trades(client: Client, market: Market | str, symbol: str, start: datetime | None = None,
                     end: datetime | None = None, *, from_id: int | None = None,
                     policy: RestPolicy = DEFAULT_POLICY,
                     sleep: Callable[[float], None] = time.sleep) -> pl.DataFrame:
    """Aggregate trades from ``from_id`` (inclusive) or ``start``, up to ``end`` (exclusive) or the server's
    now, in id order, AGG_TRADE_SCHEMA. With both ``from_id`` and ``start``, trades before ``start`` are cut.
    """
    m, sym = _check(market, symbol)
    start_ms, end_ms = _trade_args(start, end, from_id)
    plan = _agg_trades_plan(sym, start_ms, end_ms, from_id)
    return agg_trades_frame(_run_sync(client, m, plan, policy, sleep), m, sym)


async def fetch_agg_trades_async(client: AsyncClient, market: Market | str, symbol: str,
                                 start: datetime | None = None, end: datetime | None = None, *,
                                 from_id: int | None = None, policy: RestPolicy = DEFAULT_POLICY,
                                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                                 stop: Callable[[], bool] | None = None) -> pl.DataFrame:
    """Async :func:`fetch_agg_trades` over an ``AsyncClient``; each request bounded by ``policy.timeout_s``,
    ``stop()`` True ends it with :class:`RestStopped`."""
    m, sym = _check(market, symbol)
    start_ms, end_ms = _trade_args(start, end, from_id)
    plan = _agg_trades_plan(sym, start_ms, end_ms, from_id)
    return agg_trades_frame(await _run_async(client, m, plan, policy, sleep, stop), m, sym)


def server_time(client: Client, market: Market | str) -> datetime:
    """The exchange's (or replay's) clock, which decides which candles count as closed."""
    m = Market(market)
    resp = getattr(client, _METHODS[(m, "time")])()
    return datetime.fromtimestamp(_server_ms(resp) / 1000, tz=UTC)


__all__ = [
    "DEFAULT_POLICY",
    "RestError",
    "RestPolicy",
    "RestStopped",
    "RestTimeout",
    "agg_trades_frame",
    "fetch_agg_trades",
    "fetch_agg_trades_async",
    "fetch_klines",
    "fetch_klines_async",
    "klines_frame",
    "make_async_client",
    "make_client",
    "make_socket_manager",
    "server_time",
]
