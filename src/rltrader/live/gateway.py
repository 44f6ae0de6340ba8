"""The order path: target position → order delta → exchange filters → pre-send hooks → record → broker.

Why targets and not orders: a trader that restarts, or recomputes a bar's decision, must not send the same order
twice. It decides where the position should be (``target``); the order is ``target − committed position``
(filled plus in flight), rounded by the exchange filters exactly as the execution kernel rounds
(``execution.round_qty`` onto the step grid unless the order closes to flat; below ``min_notional`` it is not
sent unless it closes to flat). The order's client id is derived from (session, symbol, bar), and the records
refuse a second order with the same id, so a recomputed bar sends nothing new.

Every request is recorded, then passes the ``pre_send`` hooks in order, then is sent; a hook returns None to let
it through, a reason string to block it (the block is recorded as the order's status), or ``Reduced`` to send a
smaller / reduce-only order instead (the reason goes into the record). The risk engine (``live.risk``) is such a
hook. The record is the write-ahead journal's intent: committed (fsynced) before the request leaves, so a
process killed at any instant leaves an intent that recovery (``live.recovery``) resolves by its client id.

Brokers (``Broker``):

- ``PaperBroker``: the order fills in the execution kernel at the open of the bar it is due in, with that bar's
  volume (impact), then liquidation over the bar and the mark at its close: ``execution.process_bar``, the very
  function the envs and the backtest call, on the trader's own account array. ``kernel_bar`` is the one adapter
  between the trader and the kernel (where a kernel-side fill event log will plug in).
- ``BinanceBroker``: market orders through python-binance's ``Client`` (spot ``/api/v3/order``, USDⓈ-M futures
  ``/fapi/v1/order``); the exchange's fills are booked into the same account array with
  ``execution.apply_fill`` (bookkeeping of a given fill, no fill model).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from rltrader.execution import (
    AVG_ENTRY,
    CASH,
    FEES,
    FUNDING,
    INSURANCE,
    N_LIQUIDATIONS,
    QTY,
    REALIZED,
    SLIPPAGE,
    XP_MIN_NOTIONAL,
    XP_STEP,
    XP_TAKER,
    apply_fill,
    close_position,
    fill_price,
    mark_to_market,
    process_bar,
    round_qty,
)
from rltrader.live.records import Records, order_id_for

log = logging.getLogger(__name__)
KILL_VAR = "RLTRADER_KILL_AT"
_crash_counts: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Crash-test hook: ``RLTRADER_KILL_AT=<name>:<n>`` SIGKILLs this process the n-th time it passes ``name``
    (``after_intent``, ``after_post``, ``during_reconcile``). Unset (always, outside the crash tests): nothing."""
    spec = os.environ.get(KILL_VAR)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Bar:
    """One closed 1m candle (times: open time, µs UTC)."""

    time: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    trades: float = 0.0
    taker_buy_volume: float = 0.0


@dataclass(frozen=True)
class OrderRequest:
    symbol: str
    bar_time: int
    """Open time of the bar the order is for (it is sent at that bar's open)."""
    client_order_id: str
    qty: float
    """Signed: > 0 buys, < 0 sells."""
    ref_price: float
    """The last close the order was sized on."""
    reason: str
    closes: bool
    """Brings the position to exactly flat (exempt from the step grid and min notional)."""
    committed: float = 0.0
    """The position (filled plus in flight) the order was computed against: the risk engine's ``before``."""
    reduce_only: bool = False
    """Only shrinks the position (set by the risk engine; futures send it ``reduceOnly``)."""


@dataclass(frozen=True)
class Reduced:
    """A pre-send hook's answer: send ``req`` (smaller than asked, or flagged reduce-only) instead; ``why``
    goes into the order's record."""

    req: OrderRequest
    why: str


@dataclass(frozen=True)
class Fill:
    symbol: str
    time: int
    kind: str
    """order | liquidation | forced_close"""
    qty: float
    price: float
    fee: float
    slippage: float
    realized: float
    position_after: float
    client_order_id: str | None = None


PreSendHook = Callable[[OrderRequest], "str | Reduced | None"]


def fill_from_row(row: dict[str, Any]) -> Fill:
    """A journaled fill (a ``fills`` row) as the brokers report it."""
    return Fill(str(row["symbol"]), int(row["time"]), str(row["kind"]), float(row["qty"]), float(row["price"]),
                float(row["fee"]), float(row["slippage"]), float(row["realized"]), float(row["position_after"]),
                row["client_order_id"])


def book_fill(acct: np.ndarray, fill: Fill) -> None:
    """Book a fill the exchange reported (or the journal holds) into the account: ``execution.apply_fill`` at its
    price with its fee, no fill model."""
    q, px = fill.qty, fill.price
    if q != 0.0 and px > 0.0:
        apply_fill(acct, 0, q, px, fill.fee / (abs(q) * px), px)


def order_delta(target: float, committed: float, ref: float, xp: np.ndarray) -> tuple[float, bool]:
    """``target − committed`` rounded as the kernel rounds; (0, …) when the exchange would refuse it."""
    dq = target - committed
    closes = target == 0.0
    if dq == 0.0:
        return 0.0, closes
    if not closes:
        dq = float(round_qty(dq, xp[XP_STEP]))
        if dq != 0.0 and abs(dq) * ref < xp[XP_MIN_NOTIONAL]:
            return 0.0, closes
    return dq, closes


def kernel_bar(acct: np.ndarray, symbol: str, dq: float, bar: Bar, xp: np.ndarray,
               client_order_id: str | None) -> list[Fill]:
    """One bar of the paper account through the execution kernel (``process_bar``: funding, the order's fill
    at the open, liquidation, mark), and the fill events read off the account's deltas."""
    before = acct[:, 0].copy()
    filled = process_bar(acct, 0, dq, bar.time, bar.open, bar.high, bar.low, bar.close, bar.volume, xp)
    fills: list[Fill] = []
    nl = acct[N_LIQUIDATIONS, 0] - before[N_LIQUIDATIONS]
    if filled != 0.0:
        px = fill_price(bar.open, 1.0 if filled > 0 else -1.0, abs(filled), bar.volume, xp)
        fee = abs(filled) * px * xp[XP_TAKER]
        q0 = before[QTY]
        real = 0.0
        if q0 != 0.0 and (filled > 0.0) != (q0 > 0.0):
            real = min(abs(filled), abs(q0)) * (px - before[AVG_ENTRY]) * (1.0 if q0 > 0.0 else -1.0)
        fills.append(Fill(symbol, bar.time, "order", filled, px, fee, abs(filled) * abs(px - bar.open), real,
                          q0 + filled, client_order_id))
    if nl > 0.0:
        q_mid = before[QTY] + filled
        dq_l = -q_mid
        o_cost = sum(f.qty * f.price + f.fee for f in fills)
        d_cash = (acct[CASH, 0] - before[CASH]) - (acct[INSURANCE, 0] - before[INSURANCE]) + (
            acct[FUNDING, 0] - before[FUNDING])
        denom = dq_l * (1.0 + (1.0 if dq_l > 0.0 else -1.0) * xp[XP_TAKER])
        px_l = -(d_cash + o_cost) / denom if denom != 0.0 else 0.0
        fee_o = sum(f.fee for f in fills)
        real_o = sum(f.realized for f in fills)
        fills.append(Fill(symbol, bar.time, "liquidation", dq_l, px_l, acct[FEES, 0] - before[FEES] - fee_o, 0.0,
                          acct[REALIZED, 0] - before[REALIZED] - real_o, 0.0, None))
    return fills


def kernel_close(acct: np.ndarray, symbol: str, bar: Bar, xp: np.ndarray) -> list[Fill]:
    """Market-close the paper position at the bar's close (a forced close), through the kernel."""
    q = acct[QTY, 0]
    if q == 0.0:
        return []
    f0, r0, s0 = acct[FEES, 0], acct[REALIZED, 0], acct[SLIPPAGE, 0]
    px = fill_price(bar.close, -1.0 if q > 0.0 else 1.0, abs(q), bar.volume, xp)
    close_position(acct, 0, bar.close, bar.volume, xp)
    mark_to_market(acct, 0, bar.close)
    return [Fill(symbol, bar.time, "forced_close", -q, px, acct[FEES, 0] - f0, acct[SLIPPAGE, 0] - s0,
                 acct[REALIZED, 0] - r0, 0.0, None)]


class Broker(Protocol):
    """Where orders go. ``send`` at the bar's open; ``settle`` once the bar has closed (fills, mark)."""

    name: str

    def send(self, req: OrderRequest, acct: np.ndarray) -> str | None:
        """Send the order; returns the exchange's order id (None for paper)."""

    def settle(self, symbol: str, bar: Bar, acct: np.ndarray) -> list[Fill]:
        """The bar has closed: book what filled in it into ``acct`` and mark it at the close."""

    def flatten(self, symbol: str, bar: Bar, acct: np.ndarray) -> list[Fill]:
        """Close the whole position (end of the run / a data gap)."""


class PaperBroker:
    """Fills in the execution kernel, exactly as the backtest does (no keys, no exchange)."""

    name = "paper"

    def __init__(self, xp: np.ndarray) -> None:
        self.xp = xp
        self.due: dict[str, tuple[float, str | None]] = {}

    def send(self, req: OrderRequest, acct: np.ndarray) -> str | None:
        self.due[req.symbol] = (req.qty, req.client_order_id)
        return None

    def settle(self, symbol: str, bar: Bar, acct: np.ndarray) -> list[Fill]:
        dq, cid = self.due.pop(symbol, (0.0, None))
        return kernel_bar(acct, symbol, dq, bar, self.xp, cid)

    def flatten(self, symbol: str, bar: Bar, acct: np.ndarray) -> list[Fill]:
        self.due.pop(symbol, None)
        return kernel_close(acct, symbol, bar, self.xp)


class OutcomeUnknown(RuntimeError):
    """The exchange may or may not have the order (no answer, 5xx, ``-1007``) and it could not be resolved in
    the time allowed: the journal keeps it ``unknown`` and recovery resolves it before any new order."""

    outcome_unknown = True


def _retry_after(exc: BaseException) -> float | None:
    """Seconds to wait after an HTTP 429 (``Retry-After``), None for any other error."""
    if getattr(exc, "status_code", None) != 429:
        return None
    resp = getattr(exc, "response", None)
    try:
        return float(resp.headers.get("Retry-After", 1)) if resp is not None else 1.0
    except (TypeError, ValueError):
        return 1.0


def unknown_outcome(exc: BaseException) -> bool:
    """An error after which the order may exist: timeouts, 5xx, ``-1007``, a dropped or reset connection.
    A 4xx with a Binance code (``-2010``, ``-4116``, ``-1013``…) is a definite rejection; 429 (``-1015``) was
    not applied."""
    import requests
    from binance.exceptions import BinanceAPIException, BinanceRequestException

    if isinstance(exc, BinanceAPIException):
        return bool(exc.code == -1007 or exc.status_code >= 500 or exc.status_code == 408)
    if isinstance(exc, BinanceRequestException):  # an unreadable body: the request went through
        return True
    return isinstance(exc, requests.exceptions.RequestException | ConnectionError | TimeoutError)


class BinanceBroker:
    """Market orders on Binance (testnet by default) or a Binance-compatible server through python-binance.

    Keys come from the caller (the trader reads them from environment variables and never logs them). Fills
    reported by the exchange are booked with ``execution.apply_fill``; the account is marked at each close.

    Unknown outcomes (no answer, 5xx, ``-1007``, a reset connection): the order is looked up by its client id
    (``origClientOrderId``); ``-2013`` is believed only once ``grace_s`` has passed since the last send (a new
    order can be invisible to queries for a moment), and only then is the order resent, under the same id. An
    order that is accepted but not filled yet (no bar in progress on a replay) is kept open and booked when a
    later ``settle`` finds it filled.
    """

    name = "exchange"

    def __init__(self, client: Any, market: str, xp: np.ndarray, *, grace_s: float = 2.0, attempts: int = 5,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.client, self.market, self.xp = client, market, xp
        self.grace_s, self.attempts, self.sleep = grace_s, attempts, sleep
        self.pending: dict[str, list[Fill]] = {}
        self.open: dict[str, OrderRequest] = {}
        """Accepted, not yet filled orders by client id."""
        self.accounts: dict[str, np.ndarray] = {}

    def _create(self, req: OrderRequest) -> dict[str, Any]:
        side = "BUY" if req.qty > 0 else "SELL"
        args: dict[str, Any] = {"symbol": req.symbol, "side": side, "type": "MARKET",
                                "quantity": format_qty(abs(req.qty), float(self.xp[XP_STEP])),
                                "newClientOrderId": req.client_order_id}
        if self.market == "futures":
            if req.closes or req.reduce_only:
                args["reduceOnly"] = "true"
            return dict(self.client.futures_create_order(**args, newOrderRespType="RESULT"))
        return dict(self.client.create_order(**args, newOrderRespType="FULL"))

    def lookup(self, symbol: str, client_order_id: str) -> dict[str, Any] | None:
        """The exchange's view of an order by client id; None when it answers ``-2013`` (not found)."""
        from binance.exceptions import BinanceAPIException

        try:
            if self.market == "futures":
                return dict(self.client.futures_get_order(symbol=symbol, origClientOrderId=client_order_id))
            return dict(self.client.get_order(symbol=symbol, origClientOrderId=client_order_id))
        except BinanceAPIException as exc:
            if exc.code == -2013:
                return None
            raise

    def cancel(self, symbol: str, client_order_id: str) -> None:
        if self.market == "futures":
            self.client.futures_cancel_order(symbol=symbol, origClientOrderId=client_order_id)
        else:
            self.client.cancel_order(symbol=symbol, origClientOrderId=client_order_id)

    def send(self, req: OrderRequest, acct: np.ndarray) -> str | None:
        resp: dict[str, Any] | None = None
        for _ in range(self.attempts):
            sent_at = time.monotonic()
            try:
                resp = self._create(req)
            except Exception as exc:
                retry = _retry_after(exc)
                if retry is not None:  # 429: not applied; wait as told, then the same id again
                    self.sleep(min(retry, 5.0))
                    continue
                if not unknown_outcome(exc):
                    raise
                log.warning(json.dumps({"event": "order_outcome_unknown", "client_order_id": req.client_order_id,
                                        "error": type(exc).__name__, "detail": str(exc)[:200]}))
                resp = self._resolve(req, sent_at)
            if resp is not None:
                break
            log.info(json.dumps({"event": "order_absent_resend", "client_order_id": req.client_order_id}))
        if resp is None:
            raise OutcomeUnknown(f"{req.client_order_id}: not placed after {self.attempts} attempts")
        self._book(req, resp, acct)
        return str(resp.get("orderId", ""))

    def _resolve(self, req: OrderRequest, sent_at: float) -> dict[str, Any] | None:
        """After an unknown outcome: the order as the exchange has it, or None once it is proven absent (a
        ``-2013`` at least ``grace_s`` after the send). Lookups that fail themselves prove nothing: after
        ``attempts`` of them the outcome stays unknown (``OutcomeUnknown``), and nothing is resent."""
        for _ in range(self.attempts):
            wait = self.grace_s - (time.monotonic() - sent_at)
            if wait > 0:
                self.sleep(wait)
            try:
                return self.lookup(req.symbol, req.client_order_id)
            except Exception as exc:
                if not unknown_outcome(exc):
                    raise
                self.sleep(min(self.grace_s, 1.0))
        raise OutcomeUnknown(f"{req.client_order_id}: the exchange could not be asked whether it has the order")

    def _book(self, req: OrderRequest, resp: dict[str, Any], acct: np.ndarray) -> bool:
        """Book a FILLED answer into the account (and ``pending``); keep a NEW one open. True when filled."""
        status = str(resp.get("status", "FILLED"))
        qty, notional, fee = _executed(resp, self.market, self.xp)
        if status in ("NEW", "PARTIALLY_FILLED"):
            self.open[req.client_order_id] = req
            return False
        self.open.pop(req.client_order_id, None)
        if qty != 0.0:
            signed = qty if req.qty > 0 else -qty
            px = notional / qty
            q0 = float(acct[QTY, 0])
            r0 = float(acct[REALIZED, 0])
            apply_fill(acct, 0, signed, px, fee / (qty * px) if qty * px > 0 else 0.0, px)
            self.pending.setdefault(req.symbol, []).append(Fill(
                req.symbol, req.bar_time, "order", signed, px, fee, abs(signed) * abs(px - req.ref_price),
                float(acct[REALIZED, 0]) - r0, q0 + signed, req.client_order_id))
        return True

    def adopt(self, fills: Sequence[Fill], acct: np.ndarray) -> None:
        """A resumed session: fills of its orders that the journal holds but this process has not booked (an
        order decided before the restart, or found filled by recovery) are booked now, as ``_book`` booked them
        when the answer came, and handed to the trader at the next ``settle`` — so the resumed account, its
        marks and the filters' last-fill bar are the uninterrupted run's."""
        for f in fills:
            book_fill(acct, f)
            self.pending.setdefault(f.symbol, []).append(f)

    def settle(self, symbol: str, bar: Bar, acct: np.ndarray) -> list[Fill]:
        for cid, req in list(self.open.items()):
            if req.symbol == symbol:
                resp = self.lookup(symbol, cid)
                if resp is not None:
                    self._book(req, resp, acct)
        mark_to_market(acct, 0, bar.close)
        return self.pending.pop(symbol, [])

    def flatten(self, symbol: str, bar: Bar, acct: np.ndarray) -> list[Fill]:
        q = float(acct[QTY, 0])
        if q == 0.0:
            return []
        req = OrderRequest(symbol, bar.time, order_id_for("flatten", symbol, bar.time), -q, bar.close, "flatten",
                           True, q, True)
        self.send(req, acct)
        return self.settle(symbol, bar, acct)


def format_qty(q: float, step: float) -> str:
    """A quantity as the exchange reads it: the step grid's decimals (8 without a step), never an exponent."""
    import math

    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 8
    text = f"{q:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _executed(resp: dict[str, Any], market: str, xp: np.ndarray) -> tuple[float, float, float]:
    """(filled qty, quote notional, fee in quote) of an order response (spot FULL fills / futures RESULT)."""
    qty = float(resp.get("executedQty", 0.0))
    notional = float(resp.get("cummulativeQuoteQty", resp.get("cumQuote", 0.0)))
    fills = resp.get("fills") or []
    if fills:
        fee = sum(float(f["commission"]) * (float(f["price"]) if f.get("commissionAsset") != "USDT" else 1.0)
                  for f in fills)
    else:  # futures RESULT responses carry no commission: the fee schedule's taker rate
        fee = notional * float(xp[XP_TAKER])
    return qty, notional, fee


class OrderGateway:
    """Targets → orders, through the filters and the pre-send hooks, recorded before they are sent."""

    def __init__(self, broker: Any, records: Records, session_id: str, xp: np.ndarray,
                 hooks: Sequence[PreSendHook] = ()) -> None:
        self.broker, self.records, self.session_id, self.xp = broker, records, session_id, xp
        self.hooks = list(hooks)
        self.journaled: set[str] = set()
        self.booked: set[str] = set()
        """Client ids whose journaled fills a resumed session has booked into its account (``Trader.
        restore_from_journal``, ``adopt``): never booked twice."""
        self.fill_listeners: list[Callable[[Sequence[Fill]], None]] = []
        """Called with each batch of recorded fills (the notifier); must not block."""

    def order_for_target(self, symbol: str, bar_time: int, target: float, committed: float, ref: float,
                         reason: str) -> OrderRequest | None:
        dq, closes = order_delta(target, committed, ref, self.xp)
        if dq == 0.0:
            return None
        return OrderRequest(symbol, bar_time, order_id_for(self.session_id, symbol, bar_time), dq, ref, reason,
                            closes, committed)

    def submit(self, req: OrderRequest, acct: np.ndarray) -> bool:
        """Hooks, record, send. False when blocked or already recorded (a recomputed bar)."""
        if not self.records.record_order(self.session_id, req.symbol, req.bar_time, req.client_order_id, req.qty,
                                         req.ref_price, req.reason):
            known = self.records.order(req.client_order_id)
            if known is None or known["status"] != "absent":
                log.info('{"event":"order_exists","client_order_id":"%s"}', req.client_order_id)
                if known is not None and known["status"] == "filled":
                    self.adopt(req.client_order_id, acct)
                return False
            # recovery proved it absent (the process died before the request left): the recomputed bar sends
            # it now, under the same id
            self.records.update_order(req.client_order_id, "new", detail="resent: proven absent", qty=req.qty)
        for hook in self.hooks:
            verdict = hook(req)
            if isinstance(verdict, Reduced):
                req = verdict.req
                if verdict.why:
                    self.records.update_order(req.client_order_id, "new", detail=verdict.why, qty=req.qty)
                    log.info(json.dumps({"event": "order_reduced", "client_order_id": req.client_order_id,
                                         "qty": req.qty, "why": verdict.why}))
            elif verdict is not None:
                self.records.update_order(req.client_order_id, "blocked", detail=verdict)
                log.warning(json.dumps({"event": "order_blocked", "client_order_id": req.client_order_id,
                                        "symbol": req.symbol, "qty": req.qty, "why": verdict}))
                return False
        crash_point("after_intent")  # the intent is on disk, the request has not left
        try:
            exchange_id = self.broker.send(req, acct)
        except Exception as exc:
            status = "unknown" if getattr(exc, "outcome_unknown", False) else "rejected"
            self.records.update_order(req.client_order_id, status, detail=f"{type(exc).__name__}: {exc}"[:500])
            log.warning(json.dumps({"event": f"order_{status}", "client_order_id": req.client_order_id,
                                    "error": type(exc).__name__, "detail": str(exc)[:300]}))
            return False
        crash_point("after_post")  # the exchange has the order; its result is not journaled yet
        fills = getattr(self.broker, "pending", {}).get(req.symbol, [])
        mine = [f for f in fills if f.client_order_id == req.client_order_id]
        with self.records.transaction():
            self.records.update_order(req.client_order_id, "sent", exchange_order_id=exchange_id)
            if mine:  # an exchange fill is journaled with its order's result, atomically
                self.record_fills(mine)
        return True

    def adopt(self, client_order_id: str, acct: np.ndarray) -> None:
        """A recomputed bar (a resumed session) whose order filled before the restart: its journaled fills are
        booked through the broker (``BinanceBroker.adopt``) unless they are in the account already; a broker
        without ``adopt`` books nothing (paper: a resumed paper session starts on new bars,
        ``runner.resume_paper_trader``, so no bar is re-handled)."""
        if client_order_id not in self.booked:
            self.adopt_fills([fill_from_row(r) for r in self.records.order_fills(self.session_id, client_order_id)
                              if r["kind"] == "order"], acct)

    def adopt_fills(self, fills: Sequence[Fill], acct: np.ndarray) -> bool:
        """Journaled fills booked through the broker's ``adopt`` (reported again at its next ``settle``, never
        journaled again); False (nothing booked) when the broker has no ``adopt``."""
        adopt = getattr(self.broker, "adopt", None)
        if adopt is None:
            return False
        adopt(fills, acct)
        for f in fills:
            if f.client_order_id is not None:
                self.booked.add(f.client_order_id)
                self.journaled.add(f.client_order_id)
        return True

    def record_fills(self, fills: Sequence[Fill]) -> None:
        """Journal fills (each exchange order's fill once: the gateway journals it right after the answer, and
        the broker's ``settle`` hands the same fill to the trader's bookkeeping again)."""
        with self.records.transaction():
            for f in fills:
                if f.client_order_id is not None and f.kind == "order":
                    if f.client_order_id in self.journaled:
                        continue
                    self.journaled.add(f.client_order_id)
                self.records.record_fill(self.session_id, f.symbol, f.client_order_id, f.time, f.kind, f.qty, f.price,
                                         f.fee, f.slippage, f.realized, f.position_after)
                if f.client_order_id is not None and f.kind == "order":
                    self.records.update_order(f.client_order_id, "filled")
        for listener in self.fill_listeners:
            listener(fills)


__all__ = ["Bar", "BinanceBroker", "Broker", "Fill", "OrderGateway", "OrderRequest", "OutcomeUnknown", "PaperBroker",
           "Reduced", "book_fill", "crash_point", "fill_from_row", "kernel_bar", "kernel_close", "order_delta",
           "unknown_outcome"]
