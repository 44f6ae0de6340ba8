"""The env's continuous mode: an account trades gap-free stretches back to back instead of fixed sessions.

This is what the backtest runs (and what a live trader runs one bar at a time): the env's own step
(``core._step_one``), so fills, fees, slippage, funding, latency, liquidation and the exchange filters are the
execution kernel's by construction, plus what a continuous account needs around it:

- a *stretch* is one session of a variable-length ``SessionSet``: ``[stretch_start + context, stretch_end)`` of
  gap-free bars. On its last bar any position is force-closed at the close (``env.force_close``), so a position
  never crosses a data gap;
- ``chain_next[s]``: the stretch the account plays after ``s`` (-1: none). The account then starts it with the
  equity it ended ``s`` with (``eq0[next]``); the execution totals of the finished stretch (fees, funding,
  slippage, fills, liquidations) are carried in ``carry`` since the account's fields restart from zero;
- ``repeat``: a spot/Lowrider cycle that ends (its sell filled) before the stretch does starts a new cycle in
  place (the buy counter is cleared; the fees paid so far move to ``carry`` because Lowrider's take-profit
  measures the cycle's own fees). Without it (or when bankrupt) the account sits out the rest of the stretch;
- one row per bar of the equity curve (``curve_eq`` / ``curve_qty`` / ``curve_fees``, at ``base[s] + t - start``);
- every booking recorded in the ``EventLog`` (stamped with the bar's time, row and the stretch id), with the
  exit reason the caller gives a protective order (``REASON_SL`` / ``REASON_TP``) on the fill that closes.

``continuous_step`` is the one-bar entry point over explicit state arrays (inline it into a numba loop, or call
``continuous_step_batch`` from Python for a bar of several accounts).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from rltrader.env.core import (
    EQUITY_FLOOR,
    O_TERMINATED,
    P_END,
    P_SESSION,
    P_START,
    P_T,
    EnvArrays,
    EnvCore,
    _observe,
    _reset_one,
    _step_one,
)
from rltrader.env.modes import E_N_BUYS, E_PEAK, E_PREV_EQUITY, EP_MODE, MODE_FUTURES
from rltrader.execution import (
    CASH,
    CUR_EXIT_REASON,
    EQUITY,
    FEES,
    FUNDING,
    MAX_EVENTS_PER_BAR,
    N_FILLS,
    N_LIQUIDATIONS,
    QTY,
    REASON_SIGNAL,
    SLIPPAGE,
    XP_CASH,
    EventLog,
)

# --- per-account continuous state: rows of a (N_C, B) float64 array ------------------------------------------
C_FEES, C_FUNDING, C_SLIPPAGE, C_FILLS, C_LIQUIDATIONS, C_EXIT_REASON, C_DONE = range(7)
N_C = 7
"""``C_FEES`` … ``C_LIQUIDATIONS``: totals of the account's finished stretches (and, for fees, cycles);
``C_EXIT_REASON``: the protective exit in flight (labels the fill that closes); ``C_DONE``: nothing left to play."""
STEP_FILLED, STEP_NEXT_STRETCH = 1, 2
"""Bits of ``continuous_step``'s result: the bar had a fill (order, liquidation or forced close); the account
moved on to its next stretch (its next decision is that stretch's first bar)."""


class Continuous(NamedTuple):
    """The continuous run's own arrays (module docstring); ``repeat`` restarts spot/Lowrider cycles."""

    chain_next: np.ndarray
    base: np.ndarray
    eq0: np.ndarray
    carry: np.ndarray
    curve_eq: np.ndarray
    curve_qty: np.ndarray
    curve_fees: np.ndarray
    repeat: bool


@njit(cache=True, inline="always")
def continuous_step(b: int, a: int, reason: int, k: EnvArrays, run: Continuous, log: EventLog,
                    observe: bool = True) -> int:
    """One decision + bar for account ``b`` in continuous mode: the env's step with action ``a`` (``reason``:
    ``REASON_SL`` / ``REASON_TP`` when ``a`` is a protective exit, else ``REASON_SIGNAL``), the bar's curve row,
    a cycle restart, or at the stretch's end the move to ``chain_next`` with the equity carried. The caller keeps
    ``MAX_EVENTS_PER_BAR`` free slots in ``log``. Returns ``STEP_*`` bits. ``observe=False``: the account's next
    observation is left unwritten (``_step_one``'s): the caller rebuilds it with ``core._observe`` before reading
    it."""
    acct, ptr, carry = k.acct, k.ptr, run.carry
    t, end, start, sid = ptr[P_T, b], ptr[P_END, b], ptr[P_START, b], ptr[P_SESSION, b]
    if reason != REASON_SIGNAL:
        carry[C_EXIT_REASON, b] = reason
    log.cursor[CUR_EXIT_REASON] = int(carry[C_EXIT_REASON, b])
    nf0 = acct[N_FILLS, b]
    _step_one(b, a, k, False, log, observe)
    carry[C_EXIT_REASON, b] = log.cursor[CUR_EXIT_REASON]
    flags = STEP_FILLED if acct[N_FILLS, b] != nf0 else 0
    pos = run.base[sid] + t - start
    run.curve_eq[pos], run.curve_qty[pos] = acct[EQUITY, b], acct[QTY, b]
    run.curve_fees[pos] = acct[FEES, b] + carry[C_FEES, b]
    done = t + 1 >= end
    if not done and k.out_b[O_TERMINATED, b]:
        if run.repeat and int(k.ep[EP_MODE]) != MODE_FUTURES and acct[EQUITY, b] > EQUITY_FLOOR * k.xp[XP_CASH]:
            k.env[E_N_BUYS, b] = 0.0  # a new cycle in the same account
            carry[C_FEES, b] += acct[FEES, b]
            acct[FEES, b] = 0.0
            if observe:
                _observe(b, k)
        else:  # bankrupt, or the one cycle is over: the account stays as it is to the stretch's end
            done = True
            for tt in range(t + 1, end):
                p = run.base[sid] + tt - start
                run.curve_eq[p], run.curve_qty[p], run.curve_fees[p] = (run.curve_eq[pos], run.curve_qty[pos],
                                                                        run.curve_fees[pos])
    if done:
        nxt = run.chain_next[sid]
        if nxt < 0:
            carry[C_DONE, b] = 1.0
            return flags
        eq = acct[EQUITY, b]  # the next stretch of this account continues with this equity
        carry[C_FEES, b] += acct[FEES, b]
        carry[C_FUNDING, b] += acct[FUNDING, b]
        carry[C_SLIPPAGE, b] += acct[SLIPPAGE, b]
        carry[C_FILLS, b] += acct[N_FILLS, b]
        carry[C_LIQUIDATIONS, b] += acct[N_LIQUIDATIONS, b]
        _reset_one(b, nxt, k)
        acct[CASH, b], acct[EQUITY, b] = eq, eq
        k.env[E_PREV_EQUITY, b], k.env[E_PEAK, b] = eq, eq
        run.eq0[nxt] = eq
        if observe:
            _observe(b, k)
        flags |= STEP_NEXT_STRETCH
    return flags


@njit(cache=True)
def continuous_step_batch(idx: np.ndarray, actions: np.ndarray, reasons: np.ndarray, k: EnvArrays,
                          run: Continuous, log: EventLog, flags: np.ndarray) -> None:
    """``continuous_step`` for the accounts ``idx`` (one bar each); ``flags[j]``: account ``idx[j]``'s bits."""
    for j in range(idx.shape[0]):
        flags[j] = continuous_step(idx[j], actions[j], reasons[j], k, run, log)


class ContinuousRun:
    """Sets up an ``EnvCore``'s accounts in continuous mode: one account per chain of stretches.

    ``chain``: one account per symbol plays that symbol's stretches in time order (they must not overlap in
    time), each from the previous one's final equity. Otherwise every stretch is its own account from
    ``initial_cash`` (a session's semantics). ``events``: initial event capacity (0: record nothing)."""

    def __init__(self, core: EnvCore, *, chain: bool, repeat: bool, events: int) -> None:
        data = core.data
        S = data.n_sessions
        sym = data.symbol_id[data.start].astype(np.int64)
        chain_next = np.full(S, -1, np.int64)
        if chain:
            order = np.lexsort((data.time[data.start], sym))
            same = sym[order[1:]] == sym[order[:-1]]
            chain_next[order[:-1][same]] = order[1:][same]
            self.first = order[np.concatenate([[True], ~same])]
            self.sequence = order  # the stretches in the order the accounts play them
        else:
            self.first = self.sequence = np.arange(S)
        if len(self.first) != core.n:
            raise ValueError(f"continuous run: {len(self.first)} accounts needed, the core has {core.n}")
        self.core, self.chain = core, chain
        self.lengths = (data.end - data.start).astype(np.int64)
        M = int(self.lengths.sum())
        self.run = Continuous(
            chain_next=chain_next, base=np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64),
            eq0=np.full(S, core.execution.initial_cash), carry=np.zeros((N_C, core.n)), curve_eq=np.full(M, np.nan),
            curve_qty=np.zeros(M), curve_fees=np.zeros(M), repeat=bool(repeat))
        self.log = EventLog.empty(events)
        self.accounts = np.arange(core.n)
        core.reset(self.accounts, self.first)

    @property
    def done(self) -> np.ndarray:
        return np.asarray(self.run.carry[C_DONE] > 0.0)

    def reserve(self, n_accounts: int) -> None:
        """Room in the event log for one bar of ``n_accounts`` accounts (growing it if needed)."""
        self.log = self.log.grown(MAX_EVENTS_PER_BAR * n_accounts)

    def step(self, idx: np.ndarray, actions: np.ndarray, reasons: np.ndarray | None = None,
             arrays: EnvArrays | None = None) -> np.ndarray:
        """One bar for the accounts ``idx``; returns their ``STEP_*`` bits."""
        idx = np.asarray(idx, np.int64)
        self.reserve(len(idx))
        flags = np.zeros(len(idx), np.int64)
        if reasons is None:
            reasons = np.zeros(len(idx), np.int64)
        continuous_step_batch(idx, np.asarray(actions, np.int64), np.asarray(reasons, np.int64),
                              arrays or self.core.arrays, self.run, self.log, flags)
        return flags
