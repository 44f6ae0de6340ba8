"""The replay server's market-data REST endpoints (ping, time, exchangeInfo, klines, aggTrades) and the
request plumbing every REST route shares: Binance's error JSON, parameter parsing, symbol look-up.

The endpoints only reveal what had happened by the replay clock's "now": the candle in progress is returned
unfinished, as Binance does.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left, bisect_right
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from rltrader.data.schema import US_THRESHOLD, Market
from rltrader.sim.clock import ReplayClock
from rltrader.sim.data import ReplayData, SymbolData, fmt, split_symbol
from rltrader.sim.faults import RateLimit

BINANCE_INTERVALS = {"1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d", "3d",
                     "1w", "1M"}
MANDATORY = "Mandatory parameter '{}' was not sent, was empty/null, or malformed."


class BinanceError(Exception):
    """A request error answered with Binance's ``{"code": …, "msg": …}`` JSON."""

    def __init__(self, code: int, msg: str, status: int = 400,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.status = status
        self.headers = dict(headers or {})



def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))



class MarketRest:
    """REST market-data handlers; mixed into :class:`rltrader.sim.ReplayServer`, which sets these attributes."""

    data: ReplayData
    market: Market
    clock: ReplayClock
    rate_limit: RateLimit | None
    _spot: bool

    def _served(self, request: web.Request) -> bool:
        """Whether the request is for the market this server replays (by its URL prefix)."""
        return request.path.startswith("/api/") == self._spot

    def _micro(self, request: web.Request) -> bool:
        unit = request.headers.get("X-MBX-TIME-UNIT", "") or request.query.get("timeUnit", "")
        if unit.upper() not in ("", "MILLISECOND", "MICROSECOND"):
            raise BinanceError(-1100, f"Illegal characters found in parameter 'timeUnit'; {unit!r} is not "
                                      "valid.")
        return self._spot and unit.upper() == "MICROSECOND"

    def _symbol(self, request: web.Request) -> SymbolData:
        raw = request.query.get("symbol", "")
        if not raw:
            raise BinanceError(-1102, MANDATORY.format("symbol"))
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
            quotes = sorted({split_symbol(s.symbol)[1] for s in syms})
            body["assets"] = [{"asset": q, "marginAvailable": True, "autoAssetExchange": "0"} for q in quotes]
        return web.json_response(body, dumps=dumps)

    def _symbol_info(self, sd: SymbolData) -> dict[str, Any]:
        base, quote = split_symbol(sd.symbol)
        flt = self.data.filters(sd.symbol)
        pdec, qdec, tick, step = flt.price_dec, flt.qty_dec, flt.tick, flt.step
        max_price, max_qty, min_notional = flt.max_price, flt.max_qty, flt.min_notional
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
            return fmt(x, pdec)

        def fq(x: float) -> str:
            return fmt(x, qdec)

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
                {"filterType": "MARKET_LOT_SIZE", "minQty": fq(step), "maxQty": fq(flt.market_max_qty),
                 "stepSize": fq(step)},
                {"filterType": "MAX_NUM_ORDERS", "limit": 200},
                {"filterType": "MAX_NUM_ALGO_ORDERS", "limit": 10},
                {"filterType": "MIN_NOTIONAL", "notional": fmt(min_notional, None)},
                {"filterType": "PERCENT_PRICE", "multiplierUp": "1.0500", "multiplierDown": "0.9500",
                 "multiplierDecimal": "4"},
            ],
            "orderTypes": ["LIMIT", "MARKET", "STOP", "STOP_MARKET", "TAKE_PROFIT", "TAKE_PROFIT_MARKET",
                           "TRAILING_STOP_MARKET"],
            "timeInForce": ["GTC", "IOC", "FOK", "GTX", "GTD"],
        }

    # -- REST data endpoints -------------------------------------------------------------------------------
    async def _klines(self, request: web.Request) -> web.Response:
        sd = self._symbol(request)
        interval = request.query.get("interval", "")
        if not interval:
            raise BinanceError(-1102, MANDATORY.format("interval"))
        if interval not in BINANCE_INTERVALS:
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
            st = self.data.final(sd, i) if sd.close_ms[i] < now else self.data.state_at(sd, i, now)
            t_open = sd.open_us[i] if micro else sd.open_ms[i]
            t_close = sd.close_us[i] if micro else sd.close_ms[i]
            rows.append([
                t_open, fmt(st.o, sd.price_dec), fmt(st.h, sd.price_dec), fmt(st.l, sd.price_dec),
                fmt(st.c, sd.price_dec), fmt(st.v, sd.qty_dec), t_close, fmt(st.q, sd.quote_dec), st.n,
                fmt(st.bv, sd.qty_dec), fmt(st.bq, sd.quote_dec), "0",
            ])
        return web.json_response(rows, dumps=dumps)

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
        return web.json_response([self.data.trade_json(sd, j, micro) for j in idx], dumps=dumps)
