"""Start is recovery: resolve every open intent in the journal, then reconcile the journal with the exchange.

Why: the trader is crash-only. It can be SIGKILLed between writing an order's intent and sending it, between
the exchange accepting it and the answer being journaled, or in the middle of this very recovery. None of
these may lead to a second order: Binance refuses a repeated ``newClientOrderId`` only while the first order
is still open, and a market order is filled (closed) at once. So before the trader may send anything:

1. every journaled order whose outcome is not known (``new``, ``sent`` without a fill, ``unknown``) is looked
   up on the exchange by its client id: FILLED → its fill is journaled; still open → cancelled (a decision
   made before the crash is stale; the next bar recomputes the target, and orders are target − position, so
   the recomputation is harmless); ``-2013`` after the grace period → ``absent`` (never resent: it was never
   placed, and its bar has passed). A lookup that fails proves nothing and keeps the trader HALTED;
2. open orders on the exchange that the journal does not know → HALTED (someone else trades this account);
3. per symbol, the exchange's position against the journal's (the sum of its fills): beyond
   ``risk.position_tolerance`` → HALTED with one line naming the symbol and both quantities. A symbol the
   exchange does not report is a missing report, never "flat".

The state is ``HALTED`` ("start: recovering") while this runs; it becomes ACTIVE only when everything matched
and the halt was the start's own (an operator's or a daily-loss halt survives the restart, until resume).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rltrader.errors import ConfigError
from rltrader.live.gateway import BinanceBroker, Fill, OrderGateway, OrderRequest, crash_point
from rltrader.live.records import Records
from rltrader.live.risk import RiskState, set_state, state_of

log = logging.getLogger(__name__)
START_REASON = "start: recovering (open intents, open orders, positions)"


@dataclass
class Recovery:
    """What recovery found: per symbol the exchange position, what was resolved, and any mismatch."""

    positions: dict[str, tuple[float, float]] = field(default_factory=dict)
    """symbol → (quantity, entry price) as the exchange reports it."""
    resolved: dict[str, str] = field(default_factory=dict)
    """client order id → filled | cancelled | absent."""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_account_settings(client: Any, market: str, symbols: Sequence[str], leverage: int,
                           margin_type: str) -> None:
    """Futures in testnet/live: one-way position mode, the symbol leverage and the margin type params ask for;
    a ConfigError naming what differs otherwise (the trader never changes them itself)."""
    if market != "futures":
        return
    mode = client.futures_get_position_mode()
    if mode.get("dualSidePosition"):
        raise ConfigError("the futures account is in hedge (dual-side) position mode; the trader needs one-way mode "
                          "(Binance: Preferences → Position Mode → One-way)")
    rows = {p["symbol"]: p for p in client.futures_account().get("positions", [])}
    bad = []
    for sym in symbols:
        p = rows.get(sym)
        if p is None:
            bad.append(f"{sym}: no position report from the exchange")
            continue
        lev = int(float(p.get("leverage", 0)))
        isolated = bool(p.get("isolated", False))
        if lev != leverage:
            bad.append(f"{sym}: leverage {lev}, params risk.leverage {leverage}")
        if isolated != (margin_type == "isolated"):
            bad.append(f"{sym}: margin type {'isolated' if isolated else 'cross'}, params risk.margin_type "
                       f"{margin_type}")
    if bad:
        raise ConfigError("account settings differ from params (set them on the exchange, or change params): "
                          + "; ".join(bad))


def exchange_positions(client: Any, market: str, symbols: Sequence[str]) -> dict[str, tuple[float, float]]:
    """symbol → (position, entry price). Futures: the v2 account's position rows (every symbol listed); spot:
    the base asset's free + locked balance (entry unknown: 0). A symbol missing from the answer is absent from
    the result: the caller treats that as a missing report, never as flat."""
    out: dict[str, tuple[float, float]] = {}
    if market == "futures":
        for p in client.futures_account().get("positions", []):
            if p["symbol"] in symbols and p.get("positionSide", "BOTH") == "BOTH":
                out[p["symbol"]] = (float(p["positionAmt"]), float(p.get("entryPrice", 0.0)))
        return out
    balances = {b["asset"]: float(b["free"]) + float(b["locked"]) for b in client.get_account().get("balances", [])}
    from rltrader.sim.data import split_symbol

    for sym in symbols:
        base = split_symbol(sym)[0]
        if base in balances:
            out[sym] = (balances[base], 0.0)
    return out


def recover(records: Records, broker: BinanceBroker, gateway: OrderGateway, symbols: Sequence[str], *,
            tolerance: float, journal_modes: Sequence[str] = ("testnet", "live")) -> Recovery:
    """Resolve open intents, check open orders, reconcile positions; leaves the state HALTED unless all is well.

    ``gateway`` journals the fills found (as the live path does, each once)."""
    rec = Recovery()
    before = state_of(records)
    if before["state"] != RiskState.HALTED.value:
        set_state(records, RiskState.HALTED, START_REASON)
    crash_point("during_reconcile")
    # 1. open intents
    for o in records.open_orders(journal_modes):
        sym, cid = o["symbol"], o["client_order_id"]
        req = OrderRequest(sym, int(o["bar_time"]), cid, float(o["qty"]), float(o["ref_price"] or 0.0), o["reason"],
                           False)
        try:
            wait = broker.grace_s - (time.time() - float(o["updated_at"]))
            if wait > 0:
                broker.sleep(wait)
            resp = broker.lookup(sym, cid)
            if resp is not None and resp.get("status") in ("NEW", "PARTIALLY_FILLED"):
                try:
                    broker.cancel(sym, cid)
                except Exception:  # filled meanwhile: read it again
                    log.info(json.dumps({"event": "cancel_failed", "client_order_id": cid}))
                resp = broker.lookup(sym, cid)
        except Exception as exc:
            rec.problems.append(f"{sym}: order {cid} could not be resolved ({type(exc).__name__}: {exc})"[:300])
            continue
        crash_point("during_reconcile")
        if resp is None:
            records.update_order(cid, "absent", detail="recovery: not on the exchange after the grace period")
            rec.resolved[cid] = "absent"
            continue
        status = str(resp.get("status"))
        if status == "FILLED":
            from rltrader.live.gateway import _executed

            qty, notional, fee = _executed(resp, broker.market, broker.xp)
            signed = qty if req.qty > 0 else -qty
            px = notional / qty if qty else 0.0
            after = records.journal_positions(journal_modes).get(sym, 0.0) + signed
            with records.transaction():
                gateway.record_fills([Fill(sym, req.bar_time, "order", signed, px, fee, 0.0, 0.0, after, cid)])
                records.update_order(cid, "filled", exchange_order_id=str(resp.get("orderId", "")),
                                     detail="recovery: found filled")
            rec.resolved[cid] = "filled"
        else:
            records.update_order(cid, "cancelled", exchange_order_id=str(resp.get("orderId", "")),
                                 detail=f"recovery: exchange status {status}")
            rec.resolved[cid] = "cancelled"
    # 2. open orders the journal does not know
    try:
        if broker.market == "futures":
            open_orders = broker.client.futures_get_open_orders()
        else:
            open_orders = broker.client.get_open_orders()
        for oo in open_orders:
            cid = oo.get("clientOrderId", "")
            known = records.order(cid)
            if known is None or known["status"] not in ("new", "sent", "unknown"):
                rec.problems.append(f"{oo.get('symbol')}: open order {cid} on the exchange is not in the journal")
    except Exception as exc:
        rec.problems.append(f"open orders: no report ({type(exc).__name__}: {exc})"[:300])
    # 3. positions
    try:
        rec.positions = exchange_positions(broker.client, broker.market, symbols)
    except Exception as exc:
        rec.problems.append(f"positions: no report ({type(exc).__name__}: {exc})"[:300])
        rec.positions = {}
    journal = records.journal_positions(journal_modes)
    for sym in symbols:
        mine = journal.get(sym, 0.0)
        if sym not in rec.positions:
            rec.problems.append(f"{sym}: no position report from the exchange (journal {mine:g}); not read as flat")
            continue
        theirs = rec.positions[sym][0]
        if abs(theirs - mine) > tolerance:
            rec.problems.append(f"{sym}: position mismatch: exchange {theirs:g}, journal {mine:g}")
    crash_point("during_reconcile")
    if rec.problems:
        line = "; ".join(rec.problems)
        set_state(records, RiskState.HALTED, f"reconciliation failed: {line}"[:1000])
        log.error(json.dumps({"event": "reconciliation_failed", "problems": rec.problems}))
    elif before["state"] != RiskState.HALTED.value or before.get("reason") == START_REASON:
        set_state(records, RiskState(before["state"]) if before["state"] != RiskState.HALTED.value
                  else RiskState.ACTIVE, "recovery passed", resolved=len(rec.resolved),
                  positions={s: p[0] for s, p in rec.positions.items()})
    log.info(json.dumps({"event": "recovery", "ok": rec.ok, "resolved": rec.resolved,
                         "positions": {s: p[0] for s, p in rec.positions.items()}}))
    return rec


__all__ = ["START_REASON", "Recovery", "check_account_settings", "exchange_positions", "recover"]
