"""The risk engine: every order passes it (a pre-send hook of ``OrderGateway``), and it can stop the trader.

Why a separate engine and not checks in the policy path: a bug in the model, the sizing or the trader, or a
market move, must not be able to send an order beyond the limits a person set (``params.yaml: risk``). The
engine sees only the order request, the positions and the equity, so it holds whatever computed the order.

States (persisted in the journal, ``risk_kv``; every transition in ``risk_events`` with its reason and numbers):

- ``ACTIVE``: orders within the limits pass; an order over a notional or leverage limit is *reduced* to the
  limit (on the step grid; refused when the remainder is below the exchange's minimum notional);
- ``REDUCING`` (drawdown from the session's equity peak beyond ``max_drawdown``, or the operator's
  ``stop``/``reduce``/``flatten``): only orders that shrink a position without flipping it (a flip is refused
  whole, as ``live.control`` does: the position is held, not reversed);
- ``HALTED`` (daily loss beyond ``max_daily_loss``, an operator's ``halt``, a failed reconciliation, or the
  start of a testnet/live trader until recovery passes): nothing is sent. HALTED survives restarts and is
  left only by ``rltrader trade resume`` (or, at start, a passed reconciliation when the halt was the start's).

Per symbol, no new risk (only reducing orders) while its data is stale (no closed bar for ``stale_after_s``
wall-clock seconds), its REST repair is running, or its features are NaN; the reason is in the refusal.

Every refusal and reduction lands in the orders table (status ``blocked`` / detail ``reduced: …``), because the
gateway records the intent before it asks the hooks.

Operator commands (``halt`` / ``resume`` / ``flatten`` / …) are ``live.control``'s, over the same journal
tables (``risk_kv`` key ``risk_state``, ``risk_events``, ``commands``): state changes take effect at once (this
engine reads the persisted state before every order), queued actions are taken by the running trader between
bars.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import numpy as np

from rltrader.execution import XP_MIN_NOTIONAL, XP_STEP, XP_TICK
from rltrader.live.gateway import OrderRequest, Reduced
from rltrader.live.records import Records

log = logging.getLogger(__name__)
STATE_KEY = "risk_state"
DAY_US = 86_400_000_000


class RiskState(StrEnum):
    ACTIVE = "ACTIVE"
    REDUCING = "REDUCING"
    HALTED = "HALTED"


@dataclass(frozen=True)
class RiskLimits:
    """The ``risk`` section's limits as plain numbers (0 = off)."""

    max_order_notional: float = 0.0
    max_symbol_notional: float = 0.0
    max_total_notional: float = 0.0
    max_leverage: float = 0.0
    max_orders_per_minute: int = 0
    max_daily_loss: float = 0.0
    max_drawdown: float = 0.0
    stale_after_s: float = 0.0

    @classmethod
    def from_settings(cls, risk: Any) -> RiskLimits:
        return cls(**{f: getattr(risk, f) for f in cls.__dataclass_fields__})


def reduces(position: float, qty: float) -> bool:
    """The order shrinks the position without flipping it (what REDUCING and reduceOnly allow)."""
    after = position + qty
    return position != 0.0 and qty != 0.0 and (qty > 0.0) != (position > 0.0) and abs(after) <= abs(position) and (
        after == 0.0 or (after > 0.0) == (position > 0.0))


def _floor_step(q: float, step: float) -> float:
    if step <= 0.0:
        return q
    return math.copysign(math.floor(abs(q) / step + 1e-9) * step, q)


def state_of(records: Records) -> dict[str, Any]:
    """The persisted state (``{"state", "reason", "numbers", "updated_at"}``; ``updated_at`` is the wall clock
    of the transition); ACTIVE when nothing was ever written. The one reader of the state: the risk engine, the
    operator's commands (``live.control``), the CLI and the HTTP API."""
    entry = records.kv_entry(STATE_KEY)
    if entry is None or not isinstance(entry[0], dict):
        return {"state": RiskState.ACTIVE.value, "reason": "initial", "numbers": {}, "updated_at": None}
    st, at = entry
    return {"state": st.get("state", RiskState.ACTIVE.value), "reason": st.get("reason", ""),
            "numbers": st.get("numbers", {}), "updated_at": at}


def set_state(records: Records, new: RiskState, reason: str, **numbers: Any) -> bool:
    """Persist a transition (and log it, with its numbers); False when already in that state for that reason
    (a new reason for the same state — a failed reconciliation after the start's own halt — is recorded)."""
    old = state_of(records)
    if old["state"] == new.value and old.get("reason") == reason:
        return False
    with records.transaction():  # the state and its event together
        records.kv_set(STATE_KEY, {"state": new.value, "reason": reason, "numbers": numbers})
        records.record_risk_event(old["state"], new.value, reason, numbers)
    log.warning(json.dumps({"event": "risk_state", "from": old["state"], "to": new.value, "reason": reason,
                            **numbers}, default=str))
    return True


class RiskEngine:
    """Limits, states and breakers; ``__call__`` is the gateway's pre-send hook."""

    def __init__(self, limits: RiskLimits, records: Records, xp: np.ndarray, session_id: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.limits, self.records, self.xp, self.session_id, self.clock = limits, records, xp, session_id, clock
        self.marks: dict[str, tuple[float, float, float]] = {}
        """symbol → (position, price, equity) at its last closed bar."""
        self.last_bar_wall: dict[str, float] = {}
        self.blocked: dict[str, str] = {}
        """symbol → why it may take no new risk (NaN features, a REST repair running)."""
        self.sent: list[float] = []
        peak = records.kv_get(f"peak:{session_id}")
        self.peak: float | None = None if peak is None else float(peak)
        day = records.kv_get(f"day:{session_id}")
        self.day: tuple[int, float] | None = None if day is None else (int(day[0]), float(day[1]))

    # -- state --------------------------------------------------------------------------------------------
    @property
    def state(self) -> RiskState:
        return RiskState(state_of(self.records)["state"])

    def transition(self, new: RiskState, reason: str, **numbers: Any) -> bool:
        return set_state(self.records, new, reason, **numbers)

    # -- inputs from the trader ---------------------------------------------------------------------------
    def on_bar(self, symbol: str, *, valid: bool = True, repairing: bool = False) -> None:
        """A closed bar arrived: its wall-clock time feeds the stale breaker; NaN features / a repair block."""
        self.last_bar_wall[symbol] = self.clock()
        if not valid:
            self.blocked[symbol] = "NaN features"
        elif repairing:
            self.blocked[symbol] = "REST repair running"
        else:
            self.blocked.pop(symbol, None)

    def on_mark(self, symbol: str, position: float, price: float, equity: float, bar_time: int) -> None:
        """A symbol's mark at a bar's close; total equity drives the daily-loss and drawdown breakers."""
        self.marks[symbol] = (position, price, equity)
        total = self.equity
        day = bar_time // DAY_US
        if self.day is None or self.day[0] != day:
            self.day = (day, total)
            self.records.kv_set(f"day:{self.session_id}", list(self.day))
        if self.peak is None or total > self.peak:
            self.peak = total
            self.records.kv_set(f"peak:{self.session_id}", total)
        lim = self.limits
        loss = (self.day[1] - total) / self.day[1] if self.day[1] > 0 else 0.0
        if lim.max_daily_loss and loss > lim.max_daily_loss and self.state is not RiskState.HALTED:
            self.transition(RiskState.HALTED, "max_daily_loss", equity=total, day_start=self.day[1],
                            loss=loss, limit=lim.max_daily_loss, symbol=symbol, bar_time=bar_time)
            return
        dd = (self.peak - total) / self.peak if self.peak > 0 else 0.0
        if lim.max_drawdown and dd > lim.max_drawdown and self.state is RiskState.ACTIVE:
            self.transition(RiskState.REDUCING, "max_drawdown", equity=total, peak=self.peak, drawdown=dd,
                            limit=lim.max_drawdown, symbol=symbol, bar_time=bar_time)

    @property
    def equity(self) -> float:
        return float(sum(m[2] for m in self.marks.values()))

    def stale(self, symbol: str) -> str | None:
        if self.limits.stale_after_s <= 0.0 or symbol not in self.last_bar_wall:
            return None
        age = self.clock() - self.last_bar_wall[symbol]
        return f"stale data: no closed bar for {age:.0f} s (limit {self.limits.stale_after_s:g} s)" if (
            age > self.limits.stale_after_s) else None

    # -- the hook -----------------------------------------------------------------------------------------
    def __call__(self, req: OrderRequest) -> str | Reduced | None:
        verdict = self.check(req)
        if verdict is None or isinstance(verdict, str):
            if verdict is None:
                self.sent.append(self.clock())
            return verdict
        self.sent.append(self.clock())
        return verdict

    def check(self, req: OrderRequest) -> str | Reduced | None:
        """None: send as is; a string: refused (why); ``Reduced``: send this smaller order instead (why)."""
        pos, qty, px = req.committed, req.qty, req.ref_price
        state = self.state
        lim, xp = self.limits, self.xp
        is_reducing = reduces(pos, qty)
        if state is RiskState.HALTED:
            return f"HALTED: {state_of(self.records)['reason']}"
        why: list[str] = []
        if not is_reducing:
            no_risk = self.blocked.get(req.symbol) or self.stale(req.symbol)
            if no_risk:
                return f"no new risk: {no_risk}"
            if state is RiskState.REDUCING:
                return (f"REDUCING: {state_of(self.records)['reason']} (order {qty:g} would not reduce position "
                        f"{pos:g})")
        cur = req
        if not is_reducing:
            # notional and leverage caps: reduce the order to what fits, on the step grid
            cap = math.inf
            if lim.max_order_notional:
                cap = min(cap, lim.max_order_notional / px)
                if abs(qty) > cap:
                    why.append(f"max_order_notional {lim.max_order_notional:g}: |{qty:g}| x {px:g}")
            room_symbol = room_total = room_lev = math.inf
            others = sum(abs(p) * pr for s, (p, pr, _) in self.marks.items() if s != req.symbol)
            same_dir = abs(pos) if (pos > 0.0) == (qty > 0.0) else -abs(pos)
            if lim.max_symbol_notional:
                room_symbol = lim.max_symbol_notional / px - same_dir
                if abs(qty) > room_symbol:
                    why.append(f"max_symbol_notional {lim.max_symbol_notional:g}: position {pos:g} + {qty:g} at "
                               f"{px:g}")
            if lim.max_total_notional:
                room_total = (lim.max_total_notional - others) / px - same_dir
                if abs(qty) > room_total:
                    why.append(f"max_total_notional {lim.max_total_notional:g}: others {others:.4g} + "
                               f"|{pos + qty:g}| x {px:g}")
            eq = self.equity
            if lim.max_leverage and eq > 0.0:
                room_lev = (lim.max_leverage * eq - others) / px - same_dir
                if abs(qty) > room_lev:
                    why.append(f"max_leverage {lim.max_leverage:g}: equity {eq:.4g}, others {others:.4g}, "
                               f"|{pos + qty:g}| x {px:g}")
            allowed = min(cap, room_symbol, room_total, room_lev)
            if abs(qty) > allowed:
                q = _floor_step(math.copysign(max(allowed, 0.0), qty), float(xp[XP_STEP]))
                if q == 0.0 or abs(q) * px < xp[XP_MIN_NOTIONAL]:
                    return "refused: " + "; ".join(why) + f" (room {max(allowed, 0.0):g} below the exchange minimum)"
                cur = replace(req, qty=q, closes=False)
            if lim.max_orders_per_minute:
                now = self.clock()
                self.sent = [t for t in self.sent if now - t < 60.0]
                if len(self.sent) >= lim.max_orders_per_minute:
                    return f"max_orders_per_minute {lim.max_orders_per_minute}: {len(self.sent)} sent in the last 60 s"
        bad = self.filter_error(cur)
        if bad is not None:
            return bad
        reduce_only = reduces(pos, cur.qty)
        if reduce_only != cur.reduce_only:
            cur = replace(cur, reduce_only=reduce_only)
        if cur is req:
            return None
        if not why:  # only the reduceOnly flag changed
            return Reduced(cur, "")
        return Reduced(cur, "reduced: " + "; ".join(why) + f" → {cur.qty:g}")

    def filter_error(self, req: OrderRequest) -> str | None:
        """The exchange's filters, checked before sending (a refusal there costs a request and rate weight):
        quantity on the step grid and notional ≥ the minimum, unless the order closes to flat (the kernel and
        the exchange's reduce-only close take any size); a market order carries no price, so the tick size
        applies to the reference price only as a sanity check that it is a price at all."""
        xp = self.xp
        step, tick = float(xp[XP_STEP]), float(xp[XP_TICK])
        if not (req.ref_price > 0.0 and math.isfinite(req.ref_price)):
            return f"filter: reference price {req.ref_price!r} is not a price"
        if tick > 0.0 and req.ref_price < tick:
            return f"filter: reference price {req.ref_price:g} below the tick size {tick:g}"
        if req.closes:
            return None
        if step > 0.0 and abs(abs(req.qty) / step - round(abs(req.qty) / step)) > 1e-6:
            return f"filter: quantity {req.qty:g} is not on the step grid {step:g}"
        if abs(req.qty) * req.ref_price < float(xp[XP_MIN_NOTIONAL]):
            return f"filter: notional {abs(req.qty) * req.ref_price:g} below the minimum {float(xp[XP_MIN_NOTIONAL]):g}"
        return None


__all__ = ["RiskEngine", "RiskLimits", "RiskState", "reduces", "set_state", "state_of"]
