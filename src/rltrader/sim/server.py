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

The package splits by concern: :mod:`~rltrader.sim.clock` (market time), :mod:`~rltrader.sim.faults`,
:mod:`~rltrader.sim.data` (the recorded market), :mod:`~rltrader.sim.rest` and :mod:`~rltrader.sim.ws`
(the handlers); this module composes them into the server and runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from rltrader.data.schema import Market
from rltrader.errors import DataError
from rltrader.execution import ExecutionParams
from rltrader.sim.clock import ReplayClock
from rltrader.sim.data import ReplayData
from rltrader.sim.exchange import Exchange
from rltrader.sim.faults import Faults, OrderFaults, RateLimit, ServerStats
from rltrader.sim.rest import BinanceError, MarketRest, dumps
from rltrader.sim.trading_routes import TradingRoutes
from rltrader.sim.ws import MarketStreams

log = logging.getLogger(__name__)


@dataclass
class _Weight:
    window_start: float = 0.0
    used: int = 0



class ReplayServer(MarketRest, MarketStreams, TradingRoutes):
    """The replay server: REST under ``/api/v3`` (spot) or ``/fapi/v1`` (USDⓈ-M), websockets under
    ``/ws/<stream>`` and ``/stream?streams=…`` (also below ``/market/`` and ``/public/`` as python-binance's
    futures sockets use), and a small control API under ``/_replay/``.

    It is also a fake exchange: Binance's SIGNED trading API (:mod:`rltrader.sim.trading_routes`) for the
    keys in ``api_keys`` (key → secret), market orders filled by the execution kernel with ``execution``
    (:mod:`rltrader.sim.exchange`; default: Binance's VIP0 fees for the market), ``order_faults`` on demand.

    Point python-binance at it with ``API_URL = rest_base_url + "/api"``, ``FUTURES_URL = rest_base_url +
    "/fapi"`` and ``STREAM_URL``/``FSTREAM_URL = ws_base_url`` (see :mod:`rltrader.data.rest`).
    """

    def __init__(self, data: ReplayData, start: datetime | int | None = None, *, speed: float = 60.0,
                 host: str = "127.0.0.1", port: int = 0, faults: Faults | None = None,
                 rate_limit: RateLimit | None = None, clock: ReplayClock | None = None,
                 heartbeat_s: float | None = 20.0, api_keys: Mapping[str, str] | None = None,
                 execution: ExecutionParams | None = None, initial_balances: Mapping[str, float] | None = None,
                 order_faults: OrderFaults | None = None) -> None:
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
        self.exchange = Exchange(data, clock, execution, api_keys, initial_balances=initial_balances)
        self.order_faults = order_faults or OrderFaults()

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

    def set_order_faults(self, faults: OrderFaults | None = None, **changes: Any) -> OrderFaults:
        """Replace the order faults (or change some fields); applies from the next order placement."""
        base = faults if faults is not None else self.order_faults
        self.order_faults = replace(base, **changes) if changes else base
        log.info("replay: order faults now %s", self.order_faults)
        return self.order_faults

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
        self.add_trading_routes(app)
        app.router.add_get("/_replay/order_faults", self._ctl_get_order_faults)
        app.router.add_post("/_replay/order_faults", self._ctl_set_order_faults)
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
                                     dumps=dumps)
        resp.headers.update(headers)
        return resp

    # -- control API ---------------------------------------------------------------------------------------
    async def _ctl_status(self, request: web.Request) -> web.Response:
        return web.json_response(_status(self), dumps=dumps)

    async def _ctl_get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self.faults.to_dict(), dumps=dumps)

    async def _ctl_set_faults(self, request: web.Request) -> web.Response:
        """Body: a JSON object of Faults fields; ``{"reset": true}`` clears all faults first."""
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            base = Faults() if body.pop("reset", False) else self.faults
            faults = Faults.from_mapping({**base.to_dict(), **body})
        except (ValueError, TypeError) as exc:
            return web.json_response({"code": -1100, "msg": str(exc)}, status=400, dumps=dumps)
        self.set_faults(faults)
        return web.json_response(faults.to_dict(), dumps=dumps)

    async def _ctl_get_order_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self.order_faults.to_dict(), dumps=dumps)

    async def _ctl_set_order_faults(self, request: web.Request) -> web.Response:
        """Body: a JSON object of OrderFaults fields; ``{"reset": true}`` clears all order faults first."""
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            base = OrderFaults() if body.pop("reset", False) else self.order_faults
            faults = OrderFaults.from_mapping({**base.to_dict(), **body})
        except (ValueError, TypeError) as exc:
            return web.json_response({"code": -1100, "msg": str(exc)}, status=400, dumps=dumps)
        self.set_order_faults(faults)
        return web.json_response(faults.to_dict(), dumps=dumps)

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
            return web.json_response({"code": -1100, "msg": str(exc)}, status=400, dumps=dumps)
        return web.json_response(_status(self), dumps=dumps)


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
                  api_keys: Mapping[str, str] | None = None, execution: ExecutionParams | None = None,
                  on_ready: Callable[[ReplayServer], None] | None = None) -> None:
    """Run a replay server until SIGINT/SIGTERM (the ``rltrader replay-server`` command).

    ``on_ready`` is called once the port is bound, so the CLI can print the URLs clients need.
    """
    server = ReplayServer.from_archive(
        archive_base, market, [s.upper() for s in symbols], parse_when(start),
        parse_when(end) if end is not None else None, days=days, interval=interval, agg_trades=agg_trades,
        speed=speed, host=host, port=port, faults=faults,
        rate_limit=RateLimit(rate_limit_weight) if rate_limit_weight else None, api_keys=api_keys,
        execution=execution,
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
        "order_faults": server.order_faults.to_dict(),
        "stats": asdict(server.stats),
    }


__all__ = ["ReplayServer", "parse_when", "run_in_thread", "serve_forever"]
