"""Operator commands for a running trader, over its records DB: the one code path of the CLI and the HTTP API.

Why through the database and not a call into the trader: ``rltrader trade halt``, the HTTP API (in the trader's
process or in ``rltrader api serve`` on another host) and the risk engine all act on the same journal, and the
trader may not even be running. The state is the risk engine's (``live.risk.state_of`` / ``set_state``: ``risk_kv``
key ``risk_state`` and ``risk_events``; commands in ``commands``), one journal and one reader/writer of it:

- state changes take effect at once: ``halt`` → HALTED (nothing is sent), ``stop`` (no new entries) and ``reduce``
  → REDUCING (only orders that bring a position closer to flat), ``start``/``resume`` → ACTIVE. The state is
  persisted (it survives restarts) and checked before every order (:meth:`Controller.pre_send`, a pre-send hook
  of the order gateway, so a blocked order is recorded as ``blocked`` with the state and its reason);
- actions are queued and taken by the running trader between bars (:meth:`Controller.apply_pending`, once per
  bar): ``flatten`` closes every position at the last bar, then REDUCING until ``resume``; ``reload``
  re-resolves the model (the ``champion`` alias); ``reconcile`` compares the trader's positions with its
  recorded fills. Every command, state change or action, gets a ``commands`` row with when it was taken and
  its result.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

from rltrader.errors import ConfigError
from rltrader.live.records import Records
from rltrader.live.risk import RiskState
from rltrader.live.risk import set_state as set_state  # re-exported: the one state writer
from rltrader.live.risk import state_of as state_of  # re-exported: the one state reader

log = logging.getLogger(__name__)
State = Literal["ACTIVE", "REDUCING", "HALTED"]
STATES: tuple[State, ...] = ("ACTIVE", "REDUCING", "HALTED")
COMMANDS = ("start", "stop", "reduce", "halt", "resume", "flatten", "reload", "reconcile")
_STATE_OF: dict[str, State] = {"start": "ACTIVE", "resume": "ACTIVE", "stop": "REDUCING", "reduce": "REDUCING",
                               "halt": "HALTED"}
QUEUED = ("flatten", "reload", "reconcile")

def issue(records: Records, command: str, reason: str = "") -> dict[str, Any]:
    """Apply a state change now / queue an action for the running trader; the command's row."""
    if command not in COMMANDS:
        raise ConfigError(f"trade control: unknown command {command!r}; expected one of {', '.join(COMMANDS)}")
    why = f"operator: {command}" + (f" ({reason})" if reason else "")
    with records._lock:
        cur = records.conn.execute(records._sql("INSERT INTO commands (command, issued_at) VALUES (?, ?) RETURNING id"),
                                   (command, time.time()))
        cid = int(cur.fetchone()[0])
    if command in _STATE_OF:
        set_state(records, RiskState(_STATE_OF[command]), why)
        records._exec("UPDATE commands SET taken_at = ?, result = ? WHERE id = ?",
                      (time.time(), f"state {_STATE_OF[command]}: {why}", cid))
    else:
        records._exec("UPDATE commands SET result = ? WHERE id = ?", (f"queued: {why}", cid))
    return records._query("SELECT * FROM commands WHERE id = ?", (cid,))[0]


def halt(records: Records, reason: str = "") -> dict[str, Any]:
    return issue(records, "halt", reason)


def resume(records: Records, reason: str = "") -> dict[str, Any]:
    return issue(records, "resume", reason)


def flatten(records: Records, reason: str = "") -> dict[str, Any]:
    return issue(records, "flatten", reason)


def stop(records: Records, reason: str = "") -> dict[str, Any]:
    return issue(records, "stop", reason)


def start(records: Records, reason: str = "") -> dict[str, Any]:
    return issue(records, "start", reason)


def reduce(records: Records, reason: str = "") -> dict[str, Any]:
    return issue(records, "reduce", reason)


def reload(records: Records, reason: str = "") -> dict[str, Any]:
    return issue(records, "reload", reason)


def reconcile(records: Records, reason: str = "") -> dict[str, Any]:
    return issue(records, "reconcile", reason)


def pending(records: Records) -> list[dict[str, Any]]:
    """Queued actions the running trader has not taken yet."""
    return records._query("SELECT * FROM commands WHERE taken_at IS NULL ORDER BY id")


def recent(records: Records, limit: int = 20) -> list[dict[str, Any]]:
    return records._query("SELECT * FROM commands ORDER BY id DESC LIMIT ?", (limit,))


class Controller:
    """The trader side: the state as a pre-send hook, and the queued actions taken between bars.

    ``trader`` is a :class:`rltrader.live.trader.Trader`; ``reload`` is the runner's model re-resolution (None:
    a reload is answered as not available)."""

    def __init__(self, trader: Any, *, reload: Callable[[], str] | None = None) -> None:
        self.trader, self.records, self._reload = trader, trader.records, reload
        trader.gateway.hooks.append(self.pre_send)
        self.last_bar: dict[str, Any] = {}

    # -- the gateway hook -----------------------------------------------------------------------------
    def pre_send(self, req: Any) -> str | None:
        """None lets the order through; the state and its reason block it (recorded as the order's detail)."""
        from rltrader.execution import QTY

        st = state_of(self.records)  # read per order: a halt from another process counts from the next order
        if st["state"] == "HALTED":
            return f"HALTED: {st['reason']}"
        if st["state"] == "REDUCING":
            held = float(self.trader.books[req.symbol].acct[QTY, 0])  # filled position: the one to reduce
            if abs(held + req.qty) >= abs(held) - 1e-12 or held * (held + req.qty) < 0:
                return f"REDUCING: {st['reason']} (order {req.qty:g} would not reduce position {held:g})"
        return None

    # -- between bars ---------------------------------------------------------------------------------
    def on_bar(self, symbol: str, bar: Any) -> int:
        """Called once per handled bar: remembers it (flatten closes at the last bar) and takes queued actions."""
        self.last_bar[symbol] = bar
        return self.apply_pending()

    def apply_pending(self) -> int:
        n = 0
        for c in pending(self.records):
            result = self._apply(str(c["command"]))
            self.records._exec("UPDATE commands SET taken_at = ?, result = ? WHERE id = ?",
                               (time.time(), f"{result} ({c['result'] or ''})", c["id"]))
            n += 1
        return n

    def _apply(self, command: str) -> str:
        from rltrader.live.trader import _event

        if command == "flatten":
            done = []
            for sym, bar in self.last_bar.items():
                if sym not in self.trader.finished:
                    self.trader._flatten(sym, bar, "flatten")
                    done.append(sym)
            set_state(self.records, RiskState.REDUCING, "operator: flatten")
            result = f"flattened {','.join(done) or 'nothing'}; REDUCING until resume"
        elif command == "reload":
            result = self._reload() if self._reload is not None else "reload not available for this trader"
        elif command == "reconcile":
            result = self.reconcile()
        else:
            result = f"{command}: nothing to do between bars"
        _event("control", command=command, result=result)
        return result

    def reconcile(self) -> str:
        """Positions held by the trader against the position after its last recorded fill, per symbol."""
        from rltrader.execution import QTY

        fills = self.records.fills(self.trader.session_id)
        diffs = {}
        for sym, book in self.trader.books.items():
            held = float(book.acct[QTY, 0])
            rec = [f for f in fills if f["symbol"] == sym]
            recorded = float(rec[-1]["position_after"]) if rec else 0.0
            if abs(held - recorded) > 1e-9:
                diffs[sym] = {"held": held, "recorded": recorded}
        return "consistent" if not diffs else "MISMATCH " + json.dumps(diffs)
