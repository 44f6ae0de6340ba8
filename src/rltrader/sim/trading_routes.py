"""The replay server's trading API: Binance's SIGNED order and account endpoints over :class:`Exchange`.

Spot: ``POST/GET/DELETE /api/v3/order``, ``GET /api/v3/openOrders``, ``GET /api/v3/account``. USDⓈ-M:
``POST/GET/DELETE /fapi/v1/order``, ``GET /fapi/v1/openOrders``, ``GET /fapi/v2|v3/account``,
``GET /fapi/v2|v3/positionRisk``, ``GET /fapi/v2|v3/balance``, ``POST /fapi/v1/leverage``,
``GET /fapi/v1/positionSide/dual`` (one-way mode only) (python-binance
1.0.x calls account v2, positionRisk v3 and balance v3; both versions are served where Binance has both).
Payloads carry Binance's field names and string-formatted numbers; prices and amounts are printed exactly
(the float the kernel computed, not rounded to the tick), so a client can compare them with the kernel.

:class:`~rltrader.sim.faults.OrderFaults` are applied to order placements here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import replace
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from rltrader.data.schema import Market
from rltrader.sim.data import ReplayData, fmt, split_symbol
from rltrader.sim.exchange import Exchange, Order
from rltrader.sim.faults import OrderFaults, ServerStats
from rltrader.sim.rest import BinanceError, dumps
from rltrader.sim.signing import verify

log = logging.getLogger(__name__)


def num(x: float) -> str:
    """A float as Binance prints decimals, exactly (the shortest repr, never in exponent form)."""
    return format(Decimal(repr(float(x))), "f")


class TradingRoutes:
    """Trading handlers; mixed into :class:`rltrader.sim.ReplayServer`, which sets these attributes."""

    data: ReplayData
    market: Market
    exchange: Exchange
    order_faults: OrderFaults
    stats: ServerStats
    _spot: bool

    def add_trading_routes(self, app: web.Application) -> None:
        api = "/api/v3"
        app.router.add_post(f"{api}/order", self._spot_new_order)
        app.router.add_get(f"{api}/order", self._spot_get_order)
        app.router.add_delete(f"{api}/order", self._spot_cancel_order)
        app.router.add_get(f"{api}/openOrders", self._spot_open_orders)
        app.router.add_get(f"{api}/account", self._spot_account)
        app.router.add_post("/fapi/v1/order", self._fut_new_order)
        app.router.add_get("/fapi/v1/order", self._fut_get_order)
        app.router.add_delete("/fapi/v1/order", self._fut_cancel_order)
        app.router.add_get("/fapi/v1/openOrders", self._fut_open_orders)
        app.router.add_post("/fapi/v1/leverage", self._fut_leverage)
        app.router.add_get("/fapi/v1/positionSide/dual", self._fut_position_mode)
        for v in ("v2", "v3"):
            app.router.add_get(f"/fapi/{v}/account", self._fut_account)
            app.router.add_get(f"/fapi/{v}/positionRisk", self._fut_position_risk)
            app.router.add_get(f"/fapi/{v}/balance", self._fut_balance)

    # -- plumbing ------------------------------------------------------------------------------------------
    async def _signed(self, request: web.Request) -> tuple[str, dict[str, str]]:
        """Verify a SIGNED request (see :mod:`rltrader.sim.signing`); its API key and its parameters."""
        if request.path.startswith("/api/") != self._spot:
            # The other market's trading API: Binance has no such account for this key here.
            raise BinanceError(-2015, "Invalid API-key, IP, or permissions for action.", status=401)
        body = await request.text() if request.can_read_body else ""
        params = dict(request.query)
        params.update(parse_qsl(body, keep_blank_values=True))
        key = verify(request.headers, request.query_string, body, params, self.exchange.secrets)
        return key, params

    @staticmethod
    def _order_id(params: Mapping[str, str]) -> int | None:
        raw = params.get("orderId")
        if not raw:
            return None
        if not raw.isdigit():
            raise BinanceError(-1100, "Illegal characters found in parameter 'orderId'; legal range is "
                                      "'^[0-9]{1,20}$'.")
        return int(raw)

    def _json(self, body: Any) -> web.Response:
        return web.json_response(body, dumps=dumps)

    async def _place(self, request: web.Request, key: str, params: Mapping[str, str]) -> Order | None:
        """Place an order with the order faults applied; None when the answer was dropped."""
        faults = self.order_faults

        def apply() -> Order:
            order = self.exchange.place(
                key, params.get("symbol", ""), params.get("side", ""), params.get("type", ""),
                params.get("quantity"), params.get("newClientOrderId"),
                reduce_only=params.get("reduceOnly", "false").lower() == "true",
                invisible_ms=faults.invisible_ms,
            )
            self.stats.orders_filled += order.status == "FILLED"
            return order

        if faults.rate_limited:
            self._consume("rate_limited")
            raise BinanceError(-1015, "Too many new orders; current limit is 100 orders per 10 SECOND.",
                               status=429, headers={"Retry-After": str(faults.retry_after_s)})
        for name, status, code, msg in (
            ("server_error", 503, -1000, "Unknown error, please check your request or try again later."),
            ("timeout", 408, -1007, "Timeout waiting for response from backend server. Send status unknown; "
                                    "execution status unknown."),
        ):
            if getattr(faults, name):
                self._consume(name)
                if faults.applied:
                    with contextlib.suppress(BinanceError):  # an invalid order is simply not applied
                        apply()
                raise BinanceError(code, msg, status=status)
        if faults.drop_response:
            self._consume("drop_response")
            apply()
            transport = request.transport
            if transport is not None:
                transport.abort()  # the order is in; the client sees a broken connection, no answer
            await asyncio.sleep(0)
            return None
        try:
            return apply()
        except BinanceError:
            self.stats.orders_rejected += 1
            raise

    def _consume(self, name: str) -> None:
        self.stats.order_faults += 1
        self.order_faults = replace(self.order_faults, **{name: getattr(self.order_faults, name) - 1})

    def _find(self, key: str, params: Mapping[str, str]) -> Order:
        order = self.exchange.find(key, params.get("symbol", ""), self._order_id(params),
                                   params.get("origClientOrderId"))
        if order is None:
            raise BinanceError(-2013, "Order does not exist.")
        return order

    def _cancel(self, key: str, params: Mapping[str, str]) -> Order:
        return self.exchange.cancel(key, params.get("symbol", ""), self._order_id(params),
                                    params.get("origClientOrderId"))

    def _qty(self, order: Order, x: float) -> str:
        return fmt(x, self.data.filters(order.symbol).qty_dec)

    # -- spot ----------------------------------------------------------------------------------------------
    def _spot_order(self, o: Order) -> dict[str, Any]:
        return {
            "symbol": o.symbol, "orderId": o.order_id, "orderListId": -1, "clientOrderId": o.client_order_id,
            "price": "0.00000000", "origQty": self._qty(o, o.qty), "executedQty": self._qty(o, o.executed_qty),
            "cummulativeQuoteQty": num(o.quote_qty), "status": o.status, "timeInForce": "GTC",
            "type": "MARKET", "side": o.side, "stopPrice": "0.00000000", "icebergQty": "0.00000000",
            "time": o.time_ms, "updateTime": o.update_ms, "isWorking": True, "workingTime": o.time_ms,
            "origQuoteOrderQty": "0.00000000", "selfTradePreventionMode": "EXPIRE_MAKER",
        }

    async def _spot_new_order(self, request: web.Request) -> web.StreamResponse:
        key, params = await self._signed(request)
        o = await self._place(request, key, params)
        if o is None:
            return web.Response()
        resp_type = params.get("newOrderRespType", "FULL").upper()
        ack = {"symbol": o.symbol, "orderId": o.order_id, "orderListId": -1, "clientOrderId": o.client_order_id,
               "transactTime": o.update_ms}
        if resp_type == "ACK":
            return self._json(ack)
        body = {**ack, **{k: v for k, v in self._spot_order(o).items()
                          if k not in ("stopPrice", "icebergQty", "time", "updateTime", "isWorking")}}
        if resp_type == "FULL":
            body["fills"] = [] if o.status != "FILLED" else [{
                "price": num(o.price), "qty": self._qty(o, o.executed_qty), "commission": num(o.commission),
                "commissionAsset": split_symbol(o.symbol)[1], "tradeId": o.order_id,
            }]
        return self._json(body)

    async def _spot_get_order(self, request: web.Request) -> web.StreamResponse:
        key, params = await self._signed(request)
        return self._json(self._spot_order(self._find(key, params)))

    async def _spot_cancel_order(self, request: web.Request) -> web.StreamResponse:
        key, params = await self._signed(request)
        o = self._cancel(key, params)
        body = self._spot_order(o)
        for k in ("stopPrice", "icebergQty", "time", "updateTime", "isWorking", "workingTime",
                  "origQuoteOrderQty"):
            del body[k]
        body["origClientOrderId"] = o.client_order_id
        body["clientOrderId"] = params.get("newClientOrderId") or f"cancel{o.order_id}"
        body["transactTime"] = o.update_ms
        return self._json(body)

    async def _spot_open_orders(self, request: web.Request) -> web.StreamResponse:
        key, params = await self._signed(request)
        orders = self.exchange.open_orders(key, params.get("symbol"))
        return self._json([self._spot_order(o) for o in orders])

    async def _spot_account(self, request: web.Request) -> web.StreamResponse:
        key, _ = await self._signed(request)
        ex = self.exchange
        with ex.lock:
            ex.settle()
            acct = ex.account(key)
            assets = dict.fromkeys(a for s in self.data.symbols for a in split_symbol(s))
            assets.update(dict.fromkeys(acct.balances))
            balances = [{"asset": a, "free": f"{max(acct.balances.get(a, 0.0), 0.0):.8f}", "locked": "0.00000000"}
                        for a in assets]
            update = acct.update_ms
        fee = ex.params.taker_fee
        return self._json({
            "makerCommission": round(ex.params.maker_fee * 10_000), "takerCommission": round(fee * 10_000),
            "buyerCommission": 0, "sellerCommission": 0,
            "commissionRates": {"maker": f"{ex.params.maker_fee:.8f}", "taker": f"{fee:.8f}",
                                "buyer": "0.00000000", "seller": "0.00000000"},
            "canTrade": True, "canWithdraw": True, "canDeposit": True, "brokered": False,
            "requireSelfTradePrevention": False, "preventSor": False, "updateTime": update,
            "accountType": "SPOT", "balances": balances, "permissions": ["SPOT"], "uid": 1,
        })

    # -- USDⓈ-M futures ------------------------------------------------------------------------------------
    def _fut_order(self, o: Order) -> dict[str, Any]:
        return {
            "orderId": o.order_id, "symbol": o.symbol, "status": o.status, "clientOrderId": o.client_order_id,
            "price": "0", "avgPrice": num(o.price), "origQty": self._qty(o, o.qty),
            "executedQty": self._qty(o, o.executed_qty), "cumQty": self._qty(o, o.executed_qty),
            "cumQuote": num(o.quote_qty), "timeInForce": "GTC", "type": "MARKET", "reduceOnly": o.reduce_only,
            "closePosition": False, "side": o.side, "positionSide": "BOTH", "stopPrice": "0",
            "workingType": "CONTRACT_PRICE", "priceProtect": False, "origType": "MARKET", "priceMatch": "NONE",
            "selfTradePreventionMode": "EXPIRE_MAKER", "goodTillDate": 0, "time": o.time_ms,
            "updateTime": o.update_ms,
        }

    async def _fut_new_order(self, request: web.Request) -> web.StreamResponse:
        key, params = await self._signed(request)
        if params.get("positionSide", "BOTH").upper() != "BOTH":
            raise BinanceError(-4061, "Order's position side does not match user's setting.")
        o = await self._place(request, key, params)
        if o is None:
            return web.Response()
        body = self._fut_order(o)
        del body["time"]
        return self._json(body)

    async def _fut_get_order(self, request: web.Request) -> web.StreamResponse:
        key, params = await self._signed(request)
        return self._json(self._fut_order(self._find(key, params)))

    async def _fut_cancel_order(self, request: web.Request) -> web.StreamResponse:
        key, params = await self._signed(request)
        body = self._fut_order(self._cancel(key, params))
        del body["time"]
        return self._json(body)

    async def _fut_open_orders(self, request: web.Request) -> web.StreamResponse:
        key, params = await self._signed(request)
        return self._json([self._fut_order(o) for o in self.exchange.open_orders(key, params.get("symbol"))])

    async def _fut_leverage(self, request: web.Request) -> web.StreamResponse:
        key, params = await self._signed(request)
        raw = params.get("leverage", "")
        if not raw.isdigit():
            raise BinanceError(-1102, "Mandatory parameter 'leverage' was not sent, was empty/null, or malformed.")
        lev = self.exchange.set_leverage(key, params.get("symbol", ""), int(raw))
        sym = params.get("symbol", "").upper()
        return self._json({"leverage": lev, "maxNotionalValue": num(self._max_notional(lev)), "symbol": sym})

    async def _fut_position_mode(self, request: web.Request) -> web.StreamResponse:
        """One-way mode only (hedge mode is not simulated): what a trader checks before it starts."""
        await self._signed(request)
        return self._json({"dualSidePosition": False})

    @staticmethod
    def _max_notional(leverage: int) -> float:
        """A bracket ceiling shaped like Binance's (smaller at higher leverage)."""
        return 5.0e7 / leverage

    def _positions(self, key: str) -> tuple[float, list[dict[str, Any]]]:
        """(wallet balance, per-symbol position rows) of the futures account, marked at the replay's price."""
        ex = self.exchange
        with ex.lock:
            ex.settle()
            now = ex.clock.now_ms()
            acct = ex.account(key)
            rows: list[dict[str, Any]] = []
            for sym, sd in self.data.symbols.items():
                q, avg = acct.position(sym)
                mark = ex.last_price(sd, now)
                lev = ex.leverage(acct, sym)
                notional = q * mark
                rows.append({
                    "symbol": sym, "q": q, "avg": avg, "mark": mark, "lev": lev, "upnl": q * (mark - avg),
                    "notional": notional, "im": abs(notional) / lev,
                    "mm": abs(notional) * ex.params.maintenance_margin,
                    "asset": split_symbol(sym)[1], "update": acct.update_ms,
                })
            wallet = sum(acct.balances.values())
        return wallet, rows

    async def _fut_position_risk(self, request: web.Request) -> web.StreamResponse:
        key, params = await self._signed(request)
        wanted = params.get("symbol", "").upper()
        if wanted:
            self.exchange.symbol(wanted)
        v3 = request.path.startswith("/fapi/v3/")
        _, rows = self._positions(key)
        out = []
        for r in rows:
            if (wanted and r["symbol"] != wanted) or (v3 and r["q"] == 0.0):
                continue  # v3 lists only symbols with a position
            row: dict[str, Any] = {
                "symbol": r["symbol"], "positionSide": "BOTH", "positionAmt": num(r["q"]),
                "entryPrice": num(r["avg"]), "breakEvenPrice": num(r["avg"]), "markPrice": num(r["mark"]),
                "unRealizedProfit": num(r["upnl"]), "liquidationPrice": "0", "isolatedMargin": "0",
                "notional": num(r["notional"]), "marginAsset": r["asset"], "isolatedWallet": "0",
                "initialMargin": num(r["im"]), "maintMargin": num(r["mm"]), "positionInitialMargin": num(r["im"]),
                "openOrderInitialMargin": "0", "adl": 0, "bidNotional": "0", "askNotional": "0",
                "updateTime": r["update"],
            }
            if not v3:
                row.update({"leverage": str(r["lev"]), "marginType": "cross", "isolated": False,
                            "maxNotionalValue": num(self._max_notional(r["lev"]))})
            out.append(row)
        return self._json(out)

    def _asset_rows(self, key: str) -> list[dict[str, Any]]:
        ex = self.exchange
        _, rows = self._positions(key)
        with ex.lock:
            balances = dict(ex.account(key).balances)
        out = []
        for asset, wallet in balances.items():
            upnl = sum(r["upnl"] for r in rows if r["asset"] == asset)
            im = sum(r["im"] for r in rows if r["asset"] == asset)
            mm = sum(r["mm"] for r in rows if r["asset"] == asset)
            avail = wallet + upnl - im
            out.append({"asset": asset, "walletBalance": wallet, "unrealizedProfit": upnl,
                        "marginBalance": wallet + upnl, "maintMargin": mm, "initialMargin": im,
                        "availableBalance": avail})
        return out

    async def _fut_balance(self, request: web.Request) -> web.StreamResponse:
        key, _ = await self._signed(request)
        update = self.exchange.account(key).update_ms
        return self._json([
            {"accountAlias": "SgsR", "asset": a["asset"], "balance": num(a["walletBalance"]),
             "crossWalletBalance": num(a["walletBalance"]), "crossUnPnl": num(a["unrealizedProfit"]),
             "availableBalance": num(a["availableBalance"]), "maxWithdrawAmount": num(a["availableBalance"]),
             "marginAvailable": True, "updateTime": update}
            for a in self._asset_rows(key)
        ])

    async def _fut_account(self, request: web.Request) -> web.StreamResponse:
        key, _ = await self._signed(request)
        assets = self._asset_rows(key)
        _, rows = self._positions(key)

        def total(field: str) -> str:
            return num(sum(a[field] for a in assets))

        return self._json({
            "feeTier": 0, "feeBurn": False, "canTrade": True, "canDeposit": True, "canWithdraw": True,
            "updateTime": 0, "multiAssetsMargin": False, "tradeGroupId": -1,
            "totalInitialMargin": total("initialMargin"), "totalMaintMargin": total("maintMargin"),
            "totalWalletBalance": total("walletBalance"), "totalUnrealizedProfit": total("unrealizedProfit"),
            "totalMarginBalance": total("marginBalance"), "totalPositionInitialMargin": total("initialMargin"),
            "totalOpenOrderInitialMargin": "0", "totalCrossWalletBalance": total("walletBalance"),
            "totalCrossUnPnl": total("unrealizedProfit"), "availableBalance": total("availableBalance"),
            "maxWithdrawAmount": total("availableBalance"),
            "assets": [{
                "asset": a["asset"], "walletBalance": num(a["walletBalance"]),
                "unrealizedProfit": num(a["unrealizedProfit"]), "marginBalance": num(a["marginBalance"]),
                "maintMargin": num(a["maintMargin"]), "initialMargin": num(a["initialMargin"]),
                "positionInitialMargin": num(a["initialMargin"]), "openOrderInitialMargin": "0",
                "crossWalletBalance": num(a["walletBalance"]), "crossUnPnl": num(a["unrealizedProfit"]),
                "availableBalance": num(a["availableBalance"]), "maxWithdrawAmount": num(a["availableBalance"]),
                "marginAvailable": True, "updateTime": 0,
            } for a in assets],
            "positions": [{
                "symbol": r["symbol"], "initialMargin": num(r["im"]), "maintMargin": num(r["mm"]),
                "unrealizedProfit": num(r["upnl"]), "positionInitialMargin": num(r["im"]),
                "openOrderInitialMargin": "0", "leverage": str(r["lev"]), "isolated": False,
                "entryPrice": num(r["avg"]), "breakEvenPrice": num(r["avg"]),
                "maxNotional": num(self._max_notional(r["lev"])), "bidNotional": "0", "askNotional": "0",
                "positionSide": "BOTH", "positionAmt": num(r["q"]), "updateTime": r["update"],
            } for r in rows],
        })


__all__ = ["TradingRoutes", "num"]
