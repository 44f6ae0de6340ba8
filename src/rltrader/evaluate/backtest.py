"""The backtest engine: any policy (trained agent or rule baseline) run continuously over a split, through the
envs' own step kernel, so fills, fees, slippage, latency, exchange filters and PnL are the env's by construction.

Why it is built on the env and not beside it
--------------------------------------------
A backtest that re-implements fills drifts from what the agent was trained on. Here the continuous run *is* an env
run: per symbol, every gap-free stretch of valid bars of the split's date range becomes one variable-length
"session" ``[stretch_start + context, stretch_end)`` (``continuous_split``), standardised with the train split's
statistics and clipped exactly like the sessions stage. Each stretch is one account of an ``EnvCore`` stepped
with ``env.core._step_one`` (autoreset off). A position is therefore only force-closed where the data has a gap
or the range ends; the next stretch starts a fresh account with ``initial_cash`` (an env session's semantics),
and the per-symbol equity curve banks each stretch's PnL: ``equity = initial_cash + PnL of earlier stretches +
the running stretch's equity - initial_cash`` (fixed-size trading, as seed 002's quote-sized trades; profits are
not re-invested across a gap).

Only two things are done outside ``_step_one``, both with the execution model's own functions:

- the forced close after a stretch's last bar is applied right after the step (``close_position`` then
  ``mark_to_market``, what ``_step_one`` does itself, in the same order) so that the trade list can tell the last
  bar's order fill from the forced close. Equity is bit-identical to the env's (the parity test checks it);
- spot_cycle / lowrider episodes end when a cycle's sell fills; with ``repeat_cycles`` the account starts a new
  cycle in place (the env's buy counter is cleared; fees paid so far move to a side total because Lowrider's
  take-profit measures the cycle's own fees). Equity carries on.

Filters (``params.yaml: backtest``, seed 002) sit between the policy and the step; a filtered decision becomes
hold. ``stop_loss`` / ``take_profit`` (fractions of the average entry, on the last close at decision time) send
the mode's close action and bypass the other filters (a protective exit must not be blocked by a cooldown);
``cooldown_bars`` blocks orders for that many decisions after a bar with a fill; ``max_trades_per_day`` caps the
orders let through per UTC day (per account); ``confidence`` needs the chosen action's softmax probability
(``logits`` models) or ``Q(chosen) - Q(hold)`` (``q_values``, and ``classifier`` whose scores are already
thresholded) to reach it — hold is what a filtered decision becomes, so the gap to hold is the value given up.
Rule baselines have no scores; the confidence filter does not apply to them.

``trade_size_quote`` (seed 002 sizes trades in quote currency): the env sizes a long/short as a fraction of the
leverage cap (futures) or of the cash (spot), so the quote size maps to ``position_size = min(1, size /
(leverage × initial_cash))`` (futures) or ``min(1, size / initial_cash)`` (spot): the first trade of a stretch
has that notional, later ones scale with the stretch's equity. Lowrider's lots are in quote already: ``base_lot =
size``.

Batched inference
-----------------
Decisions that do not depend on fills are precomputed for every bar, vectorised, and applied by ONE numba loop
over the accounts and time (``_run_rows``): ``flat`` always, and without latency ``buy_and_hold`` and
``sma_cross`` (futures, spot) — their env baselines only consult the position to avoid re-sending an order the
env would reject anyway (``order_for`` returns 0 for a long while long), so "long when the fast SMA is above the
slow one, else short" gives the same fills. With latency an order can be in flight, the baseline then looks at
the filled position and the target form would not (it could cancel a pending flip), so those run bar by bar.

Our networks (``PolicyModule.split``: D3QN, PPO, the CNN classifier) are split where the position state enters:
the window part (encoder and the embedding's share of the first layer; the classifier's whole P(up)) does not
depend on fills, so it is computed for every decision position in blocks of ``SPLIT_BLOCK`` rows, one batched
forward pass each (a CNN encoder's convolutions are shared by the overlapping windows of consecutive bars,
``packaging.encode_windows``); then ONE numba loop (``_run_split``) runs the accounts through the block with the
state-dependent rest (``packaging.head_scores``: the state term, the second layer, the head; then the masked
argmax and the confidence filter) — the same decisions as the module's forward pass, up to float32 rounding order
(``tests/test_backtest.py`` checks fills, equity and trades against the generic path). Decision positions are
numbered in the order each account plays them (``q``), so an account only ever moves forward through the blocks.
Everything else (other networks, ``fast=False``, random, Lowrider rule) is stepped bar by bar with all accounts
together: one forward pass per bar over every account still running (one per symbol in the continuous run).

Outputs (``BacktestResult``; the column contract of ``rltrader.evaluate.metrics``)
--------------------------------------------------------------------------------
- ``equity``: one row per bar and symbol plus the combined ``"ALL"`` rows: ``time`` (bar *close* time, µs UTC),
  ``symbol``, ``equity`` (quote, marked at the close, net of all costs), ``position`` (signed qty after the bar;
  for ``"ALL"``: gross notional Σ|qty × close|), ``price`` (close; null for ``"ALL"``), ``fees`` (cumulative),
  ``stretch`` (account id; -1 for ``"ALL"``). ``"ALL"`` = the sum of the symbols' banked curves, each
  forward-filled (a symbol between stretches is flat, in cash), starting from ``initial_cash`` × symbols.
- ``trades``: round trips: ``symbol``, ``stretch``, ``entry_time``/``exit_time`` (fill bars' open times),
  ``side`` (+1/-1), ``qty`` (total entered), ``entry_price``/``exit_price`` (volume-weighted fill prices),
  ``notional`` (qty × entry), ``pnl`` (realized − fees − funding), ``fees``, ``funding``, ``bars`` held,
  ``exit_reason`` (signal, stop_loss, take_profit, liquidation, end_of_data; open at the end: null exit).
- ``fills``: every fill: ``symbol``, ``stretch``, ``time``, ``qty`` (signed), ``price``, ``fee``, ``kind``
  (order, liquidation, forced_close), ``realized``.
- ``daily``: per UTC day of the bar close time, ``symbol`` (and ``"ALL"``), last ``equity`` and ``return``
  (over the previous day's, the first over the initial capital).
- ``stretches``: one row per account: symbol, first/last traded bar, bars, final equity, return, fills,
  liquidations, fees, blocked decisions.
- ``totals``: initial/final capital, return, fills, trades, fees, funding, slippage, liquidations, bars.
"""

from __future__ import annotations

import math
import time as _time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from numba import njit

from rltrader.agents.baselines import (
    BUY,
    LONG,
    SELL,
    SHORT,
    BuyAndHold,
    Flat,
    LowriderRule,
    RandomPolicy,
    SMACross,
)
from rltrader.agents.packaging import head_scores, head_scratch
from rltrader.dataset.build import parse_day, standardize  # the sessions stage's date rule and scaling
from rltrader.dataset.split import SessionSet, read_metadata
from rltrader.env.core import (
    O_FILLED,
    O_TERMINATED,
    P_END,
    P_SESSION,
    P_START,
    P_T,
    EnvCore,
    _observe,
    _reset_one,
    _step_one,
)
from rltrader.env.modes import (
    E_N_BUYS,
    E_PEAK,
    E_PREV_EQUITY,
    EP_FORCE_CLOSE,
    EP_MODE,
    MODE_FUTURES,
    EnvParams,
    lowrider_rule,
)
from rltrader.errors import ConfigError, DataError
from rltrader.execution import (
    AVG_ENTRY,
    CASH,
    EQUITY,
    FEES,
    FUNDING,
    INSURANCE,
    N_FILLS,
    N_LIQUIDATIONS,
    QTY,
    REALIZED,
    SLIPPAGE,
    XP_CASH,
    XP_TAKER,
    ExecutionParams,
    close_position,
    fill_price,
    mark_to_market,
)
from rltrader.integrity import read_parquet

POLICY_NAMES = ("flat", "buy_and_hold", "random", "sma_cross", "lowrider_rule")
SPLIT_BLOCK = 1024
"""Decision positions per precomputed block of the split-network path (one batched forward pass)."""
DAY_US = 86_400_000_000
EQUITY_FLOOR = 1e-9

# --- filter parameters (float vector) and per-account filter state (rows of a (N_FS, B) array) -----------------
F_COOLDOWN, F_MAX_DAY, F_SL, F_TP, F_REPEAT, F_CLOSE_ACTION = range(6)
N_F = 6
(FS_LAST_FILL, FS_DAY, FS_COUNT, FS_FEES_CARRY, FS_DONE, FS_REASON, FS_BLOCKED, FS_C_FUNDING, FS_C_SLIP,
 FS_C_FILLS, FS_C_LIQ) = range(11)
N_FS = 11
"""``FS_C_*`` / ``FS_FEES_CARRY``: account totals carried over when an account moves on to its next stretch."""
# --- fill events: rows of a (N_EV, capacity) float64 log ------------------------------------------------------
EV_ROW, EV_ACCT, EV_KIND, EV_QTY, EV_PX, EV_FEE, EV_REALIZED, EV_FUND_CUM, EV_REASON, EV_Q_AFTER = range(10)
N_EV = 10
KIND_ORDER, KIND_LIQUIDATION, KIND_FORCED = 0, 1, 2
KIND_NAMES = ("order", "liquidation", "forced_close")
REASON_SIGNAL, REASON_SL, REASON_TP, REASON_LIQ, REASON_END = 0, 1, 2, 3, 4
REASON_NAMES = ("signal", "stop_loss", "take_profit", "liquidation", "end_of_data")
# --- round trips built from the events: rows of a (N_TR, n) float64 array ------------------------------------
(TR_ACCT, TR_ENTRY_ROW, TR_EXIT_ROW, TR_SIDE, TR_QTY, TR_ENTRY_PX, TR_EXIT_PX, TR_REALIZED, TR_FEES, TR_FUNDING,
 TR_REASON) = range(11)
N_TR = 11


@dataclass(frozen=True)
class BacktestFilters:
    """Signal/execution filters between the policy and the env (``params.yaml: backtest``); 0 = off."""

    confidence: float = 0.0
    cooldown_bars: int = 0
    max_trades_per_day: int = 0
    stop_loss: float = 0.0
    take_profit: float = 0.0
    repeat_cycles: bool = False
    """spot_cycle / lowrider: start a new cycle after one closes. Off here so that ``backtest_sessions`` with
    default filters is exactly the env's episode; ``run_backtest`` takes it from the settings (default on)."""

    def __post_init__(self) -> None:
        for name in ("confidence", "cooldown_bars", "max_trades_per_day", "stop_loss", "take_profit"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ConfigError(f"backtest.{name}: must be a finite number ≥ 0 (got {v!r})")
        if self.stop_loss >= 1:
            raise ConfigError(f"backtest.stop_loss: must be a fraction below 1 (got {self.stop_loss!r})")

    @classmethod
    def from_settings(cls, s: Any) -> BacktestFilters:
        return cls(confidence=s.confidence, cooldown_bars=s.cooldown_bars, max_trades_per_day=s.max_trades_per_day,
                   stop_loss=s.stop_loss, take_profit=s.take_profit, repeat_cycles=s.repeat_cycles)

    def to_array(self, mode: str) -> np.ndarray:
        close_action = {"futures_session": 3, "spot_cycle": 2}.get(mode, -1)
        if close_action < 0 and (self.stop_loss > 0 or self.take_profit > 0):
            raise ConfigError("backtest.stop_loss / backtest.take_profit: lowrider has no close action (it sells "
                              "automatically at env.profit_target); set them to 0 in lowrider mode")
        f = np.zeros(N_F)
        f[F_COOLDOWN], f[F_MAX_DAY] = self.cooldown_bars, self.max_trades_per_day
        f[F_SL], f[F_TP], f[F_REPEAT], f[F_CLOSE_ACTION] = (self.stop_loss, self.take_profit,
                                                            float(self.repeat_cycles), close_action)
        return f


@dataclass
class BacktestResult:
    """Everything one backtest produced (column contract in the module docstring)."""

    equity: pl.DataFrame
    trades: pl.DataFrame
    fills: pl.DataFrame
    daily: pl.DataFrame
    stretches: pl.DataFrame
    totals: dict[str, float]
    initial_cash: float
    """Starting capital of the combined ``"ALL"`` curve (``initial_cash`` × symbols): pass it to the metrics."""
    meta: dict[str, Any] = field(default_factory=dict)

    def combined(self) -> pl.DataFrame:
        return self.equity.filter(pl.col("symbol") == "ALL")

    def for_symbol(self, symbol: str) -> pl.DataFrame:
        return self.equity.filter(pl.col("symbol") == symbol)


# ================================================================================================ numba kernels


@njit(cache=True, inline="always")
def _log(ev: np.ndarray, n_ev: np.ndarray, row: int, b: int, kind: int, dq: float, px: float, fee: float,
         realized: float, fund_cum: float, reason: int, q_after: float) -> None:
    i = n_ev[0]
    ev[EV_ROW, i], ev[EV_ACCT, i], ev[EV_KIND, i], ev[EV_QTY, i], ev[EV_PX, i] = row, b, kind, dq, px
    ev[EV_FEE, i], ev[EV_REALIZED, i], ev[EV_FUND_CUM, i], ev[EV_REASON, i] = fee, realized, fund_cum, reason
    ev[EV_Q_AFTER, i] = q_after
    n_ev[0] = i + 1


@njit(cache=True, inline="always")
def _advance(b: int, a: int, confident: bool, acct: np.ndarray, env: np.ndarray, ptr: np.ndarray,
             pending: np.ndarray, sess: np.ndarray, bars: np.ndarray, time: np.ndarray, features: np.ndarray,
             xp: np.ndarray, ep: np.ndarray, ep_last: np.ndarray, next_session: np.ndarray, window: np.ndarray,
             state: np.ndarray, mask: np.ndarray, out_f: np.ndarray, out_b: np.ndarray, flt: np.ndarray,
             fs: np.ndarray, base: np.ndarray, chain_next: np.ndarray, eq0: np.ndarray, out_eq: np.ndarray,
             out_qty: np.ndarray, out_fees: np.ndarray, ev: np.ndarray, n_ev: np.ndarray) -> None:
    """One decision + bar for account ``b``: filters, the env's ``_step_one``, fill events, equity row; at the
    end of its session the account moves on to ``chain_next[session]`` with its equity (or is done)."""
    t, end, start, sid = ptr[P_T, b], ptr[P_END, b], ptr[P_START, b], ptr[P_SESSION, b]
    cl = bars[3]
    n_actions = mask.shape[1]
    # 1. filters (a filtered decision becomes hold; protective exits bypass the others)
    if a < 0 or a >= n_actions:
        a = 0
    q = acct[QTY, b]
    close_a = int(flt[F_CLOSE_ACTION])
    reason = REASON_SIGNAL
    if q != 0.0 and close_a > 0 and (flt[F_SL] > 0.0 or flt[F_TP] > 0.0) and acct[AVG_ENTRY, b] > 0.0:
        move = (cl[t - 1] / acct[AVG_ENTRY, b] - 1.0) * (1.0 if q > 0.0 else -1.0)
        if flt[F_SL] > 0.0 and move <= -flt[F_SL]:
            reason = REASON_SL
        elif flt[F_TP] > 0.0 and move >= flt[F_TP]:
            reason = REASON_TP
    if flt[F_MAX_DAY] > 0.0:
        day = time[t] // DAY_US
        if day != fs[FS_DAY, b]:
            fs[FS_DAY, b] = day
            fs[FS_COUNT, b] = 0.0
    if reason != REASON_SIGNAL and mask[b, close_a]:
        a = close_a
    else:
        reason = REASON_SIGNAL
        if a != 0 and mask[b, a]:  # only a decision that would send an order is filtered (and counted)
            blocked = not confident
            if flt[F_COOLDOWN] > 0.0 and t - fs[FS_LAST_FILL, b] <= flt[F_COOLDOWN]:
                blocked = True
            if flt[F_MAX_DAY] > 0.0 and fs[FS_COUNT, b] >= flt[F_MAX_DAY]:
                blocked = True
            if blocked:
                a = 0
                fs[FS_BLOCKED, b] += 1.0
    if a != 0 and mask[b, a]:  # an order is sent
        fs[FS_COUNT, b] += 1.0
        if reason != REASON_SIGNAL:
            fs[FS_REASON, b] = reason
    # 2. the env's step (forced close of the last bar done below, so its fill can be told apart)
    q0, avg0 = acct[QTY, b], acct[AVG_ENTRY, b]
    r0, f0, c0, i0, fu0 = acct[REALIZED, b], acct[FEES, b], acct[CASH, b], acct[INSURANCE, b], acct[FUNDING, b]
    nf0, nl0 = acct[N_FILLS, b], acct[N_LIQUIDATIONS, b]
    last = t == end - 1
    _step_one(b, a, acct, env, ptr, pending, sess, bars, time, features, xp, ep_last if last else ep,
              next_session, False, window, state, mask, out_f, out_b)
    # 3. fill events of the step: the order at the open, then a liquidation over the bar
    nf = acct[N_FILLS, b] - nf0
    nl = acct[N_LIQUIDATIONS, b] - nl0
    taker = xp[XP_TAKER]
    if nf > 0.0:
        fs[FS_LAST_FILL, b] = t
        dq_o = out_f[O_FILLED, b]
        px_o, fee_o, real_o = 0.0, 0.0, 0.0
        if dq_o != 0.0:
            px_o = fill_price(bars[0, t], 1.0 if dq_o > 0.0 else -1.0, abs(dq_o), bars[4, t], xp)
            if nl == 0.0:
                fee_o, real_o = acct[FEES, b] - f0, acct[REALIZED, b] - r0
            else:  # split the step's totals between the order and the liquidation
                fee_o = abs(dq_o) * px_o * taker
                if q0 != 0.0 and (dq_o > 0.0) != (q0 > 0.0):
                    real_o = min(abs(dq_o), abs(q0)) * (px_o - avg0) * (1.0 if q0 > 0.0 else -1.0)
            q_mid = q0 + dq_o if nl > 0.0 else acct[QTY, b]
            closes = q_mid == 0.0 or (q0 != 0.0 and (q_mid > 0.0) != (q0 > 0.0))
            why = int(fs[FS_REASON, b]) if closes else REASON_SIGNAL
            if closes:
                fs[FS_REASON, b] = 0.0
            _log(ev, n_ev, t, sid, KIND_ORDER, dq_o, px_o, fee_o, real_o, acct[FUNDING, b], why, q_mid)
        if nl > 0.0:
            dq_l = -(q0 + dq_o)
            d_cash = (acct[CASH, b] - c0) - (acct[INSURANCE, b] - i0) + (acct[FUNDING, b] - fu0)
            denom = dq_l * (1.0 + (1.0 if dq_l > 0.0 else -1.0) * taker)
            px_l = -(d_cash + dq_o * px_o + fee_o) / denom if denom != 0.0 else 0.0
            _log(ev, n_ev, t, sid, KIND_LIQUIDATION, dq_l, px_l, acct[FEES, b] - f0 - fee_o,
                 acct[REALIZED, b] - r0 - real_o, acct[FUNDING, b], REASON_LIQ, 0.0)
    if last and ep[EP_FORCE_CLOSE] > 0.0 and acct[QTY, b] != 0.0:
        q = acct[QTY, b]
        f1, r1 = acct[FEES, b], acct[REALIZED, b]
        px_f = fill_price(cl[t], -1.0 if q > 0.0 else 1.0, abs(q), bars[4, t], xp)
        close_position(acct, b, cl[t], bars[4, t], xp)
        mark_to_market(acct, b, cl[t])
        fs[FS_LAST_FILL, b] = t
        _log(ev, n_ev, t, sid, KIND_FORCED, -q, px_f, acct[FEES, b] - f1, acct[REALIZED, b] - r1, acct[FUNDING, b],
             REASON_END, 0.0)
    # 4. the bar's row of the equity curve; episode end
    pos = base[sid] + t - start
    out_eq[pos], out_qty[pos] = acct[EQUITY, b], acct[QTY, b]
    out_fees[pos] = acct[FEES, b] + fs[FS_FEES_CARRY, b]
    done = t + 1 >= end
    if not done and out_b[O_TERMINATED, b]:
        floor = EQUITY_FLOOR * xp[XP_CASH]
        if flt[F_REPEAT] > 0.0 and int(ep[EP_MODE]) != MODE_FUTURES and acct[EQUITY, b] > floor:
            env[E_N_BUYS, b] = 0.0  # a new cycle in the same account
            fs[FS_FEES_CARRY, b] += acct[FEES, b]
            acct[FEES, b] = 0.0
            _observe(b, acct, env, ptr, pending, cl, features, xp, ep, window, state, mask)
        else:  # bankrupt, or the one cycle is over: the account stays as it is to the stretch's end
            done = True
            for tt in range(t + 1, end):
                p = base[sid] + tt - start
                out_eq[p], out_qty[p], out_fees[p] = out_eq[pos], out_qty[pos], out_fees[pos]
    if done:
        nxt = chain_next[sid]
        if nxt < 0:
            fs[FS_DONE, b] = 1.0
            return
        carry = acct[EQUITY, b]  # the next stretch of this symbol continues with this equity
        fs[FS_FEES_CARRY, b] += acct[FEES, b]
        fs[FS_C_FUNDING, b] += acct[FUNDING, b]
        fs[FS_C_SLIP, b] += acct[SLIPPAGE, b]
        fs[FS_C_FILLS, b] += acct[N_FILLS, b]
        fs[FS_C_LIQ, b] += acct[N_LIQUIDATIONS, b]
        _reset_one(b, nxt, acct, env, ptr, pending, sess, xp)
        acct[CASH, b], acct[EQUITY, b] = carry, carry
        env[E_PREV_EQUITY, b], env[E_PEAK, b] = carry, carry
        eq0[nxt] = carry
        fs[FS_LAST_FILL, b] = -1e18
        _observe(b, acct, env, ptr, pending, cl, features, xp, ep, window, state, mask)


@njit(cache=True)
def _run_rows(decisions: np.ndarray, order: np.ndarray, j0: int, acct: np.ndarray, env: np.ndarray,
              ptr: np.ndarray, pending: np.ndarray, sess: np.ndarray, bars: np.ndarray, time: np.ndarray,
              features: np.ndarray, xp: np.ndarray, ep: np.ndarray, ep_last: np.ndarray, next_session: np.ndarray,
              window: np.ndarray, state: np.ndarray, mask: np.ndarray, out_f: np.ndarray, out_b: np.ndarray,
              flt: np.ndarray, fs: np.ndarray, base: np.ndarray, chain_next: np.ndarray, eq0: np.ndarray,
              out_eq: np.ndarray, out_qty: np.ndarray, out_fees: np.ndarray, ev: np.ndarray, n_ev: np.ndarray) -> int:
    """Precomputed decisions (``decisions[row]`` = action for the decision at bar ``row``): every account of
    ``order[j0:]`` run to its end, one after the other (accounts are independent). Returns the index it stopped
    at — ``len(order)`` when done, earlier when the event log is nearly full (the caller grows it and resumes)."""
    for j in range(j0, order.shape[0]):
        b = order[j]
        while fs[FS_DONE, b] == 0.0:
            if n_ev[0] + 3 > ev.shape[1]:
                return j
            _advance(b, int(decisions[ptr[P_T, b]]), True, acct, env, ptr, pending, sess, bars, time, features, xp, ep,
                     ep_last, next_session, window, state, mask, out_f, out_b, flt, fs, base, chain_next, eq0,
                     out_eq, out_qty, out_fees, ev, n_ev)
    n: int = order.shape[0]
    return n


@njit(cache=True)
def _step_batch(idx: np.ndarray, actions: np.ndarray, confident: np.ndarray, acct: np.ndarray, env: np.ndarray,
                ptr: np.ndarray, pending: np.ndarray, sess: np.ndarray, bars: np.ndarray, time: np.ndarray,
                features: np.ndarray, xp: np.ndarray, ep: np.ndarray, ep_last: np.ndarray,
                next_session: np.ndarray, window: np.ndarray, state: np.ndarray, mask: np.ndarray,
                out_f: np.ndarray, out_b: np.ndarray, flt: np.ndarray, fs: np.ndarray, base: np.ndarray,
                chain_next: np.ndarray, eq0: np.ndarray, out_eq: np.ndarray, out_qty: np.ndarray,
                out_fees: np.ndarray, ev: np.ndarray, n_ev: np.ndarray) -> None:
    """One bar for the accounts ``idx`` with their actions (the caller keeps ≥ 3 free event slots each)."""
    for j in range(idx.shape[0]):
        _advance(idx[j], actions[j], confident[j], acct, env, ptr, pending, sess, bars, time, features, xp, ep,
                 ep_last, next_session, window, state, mask, out_f, out_b, flt, fs, base, chain_next, eq0, out_eq,
                 out_qty, out_fees, ev, n_ev)


@njit(cache=True)
def _run_split(pre: np.ndarray, q_lo: int, q_hi: int, qbase: np.ndarray, code: int, state_weight: np.ndarray,
               hidden_weight_t: np.ndarray, hidden_bias: np.ndarray, out_weight: np.ndarray, out_bias: np.ndarray,
               head_params: np.ndarray, softmax_conf: bool, threshold: float, order: np.ndarray, j0: int,
               acct: np.ndarray, env: np.ndarray, ptr: np.ndarray, pending: np.ndarray, sess: np.ndarray,
               bars: np.ndarray, time: np.ndarray, features: np.ndarray, xp: np.ndarray, ep: np.ndarray,
               ep_last: np.ndarray, next_session: np.ndarray, window: np.ndarray, state: np.ndarray,
               mask: np.ndarray, out_f: np.ndarray, out_b: np.ndarray, flt: np.ndarray, fs: np.ndarray,
               base: np.ndarray, chain_next: np.ndarray, eq0: np.ndarray, out_eq: np.ndarray, out_qty: np.ndarray,
               out_fees: np.ndarray, ev: np.ndarray, n_ev: np.ndarray) -> int:
    """A split network's decisions for the positions ``[q_lo, q_hi)`` (``pre[q - q_lo]``: position ``q``'s
    precomputed row; ``q = qbase[session] + t - start``): every account of ``order[j0:]`` run until its next
    decision lies beyond the block (or it is done), one after the other. Scores, masked argmax and confidence as
    the generic path (``_confident``). Returns ``len(order)`` when the block is done, the index it stopped at
    when the event log is nearly full (the caller grows it and resumes), -1 if an account's position went back."""
    n_actions = mask.shape[1]
    h1, h2, out = head_scratch(hidden_weight_t, out_weight)
    sc = np.zeros(n_actions, np.float32)
    for j in range(j0, order.shape[0]):
        b = order[j]
        while fs[FS_DONE, b] == 0.0:
            q = qbase[ptr[P_SESSION, b]] + ptr[P_T, b] - ptr[P_START, b]
            if q >= q_hi:
                break
            if q < q_lo:
                return -1
            if n_ev[0] + 3 > ev.shape[1]:
                return j
            head_scores(pre[q - q_lo], state[b], code, state_weight, hidden_weight_t, hidden_bias, out_weight,
                        out_bias, head_params, h1, h2, out, sc)
            a, best = 0, -np.inf  # masked argmax, first of equal maxima (numpy's argmax)
            for k in range(n_actions):
                if mask[b, k] and sc[k] > best:
                    a, best = k, sc[k]
            confident = True
            if threshold > 0.0:
                if softmax_conf:  # softmax probability of the chosen action over the valid ones
                    tot = 0.0
                    for k in range(n_actions):
                        if mask[b, k]:
                            tot += math.exp(sc[k] - best)
                    confident = 1.0 / tot >= threshold
                else:  # the value given up by holding instead
                    confident = sc[a] - sc[0] >= threshold
            _advance(b, a, confident, acct, env, ptr, pending, sess, bars, time, features, xp, ep, ep_last,
                     next_session, window, state, mask, out_f, out_b, flt, fs, base, chain_next, eq0, out_eq,
                     out_qty, out_fees, ev, n_ev)
    n: int = order.shape[0]
    return n


@njit(cache=True)
def _round_trips(ev: np.ndarray, n_accounts: int) -> np.ndarray:
    """Round trips from the fill events (sorted by account, then time): a trade opens when the position leaves
    zero and closes when it returns to zero or flips (a flip's fee is split by quantity; its realized PnL belongs
    to the closing trade). PnL parts are the account's own deltas, so Σ trade PnL = the equity change."""
    n = ev.shape[1]
    out = np.full((N_TR, n + 1), np.nan)
    k = -1
    cur = -1.0
    q = 0.0
    entry_notional, exit_qty, exit_notional, fund0 = 0.0, 0.0, 0.0, 0.0
    for i in range(n):
        b = ev[EV_ACCT, i]
        if b != cur:
            cur, q = b, 0.0
        dq, px, fee, real, fund, q_after = (ev[EV_QTY, i], ev[EV_PX, i], ev[EV_FEE, i], ev[EV_REALIZED, i],
                                            ev[EV_FUND_CUM, i], ev[EV_Q_AFTER, i])
        open_part = abs(dq)
        if q != 0.0 and (dq > 0.0) != (q > 0.0):  # reduces / closes / flips the open trade
            closed = min(abs(dq), abs(q))
            share = closed / abs(dq)
            open_part = abs(dq) - closed
            exit_qty += closed
            exit_notional += closed * px
            out[TR_REALIZED, k] += real
            out[TR_FEES, k] += fee * share
            fee = fee * (1.0 - share)
            real = 0.0
            if q_after == 0.0 or (q_after > 0.0) != (q > 0.0):
                out[TR_EXIT_ROW, k] = ev[EV_ROW, i]
                out[TR_EXIT_PX, k] = exit_notional / exit_qty
                out[TR_FUNDING, k] = fund - fund0
                out[TR_REASON, k] = ev[EV_REASON, i]
                open_part = abs(q_after)
        if open_part > 0.0 and q_after != 0.0:
            if q == 0.0 or (q_after > 0.0) != (q > 0.0):  # a new trade
                k += 1
                out[TR_ACCT, k], out[TR_ENTRY_ROW, k] = b, ev[EV_ROW, i]
                out[TR_SIDE, k] = 1.0 if q_after > 0.0 else -1.0
                out[TR_QTY, k], out[TR_REALIZED, k], out[TR_FEES, k] = 0.0, 0.0, 0.0
                entry_notional, exit_qty, exit_notional, fund0 = 0.0, 0.0, 0.0, fund
            out[TR_QTY, k] += open_part
            entry_notional += open_part * px
            out[TR_ENTRY_PX, k] = entry_notional / out[TR_QTY, k]
            out[TR_FEES, k] += fee
            out[TR_REALIZED, k] += real
        q = q_after
    return out[:, :k + 1]


# ========================================================================================== the engine (Python)


class _EnvView:
    """What the rule baselines' ``bind(env)`` reads of a ``BatchSessionEnv``: the core, params, rule actions."""

    def __init__(self, core: EnvCore) -> None:
        self.core, self.params, self.execution = core, core.params, core.execution
        self.n_actions = core.n_actions
        self.num_envs = core.n

    def rule_actions(self) -> np.ndarray:
        c = self.core
        return lowrider_rule(c.last_close, c.accounts.qty, c.accounts.avg_entry, c.n_buys, c.mask, self.params)


def make_policy(name: str, mode: str, seed: int = 0) -> Callable[..., np.ndarray]:
    """A rule baseline by name (``POLICY_NAMES``)."""
    table: dict[str, Callable[[], Callable[..., np.ndarray]]] = {
        "flat": Flat, "buy_and_hold": lambda: BuyAndHold(mode), "random": lambda: RandomPolicy(seed),
        "sma_cross": lambda: SMACross(mode), "lowrider_rule": LowriderRule}
    if name not in table:
        raise ConfigError(f"backtest.policy: unknown policy {name!r} (a baseline: {', '.join(POLICY_NAMES)}; or a "
                          f"model: a .pt file, models:/…, runs:/…)")
    return table[name]()


def load_policy(spec: str, mode: str, seed: int = 0) -> Any:
    """A baseline name, a ``torch.save``d ``PolicyModule`` (``.pt``) or an MLflow model URI → a policy object."""
    if spec in POLICY_NAMES:
        return make_policy(spec, mode, seed)
    if spec.endswith(".pt") or Path(spec).is_file():
        if not Path(spec).is_file():
            raise ConfigError(f"backtest.policy: model file {spec} does not exist")
        from rltrader.agents.packaging import load_policy_file

        return load_policy_file(spec)  # hash-checked; a corrupt file is one error line naming it
    if spec.startswith(("models:/", "runs:/", "file:", "mlflow-artifacts:")):
        from rltrader.agents.packaging import load_mlflow_policy

        return load_mlflow_policy(spec)
    return make_policy(spec, mode, seed)  # raises with the list of names


def rule_decisions(policy: Any, view: _EnvView, latency: int) -> np.ndarray | None:
    """Every bar's decision for a rule whose decisions do not depend on fills (see the module docstring), as an
    int8 vector over the rows; None when the policy must be stepped bar by bar."""
    mode = view.params.mode
    n = view.core.bars.shape[1]
    if isinstance(policy, Flat):
        return np.zeros(n, np.int8)
    if latency > 0 or mode not in ("futures_session", "spot_cycle"):
        return None  # an order may be in flight: the baselines' decisions then depend on the filled position
    if isinstance(policy, BuyAndHold):
        return np.full(n, LONG if mode == "futures_session" else BUY, np.int8)
    if isinstance(policy, SMACross):
        policy.bind(view)  # type: ignore[arg-type]  # duck-typed env: the windows and the same cumulative sums
        cs, f, s = policy.csum, policy.fast, policy.slow
        t = np.arange(s, n)
        up = np.zeros(n, bool)
        up[s:] = (cs[t] - cs[t - f]) / f > (cs[t] - cs[t - s]) / s
        hi, lo = (LONG, SHORT) if mode == "futures_session" else (BUY, SELL)
        return np.where(up, hi, lo).astype(np.int8)
    return None


def _confident(kind: str, scores: np.ndarray, mask: np.ndarray, actions: np.ndarray, threshold: float) -> np.ndarray:
    if threshold <= 0:
        return np.ones(len(actions), bool)
    pick = scores[np.arange(len(actions)), actions]
    if kind == "logits":
        z = np.where(mask, scores, -np.inf)
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        conf = p[np.arange(len(actions)), actions] / p.sum(axis=1)
    else:  # q_values, classifier: the value given up by holding instead
        conf = pick - scores[:, 0]
    return np.asarray(conf >= threshold)


def backtest_sessions(data: SessionSet, policy: Any, execution: ExecutionParams, env_params: EnvParams,
                      filters: BacktestFilters | None = None, *, chain: bool = False, bar_us: int | None = None,
                      seed: int = 0, fast: bool = True) -> BacktestResult:
    """Run ``policy`` over every session of ``data`` through the env's step kernel, with ``filters`` (None =
    off: each session is exactly the env's episode, from ``initial_cash``).

    ``chain``: one account per symbol plays that symbol's sessions in time order, each starting with the
    previous one's final equity (the continuous backtest; sessions must not overlap in time). Otherwise one
    account per session, all at once; the per-symbol curve then banks each session's PnL (fixed-size trading).
    ``policy``: a ``PolicyModule`` (scores → masked argmax), a baseline name, or any ``agents.evaluate`` policy
    callable (``bind(env)`` honoured). ``bar_us``: bar width for the close times (inferred from the data when
    None). ``fast``: run our networks split (``PolicyModule.split``: window part precomputed in blocks, the rest
    in the numba loop); False steps every ``PolicyModule`` with one batched forward pass per bar (the generic
    path, which the split one is tested against)."""
    filters = filters or BacktestFilters()
    if data.n_sessions == 0:
        raise DataError("backtest: the session set has no sessions (nothing to trade)")
    if chain and not env_params.force_close:
        raise ConfigError("env.force_close: a chained (continuous) backtest closes positions at data gaps; "
                          "it needs force_close: true")
    if isinstance(policy, str):
        policy = load_policy(policy, env_params.mode, seed)
    kind = getattr(policy, "kind", None)
    module = policy if kind is not None and hasattr(policy, "scores") else None
    S = data.n_sessions
    sym_of_sess = data.symbol_id[data.start].astype(np.int64)
    chain_next = np.full(S, -1, np.int64)
    if chain:
        order = np.lexsort((data.time[data.start], sym_of_sess))
        same = sym_of_sess[order[1:]] == sym_of_sess[order[:-1]]
        chain_next[order[:-1][same]] = order[1:][same]
        first = order[np.concatenate([[True], ~same])]
        seq = order  # the sessions in the order the accounts play them
    else:
        first = seq = np.arange(S)
    B = len(first)
    core = EnvCore(data, execution, env_params, B)
    if module is not None and (module.context != data.context or module.n_features != core.features.shape[1]
                               or module.n_actions != core.n_actions):
        raise ConfigError(f"backtest.policy: the model expects context {module.context}, {module.n_features} "
                          f"features, {module.n_actions} actions; the data/env give {data.context}, "
                          f"{core.features.shape[1]}, {core.n_actions}")
    view = _EnvView(core)
    accounts = np.arange(B)
    core.reset(accounts, first)
    flt = filters.to_array(env_params.mode)
    fs = np.zeros((N_FS, B))
    fs[FS_LAST_FILL] = -1e18
    fs[FS_DAY] = -1.0
    lengths = (data.end - data.start).astype(np.int64)
    base = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    eq0 = np.full(S, execution.initial_cash)
    M = int(lengths.sum())
    out_eq, out_qty, out_fees = np.full(M, np.nan), np.zeros(M), np.zeros(M)
    ev = np.zeros((N_EV, max(1024, M // 8)))
    n_ev = np.zeros(1, np.int64)
    ep_last = core.ep.copy()
    ep_last[EP_FORCE_CLOSE] = 0.0
    t0 = _time.perf_counter()

    decisions = None if module is not None else rule_decisions(policy, view, execution.latency_bars)
    split = module.split() if module is not None and fast and hasattr(module, "split") else None
    # paths that need no observation windows: a zero-width feature matrix makes the kernel's window copy free
    feats0 = np.zeros((core.features.shape[0], 0), np.float32)
    win0 = np.zeros((B, data.context, 0), np.float32)
    if split is not None:
        # positions numbered in the order each account plays its sessions: an account only moves forward
        qbase = np.zeros(S, np.int64)
        qbase[seq] = np.cumsum(lengths[seq]) - lengths[seq]
        q_rows = np.repeat(data.start[seq] - qbase[seq], lengths[seq]) + np.arange(M)
        for q_lo in range(0, M, SPLIT_BLOCK):
            q_hi = min(M, q_lo + SPLIT_BLOCK)
            pre = split.precompute(core.features, q_rows[q_lo:q_hi])
            j = 0
            while j < B:
                j = _run_split(pre, q_lo, q_hi, qbase, split.code, split.state_weight, split.hidden_weight_t,
                               split.hidden_bias, split.out_weight, split.out_bias, split.head_params,
                               kind == "logits", float(filters.confidence), accounts, j, core.acct, core.env,
                               core.ptr, core.pending, core.sess, core.bars, core.time, feats0, core.xp, core.ep,
                               ep_last, core.next_session, win0, core.state, core.mask, core.out_f, core.out_b, flt,
                               fs, base, chain_next, eq0, out_eq, out_qty, out_fees, ev, n_ev)
                if j < 0:
                    raise RuntimeError("backtest: an account's decision position went back (session order)")
                if j < B:
                    ev = np.concatenate([ev, np.zeros_like(ev)], axis=1)
        path = f"split network: window part precomputed in blocks of {SPLIT_BLOCK}, the rest in one numba loop"
    elif decisions is not None:
        j = 0
        while j < B:
            j = _run_rows(decisions, accounts, j, core.acct, core.env, core.ptr, core.pending, core.sess, core.bars,
                          core.time, feats0, core.xp, core.ep, ep_last, core.next_session, win0, core.state,
                          core.mask, core.out_f, core.out_b, flt, fs, base, chain_next, eq0, out_eq, out_qty,
                          out_fees, ev, n_ev)
            if j < B:
                ev = np.concatenate([ev, np.zeros_like(ev)], axis=1)
        path = "vectorised decisions, one numba loop"
    else:
        bind = getattr(policy, "bind", None)
        if module is None and bind is not None:
            bind(view)
        active = accounts.copy()
        ones = np.ones(B, bool)
        while active.size:
            if n_ev[0] + 3 * active.size > ev.shape[1]:
                ev = np.concatenate([ev, np.zeros((N_EV, max(ev.shape[1], 3 * active.size)))], axis=1)
            if module is not None:
                m = core.mask[active]
                sc = module.scores(core.window[active], core.state[active])
                acts = np.where(m, sc, -np.inf).argmax(axis=1).astype(np.int64)
                conf = _confident(str(kind), sc, m, acts, filters.confidence)
            else:
                acts = np.asarray(policy(core.window, core.state, core.mask), np.int64)[active]
                conf = ones[:active.size]
            _step_batch(active, acts, conf, core.acct, core.env, core.ptr, core.pending, core.sess, core.bars,
                        core.time, core.features, core.xp, core.ep, ep_last, core.next_session, core.window,
                        core.state, core.mask, core.out_f, core.out_b, flt, fs, base, chain_next, eq0, out_eq,
                        out_qty, out_fees, ev, n_ev)
            active = active[fs[FS_DONE, active] == 0.0]
        path = "stepped bar by bar, one batched decision per bar"
    run_s = _time.perf_counter() - t0
    result = _assemble(data, core, fs, base, lengths, eq0, chain, out_eq, out_qty, out_fees, ev[:, :n_ev[0]],
                       execution, bar_us)
    name = getattr(policy, "name", None)
    if name is None:
        name = module.meta.get("algo", "model") if module is not None else type(policy).__name__
    result.meta.update(policy=name, policy_kind=kind or "rule", path=path, run_seconds=run_s, chain=chain,
                       filters=dict(filters.__dict__), env=env_params.as_dict(), execution=execution.as_dict())
    return result


def _infer_bar_us(data: SessionSet) -> int:
    d = np.diff(data.time)
    d = d[d > 0]
    return int(d.min()) if len(d) else 60_000_000


def _assemble(data: SessionSet, core: EnvCore, fs: np.ndarray, base: np.ndarray, lengths: np.ndarray,
              eq0: np.ndarray, chain: bool, out_eq: np.ndarray, out_qty: np.ndarray, out_fees: np.ndarray,
              ev: np.ndarray, execution: ExecutionParams, bar_us: int | None) -> BacktestResult:
    """Frames from the kernel's arrays (vectorised; the only loop is the numba round-trip builder)."""
    bar_us = bar_us or _infer_bar_us(data)
    cash0 = execution.initial_cash
    S = len(base)
    sess_of_pos = np.repeat(np.arange(S), lengths)
    rows = data.start[sess_of_pos] + (np.arange(len(out_eq)) - base[sess_of_pos])
    sym_of_sess = data.symbol_id[data.start].astype(np.int64)
    final = out_eq[base + lengths - 1]
    n_ev = ev.shape[1]
    ev_sess = ev[EV_ACCT].astype(np.int64)
    sess_fees = np.bincount(ev_sess, weights=ev[EV_FEE], minlength=S)
    sess_fills = np.bincount(ev_sess, minlength=S)
    sess_liq = np.bincount(ev_sess[ev[EV_KIND] == KIND_LIQUIDATION], minlength=S)
    bank = np.zeros(S)
    fee_bank = np.zeros(S)
    if not chain:  # bank each session's PnL (and fees) into the later sessions of its symbol
        order = np.lexsort((data.time[data.start], sym_of_sess))
        sym_sorted = sym_of_sess[order]
        first_of_sym = np.concatenate([[True], sym_sorted[1:] != sym_sorted[:-1]])
        group_start = np.maximum.accumulate(np.where(first_of_sym, np.arange(S), 0))
        for v, out in (((final - eq0)[order], bank), (sess_fees[order], fee_bank)):
            cum = np.cumsum(v) - v
            out[order] = cum - cum[group_start]
    close_time = data.time[rows] + bar_us
    sym_pos = sym_of_sess[sess_of_pos]
    srt = np.lexsort((close_time, sym_pos))
    per_t, per_sym, per_sess, per_rows = close_time[srt], sym_pos[srt], sess_of_pos[srt], rows[srt]
    per_eq = out_eq[srt] + bank[per_sess]
    per_q, per_px = out_qty[srt], data.close[per_rows]
    per_fee = out_fees[srt] + fee_bank[per_sess]
    sym_names = pl.Series("symbol", list(data.symbols), dtype=pl.Utf8)
    per = pl.DataFrame({
        "time": pl.Series(per_t, dtype=pl.Int64).cast(pl.Datetime("us", "UTC")),
        "symbol": sym_names.gather(per_sym),
        "equity": per_eq, "position": per_q, "price": per_px, "fees": per_fee,
        "stretch": per_sess.astype(np.int64),
    })

    # combined: each symbol's curve forward-filled on the union of times, summed
    present = np.flatnonzero(np.bincount(sym_of_sess, minlength=len(data.symbols)))
    t_sorted = np.sort(close_time)  # sort-based unique: numpy's hash unique is ~8x slower on 1 M timestamps
    t_all = t_sorted[np.concatenate([[True], t_sorted[1:] != t_sorted[:-1]])] if len(t_sorted) else t_sorted
    tot_eq = np.zeros(len(t_all))
    tot_fee = np.zeros(len(t_all))
    gross = np.zeros(len(t_all))
    bounds = np.searchsorted(per_sym, np.concatenate([present, [np.iinfo(np.int64).max]]))
    for k in range(len(present)):
        lo_, hi_ = bounds[k], bounds[k + 1]
        i = np.searchsorted(per_t[lo_:hi_], t_all, side="right") - 1
        ok = i >= 0
        j = lo_ + np.maximum(i, 0)
        tot_eq += np.where(ok, per_eq[j], cash0)
        tot_fee += np.where(ok, per_fee[j], 0.0)
        gross += np.where(ok, np.abs(per_q[j] * per_px[j]), 0.0)
    initial_total = cash0 * len(present)
    combined = pl.DataFrame({
        "time": pl.Series(t_all, dtype=pl.Int64).cast(pl.Datetime("us", "UTC")),
        "equity": tot_eq, "position": gross, "fees": tot_fee, "stretch": np.full(len(t_all), -1, np.int64),
    }).select("time", pl.lit("ALL", pl.Utf8).alias("symbol"), "equity", "position",
              pl.lit(None, pl.Float64).alias("price"), "fees", "stretch")
    equity = pl.concat([per, combined])

    # fills and round trips (events sorted by session, then time)
    ev_sorted = ev[:, np.lexsort((np.arange(n_ev), ev_sess))] if n_ev else ev
    ev_rows = ev_sorted[EV_ROW].astype(np.int64)
    ev_s = ev_sorted[EV_ACCT].astype(np.int64)
    kinds = pl.Series(list(KIND_NAMES), dtype=pl.Utf8)
    fills = pl.DataFrame({
        "symbol": sym_names.gather(sym_of_sess[ev_s]), "stretch": ev_s,
        "time": pl.Series(data.time[ev_rows], dtype=pl.Int64).cast(pl.Datetime("us", "UTC")),
        "qty": ev_sorted[EV_QTY], "price": ev_sorted[EV_PX], "fee": ev_sorted[EV_FEE],
        "realized": ev_sorted[EV_REALIZED], "kind": kinds.gather(ev_sorted[EV_KIND].astype(np.int64)),
    })
    tr = _round_trips(np.ascontiguousarray(ev_sorted), S) if n_ev else np.zeros((N_TR, 0))
    t_sess = tr[TR_ACCT].astype(np.int64)
    entry_rows = tr[TR_ENTRY_ROW].astype(np.int64)
    has_exit = ~np.isnan(tr[TR_EXIT_ROW])
    exit_rows = np.where(has_exit, tr[TR_EXIT_ROW], 0).astype(np.int64)
    funding = np.nan_to_num(tr[TR_FUNDING])
    reasons = pl.Series(list(REASON_NAMES), dtype=pl.Utf8)
    trades = pl.DataFrame({
        "symbol": sym_names.gather(sym_of_sess[t_sess]), "stretch": t_sess,
        "entry_time": pl.Series(data.time[entry_rows], dtype=pl.Int64).cast(pl.Datetime("us", "UTC")),
        "exit_time": pl.Series(np.where(has_exit, data.time[exit_rows], 0), dtype=pl.Int64)
        .cast(pl.Datetime("us", "UTC")),
        "side": tr[TR_SIDE].astype(np.int8), "qty": tr[TR_QTY], "entry_price": tr[TR_ENTRY_PX],
        "exit_price": tr[TR_EXIT_PX], "notional": tr[TR_QTY] * tr[TR_ENTRY_PX],
        "pnl": tr[TR_REALIZED] - tr[TR_FEES] - funding, "fees": tr[TR_FEES], "funding": funding,
        "bars": np.where(has_exit, exit_rows - entry_rows + 1, 0).astype(np.int64),
        "exit_reason": reasons.gather(np.nan_to_num(tr[TR_REASON]).astype(np.int64)),
    }).with_columns(
        pl.when(pl.Series(has_exit)).then(pl.col(c)).otherwise(None).alias(c)
        for c in ("exit_time", "exit_price", "pnl", "exit_reason"))

    # daily returns per symbol and combined (UTC day of the bar close time); the arrays are sorted by
    # (symbol, time), so a day's last bar is where the (symbol, day) key changes: no group-by needed
    def eod(key: np.ndarray, t: np.ndarray, eq: np.ndarray, init: float) -> tuple[np.ndarray, ...]:
        day = t // DAY_US
        last = np.flatnonzero(np.concatenate([(key[1:] != key[:-1]) | (day[1:] != day[:-1]), [True]]))
        e = eq[last]
        first = np.concatenate([[True], key[last][1:] != key[last][:-1]])
        prev = np.where(first, init, np.concatenate([[init], e[:-1]]))
        return key[last], day[last] * DAY_US, e, e / prev - 1.0

    k1, d1, e1, r1 = eod(per_sym, per_t, per_eq, cash0)
    k2, d2, e2, r2 = eod(np.zeros(len(t_all), np.int64), t_all, tot_eq, initial_total)
    daily = pl.DataFrame({
        "symbol": pl.concat([sym_names.gather(k1), pl.Series("symbol", ["ALL"] * len(k2), dtype=pl.Utf8)]),
        "day": pl.Series(np.concatenate([d1, d2]), dtype=pl.Int64).cast(pl.Datetime("us", "UTC")),
        "equity": np.concatenate([e1, e2]), "return": np.concatenate([r1, r2]),
    })

    stretches = pl.DataFrame({
        "stretch": np.arange(S), "symbol": sym_names.gather(sym_of_sess),
        "start": pl.Series(data.time[data.start], dtype=pl.Int64).cast(pl.Datetime("us", "UTC")),
        "end": pl.Series(data.time[data.end - 1], dtype=pl.Int64).cast(pl.Datetime("us", "UTC")),
        "bars": lengths, "start_equity": eq0, "final_equity": final, "return": final / eq0 - 1.0,
        "fills": sess_fills.astype(np.int64), "liquidations": sess_liq.astype(np.int64), "fees": sess_fees,
    })
    acct = core.acct
    final_total = float(tot_eq[-1]) if len(tot_eq) else initial_total
    totals = {
        "initial_cash": float(initial_total), "final_equity": final_total,
        "return": final_total / initial_total - 1.0, "pnl": float((final - eq0).sum()),
        "fills": float(acct[N_FILLS].sum() + fs[FS_C_FILLS].sum()), "trades": float(trades.height),
        "fees": float(acct[FEES].sum() + fs[FS_FEES_CARRY].sum()),
        "funding": float(acct[FUNDING].sum() + fs[FS_C_FUNDING].sum()),
        "slippage": float(acct[SLIPPAGE].sum() + fs[FS_C_SLIP].sum()),
        "liquidations": float(acct[N_LIQUIDATIONS].sum() + fs[FS_C_LIQ].sum()),
        "bars": float(len(out_eq)), "stretches": float(S), "blocked_decisions": float(fs[FS_BLOCKED].sum()),
    }
    return BacktestResult(equity=equity, trades=trades, fills=fills, daily=daily, stretches=stretches,
                          totals=totals, initial_cash=float(initial_total), meta={"bar_us": bar_us})



# ==================================================================================== the continuous split data


def continuous_split(settings: Any, split: str = "backtest", *, sessions_dir: Path | None = None,
                     features_dir: Path | None = None) -> SessionSet:
    """Every gap-free stretch of valid bars in ``sessions.splits[split]``, per symbol, as a variable-length
    ``SessionSet`` (``length = 0``): sessions ``[stretch_start + context, stretch_end)``, features standardised
    with the train split's statistics (``<sessions>/train`` metadata) and clipped like the sessions stage."""
    s = settings.sessions
    if split not in s.splits:
        raise ConfigError(f"backtest.split: {split!r} is not one of sessions.splits ({', '.join(s.splits)})")
    r = s.splits[split]
    lo = parse_day(r.start, f"sessions.splits.{split}.start")
    hi = parse_day(r.end, f"sessions.splits.{split}.end")
    sdir = Path(sessions_dir or settings.data.dir / "sessions")
    fdir = Path(features_dir or settings.data.dir / "features")
    train_rows = sdir / "train" / "rows.parquet"
    if not train_rows.exists():
        raise DataError(f"{train_rows}: the train split is needed for the feature standardisation "
                        "(run `rltrader dataset sessions`)")
    meta = read_metadata(train_rows)
    names = tuple(meta["features"])
    norm = meta["normalization"]
    mean = np.array([norm[n][0] for n in names])
    std = np.array([norm[n][1] for n in names])
    clip = float(meta["params"]["sessions"]["clip"])
    context = int(meta["context"])
    symbols = tuple(settings.ingest.symbols)
    parts: list[dict[str, np.ndarray]] = []
    ctx, st, en = [], [], []
    offset = 0
    for sym_id, sym in enumerate(symbols):
        path = fdir / f"{sym}.parquet"
        if not path.exists():
            raise DataError(f"{path}: no features for {sym} (run `rltrader dataset features`)")
        f = read_parquet(path, "features file", "re-run `rltrader dataset features`")
        f = f.filter((pl.col("open_time").dt.epoch("us") >= lo) & (pl.col("open_time").dt.epoch("us") < hi))
        if f.is_empty():
            continue
        valid = f["valid"].to_numpy()
        seg = f["segment"].to_numpy()
        brk = np.ones(len(f), bool)
        brk[1:] = (seg[1:] != seg[:-1]) | (valid[1:] != valid[:-1])
        first = np.flatnonzero(brk)
        last = np.concatenate([first[1:], [len(f)]])
        keep = valid[first] & (last - first > context)
        first, last = first[keep], last[keep]
        if len(first) == 0:
            continue
        lens = last - first
        take = np.concatenate([np.arange(a, b) for a, b in zip(first, last, strict=True)])
        rows = f[take]
        parts.append({
            "features": standardize(rows.select(names).to_numpy(), mean, std, clip),
            **{k: rows[k].to_numpy().astype(np.float64) for k in ("open", "high", "low", "close", "volume")},
            "time": rows["open_time"].dt.epoch("us").to_numpy(),
            "symbol_id": np.full(rows.height, sym_id, np.int16),
        })
        b0 = offset + np.concatenate([[0], np.cumsum(lens)[:-1]])
        ctx.append(b0)
        st.append(b0 + context)
        en.append(b0 + lens)
        offset += rows.height
    if not parts:
        raise DataError(f"sessions.splits.{split}: no gap-free stretch longer than the context ({context} bars) in "
                        f"[{r.start}, {r.end}) for {', '.join(symbols)} (is there data in that range?)")
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return SessionSet(
        features=np.ascontiguousarray(cat["features"]), open=cat["open"], high=cat["high"], low=cat["low"],
        close=cat["close"], volume=cat["volume"], time=cat["time"].astype(np.int64),
        symbol_id=cat["symbol_id"].astype(np.int16), ctx_start=np.concatenate(ctx).astype(np.int64),
        start=np.concatenate(st).astype(np.int64), end=np.concatenate(en).astype(np.int64), symbols=symbols,
        feature_names=names, context=context, length=0,
        meta={"split": split, "range": [r.start, r.end], "normalization": norm, "clip": clip})


def backtest_params(settings: Any) -> tuple[ExecutionParams, EnvParams]:
    """Execution and env params for a continuous run: the settings', with ``trade_size_quote`` mapped onto the
    env's sizing (module docstring) and stretch ends always force-closed (a position cannot cross a data gap)."""
    from rltrader.env import params_from_settings

    execution, env_params = params_from_settings(settings)
    size = settings.backtest.trade_size_quote
    changes: dict[str, Any] = {"force_close": True}
    if size is not None:
        if env_params.mode == "lowrider":
            changes["base_lot"] = float(size)
        else:
            cap = execution.initial_cash * (execution.leverage if env_params.mode == "futures_session" else 1.0)
            changes["position_size"] = min(1.0, float(size) / cap)
    return execution, replace(env_params, **changes)


def run_backtest(settings: Any, policy: Any, *, split: str | None = None, sessions_dir: Path | None = None,
                 features_dir: Path | None = None, data: SessionSet | None = None) -> BacktestResult:
    """Backtest ``policy`` (a ``PolicyModule``, a baseline name, a ``.pt`` path or an MLflow model URI)
    continuously over ``split`` (default ``backtest.split``) with the settings' execution, env and filters.
    ``data``: that split's ``continuous_split``, when the caller runs several policies over it."""
    from rltrader.data.schema import interval_us

    bt = settings.backtest
    split = split or bt.split
    execution, env_params = backtest_params(settings)
    if data is None:
        data = continuous_split(settings, split, sessions_dir=sessions_dir, features_dir=features_dir)
    if settings.train.threads > 0 and not (isinstance(policy, str) and policy in POLICY_NAMES):
        import torch

        torch.set_num_threads(settings.train.threads)
    result = backtest_sessions(data, policy, execution, env_params, BacktestFilters.from_settings(bt), chain=True,
                               bar_us=interval_us(settings.ingest.interval), seed=bt.seed)
    result.meta.update(split=split, range=data.meta["range"], trade_size_quote=bt.trade_size_quote,
                       position_size=env_params.position_size)
    return result
