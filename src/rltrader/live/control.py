"""Operator commands for a running trader: written into the records DB, applied by the trader between bars.

Why through the database and not a call into the trader: the CLI (``rltrader trade halt``), the HTTP API (in the
trader's process or in ``rltrader api serve`` elsewhere) and a later risk engine all issue the same command the
same way — a row in ``commands`` — and the trader is the only writer of its own state. Between two bars the
runner calls :meth:`Controller.apply_pending`, which applies every pending command in order, records when and
with what result, and persists the state in ``control_state`` (so ``status`` answers even with no trader
running, and a restarted trader resumes in the state it was left in).

States (the risk engine's vocabulary): ``ACTIVE`` (trading), ``REDUCING`` (no new entries: an order is sent only
when it brings the position closer to flat) and ``HALTED`` (nothing is sent). The state is enforced as one of the
order gateway's pre-send hooks, so a blocked order is recorded as ``blocked`` with the state as its reason.

Commands: ``start``/``resume`` → ACTIVE; ``stop`` (no new entries) and ``reduce`` → REDUCING; ``halt`` → HALTED;
``flatten`` closes every position at the last bar and halts; ``reload`` re-resolves the model (the ``champion``
alias) between bars; ``reconcile`` compares the trader's positions with its recorded fills and records the result.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, Literal

from rltrader.errors import ConfigError
from rltrader.live.records import Records

State = Literal["ACTIVE", "REDUCING", "HALTED"]
STATES: tuple[State, ...] = ("ACTIVE", "REDUCING", "HALTED")
COMMANDS = ("start", "stop", "reduce", "halt", "resume", "flatten", "reload", "reconcile")
_TARGET: dict[str, State] = {"start": "ACTIVE", "resume": "ACTIVE", "stop": "REDUCING", "reduce": "REDUCING",
                             "halt": "HALTED", "flatten": "HALTED"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    id {serial}, command TEXT NOT NULL, reason TEXT NOT NULL, issued_at DOUBLE PRECISION NOT NULL,
    session_id TEXT, applied_at DOUBLE PRECISION, applied_bar BIGINT, result TEXT);
CREATE TABLE IF NOT EXISTS control_state (
    id INTEGER PRIMARY KEY, state TEXT NOT NULL, reason TEXT NOT NULL, session_id TEXT,
    updated_at DOUBLE PRECISION NOT NULL)
"""


def ensure_schema(records: Records) -> None:
    serial = "BIGSERIAL PRIMARY KEY" if records.postgres else "INTEGER PRIMARY KEY AUTOINCREMENT"
    for stmt in _SCHEMA.format(serial=serial).split(";"):
        if stmt.strip():
            records._exec(stmt)


def issue(records: Records, command: str, reason: str = "") -> dict[str, Any]:
    """Queue ``command`` for the trader (applied between bars); the row as written."""
    if command not in COMMANDS:
        raise ConfigError(f"trade control: unknown command {command!r}; expected one of {', '.join(COMMANDS)}")
    ensure_schema(records)
    now = time.time()
    with records.transaction():
        records._exec("INSERT INTO commands (command, reason, issued_at) VALUES (?, ?, ?)",
                      (command, reason or command, now))
        row = records._query("SELECT * FROM commands WHERE issued_at = ? AND command = ? ORDER BY id DESC LIMIT 1",
                             (now, command))[0]
    return row


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


def current_state(records: Records) -> dict[str, Any]:
    """The persisted state (ACTIVE when no trader has written one yet)."""
    ensure_schema(records)
    rows = records._query("SELECT state, reason, session_id, updated_at FROM control_state WHERE id = 1")
    return rows[0] if rows else {"state": "ACTIVE", "reason": "initial", "session_id": None, "updated_at": None}


def pending(records: Records) -> list[dict[str, Any]]:
    ensure_schema(records)
    return records._query("SELECT * FROM commands WHERE applied_at IS NULL ORDER BY id")


def recent(records: Records, limit: int = 20) -> list[dict[str, Any]]:
    ensure_schema(records)
    return records._query("SELECT * FROM commands ORDER BY id DESC LIMIT ?", (limit,))


def _set_state(records: Records, state: State, reason: str, session_id: str | None) -> None:
    sql = ("INSERT INTO control_state (id, state, reason, session_id, updated_at) VALUES (1, ?, ?, ?, ?)"
           " ON CONFLICT (id) DO UPDATE SET state = excluded.state, reason = excluded.reason,"
           " session_id = excluded.session_id, updated_at = excluded.updated_at")
    records._exec(sql, (state, reason, session_id, time.time()))


class Controller:
    """The trader side: applies pending commands between bars and enforces the state as a pre-send hook.

    ``trader`` is a :class:`rltrader.live.trader.Trader`; ``reload`` is the runner's model re-resolution (None:
    a reload is recorded as not available). The state a previous run left is picked up at construction."""

    def __init__(self, trader: Any, *, reload: Callable[[], str] | None = None) -> None:
        self.trader, self.records, self._reload = trader, trader.records, reload
        ensure_schema(self.records)
        st = current_state(self.records)
        self.state: State = st["state"] if st["state"] in STATES else "ACTIVE"
        self.reason = str(st["reason"])
        # commands issued before this trader started are stale: mark them, do not act on them
        for c in pending(self.records):
            self._done(c, None, "ignored: issued before this session started")
        _set_state(self.records, self.state, self.reason, trader.session_id)
        trader.gateway.hooks.append(self.pre_send)
        self.last_bar: dict[str, Any] = {}

    # -- the gateway hook -----------------------------------------------------------------------------
    def pre_send(self, req: Any) -> str | None:
        """None lets the order through; the state's name blocks it (recorded as the order's status detail)."""
        if self.state == "HALTED":
            return f"HALTED: {self.reason}"
        if self.state == "REDUCING":
            from rltrader.execution import QTY

            held = float(self.trader.books[req.symbol].acct[QTY, 0])  # filled position: the one to reduce
            if abs(held + req.qty) >= abs(held) - 1e-12 or held * (held + req.qty) < 0:
                return f"REDUCING: {self.reason} (no new entries)"
        return None

    # -- between bars ---------------------------------------------------------------------------------
    def on_bar(self, symbol: str, bar: Any) -> int:
        """Called once per handled bar: remembers it (flatten closes at the last bar) and applies commands."""
        self.last_bar[symbol] = bar
        return self.apply_pending(bar.time)

    def apply_pending(self, bar_time: int | None = None) -> int:
        n = 0
        for c in pending(self.records):
            self._done(c, bar_time, self._apply(str(c["command"]), str(c["reason"])))
            n += 1
        return n

    def _apply(self, command: str, reason: str) -> str:
        from rltrader.live.trader import _event

        result = "ok"
        if command == "flatten":
            done = []
            for sym, bar in self.last_bar.items():
                if sym not in self.trader.finished:
                    self.trader._flatten(sym, bar, f"flatten: {reason}")
                    done.append(sym)
            result = f"flattened {','.join(done) or 'nothing'}"
        elif command == "reload":
            result = self._reload() if self._reload is not None else "reload not available for this trader"
        elif command == "reconcile":
            result = self.reconcile()
        if command in _TARGET:
            self.state, self.reason = _TARGET[command], reason
            _set_state(self.records, self.state, reason, self.trader.session_id)
            result += f"; state {self.state}"
        _event("control", command=command, reason=reason, state=self.state, result=result)
        return result

    def reconcile(self) -> str:
        """Positions held by the trader against the sum of its recorded fills, per symbol."""
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

    def _done(self, c: dict[str, Any], bar_time: int | None, result: str) -> None:
        self.records._exec("UPDATE commands SET applied_at = ?, applied_bar = ?, result = ?, session_id = ?"
                           " WHERE id = ?", (time.time(), bar_time, result, self.trader.session_id, c["id"]))
