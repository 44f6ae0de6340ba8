"""The backtest engine: any policy (trained agent or rule baseline) run continuously over a split, through the
envs' own step kernel, so fills, fees, slippage, latency, exchange filters and PnL are the env's by construction.

Why it is built on the env
--------------------------
A backtest that re-implements fills drifts from what the agent was trained on. Here the continuous run *is* an env
run: per symbol, every gap-free stretch of valid bars of the split's date range becomes one variable-length
"session" ``[stretch_start + context, stretch_end)`` (``continuous_split``), standardised with the train split's
statistics and clipped exactly like the sessions stage, and the env's public continuous mode
(``rltrader.env.continuous``) plays them: the env's own step, a forced close where the data has a gap or the
range ends, the equity carried into the symbol's next stretch (``chain``; without it each stretch starts from
``initial_cash`` and the per-symbol curve banks each stretch's PnL: fixed-size trading), spot/Lowrider cycles
restarted in place (``repeat_cycles``). Every fill, liquidation, forced close and funding payment is the
execution kernel's own event (``rltrader.execution.EventLog``); the frames read them, nothing here re-derives a
fill.

Modules: ``decisions`` (policies by name, masked argmax/softmax/confidence, the filters), ``engine`` (the run
loops), ``frames`` (the result frames), ``data`` (the continuous split, the run's params). The filters
(``BacktestFilters``) sit between the policy and the step; a filtered decision becomes hold (``decisions``).

``trade_size_quote`` (the D3QN reference design sizes trades in quote currency): the env sizes a long/short as a
fraction of the leverage cap (futures) or of the cash (spot), so the quote size maps to ``position_size = min(1, size /
(leverage × initial_cash))`` (futures) or ``min(1, size / initial_cash)`` (spot): the first trade of a stretch
has that notional, later ones scale with the stretch's equity. Lowrider's lots are in quote already: ``base_lot =
size``.

Batched inference
-----------------
Decisions that do not depend on fills are precomputed for every bar, vectorised, and applied by ONE numba loop
over the accounts and time (``engine._run_rows``): ``flat`` always, and without latency ``buy_and_hold`` and
``sma_cross`` (futures, spot) — their env baselines only consult the position to avoid re-sending an order the
env would reject anyway (``order_for`` returns 0 for a long while long), so "long when the fast SMA is above the
slow one, else short" gives the same fills. With latency an order can be in flight, the baseline then looks at
the filled position and the target form would not (it could cancel a pending flip), so those run bar by bar.
In that loop a bar that sends no order and books nothing but the mark (most bars of a held side) is a *quiet*
bar (``quiet``): only the execution model's mark, the curve row and the counters; the others take the env's
full step after a fresh observation — the same run, frame for frame (``tests/test_backtest_quiet.py``).

Our networks (``PolicyModule.split``: D3QN, PPO, the CNN classifier, the XGBoost threshold policy) are split where
the position state enters:
the window part (encoder and the embedding's share of the first layer; the classifier's whole P(up)) does not
depend on fills, so it is computed for every decision position in blocks of ``SPLIT_BLOCK`` rows, one batched
forward pass each (a CNN encoder's convolutions are shared by the overlapping windows of consecutive bars,
``packaging.encode_windows``); then ONE numba loop (``engine._run_split``) runs the accounts through the block with the
state-dependent rest (``packaging.head_scores``: the state term, the second layer, the head; then the masked
argmax and the confidence filter of ``decisions``) — the same decisions as the module's forward pass, up to
float32 rounding order
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
- ``events``: the execution kernel's events as booked, ``(execution.N_EV, n)`` (``EV_TAG`` = stretch), funding
  payments included: ``fills`` and ``trades`` are views of them.
"""

from __future__ import annotations

from rltrader.evaluate.backtest.data import backtest_params, continuous_split
from rltrader.evaluate.backtest.decisions import (
    POLICY_NAMES,
    BacktestFilters,
    EnvView,
    load_policy,
    make_policy,
    masked_softmax,
    rule_decisions,
)
from rltrader.evaluate.backtest.engine import SPLIT_BLOCK, backtest_sessions, run_backtest
from rltrader.evaluate.backtest.frames import BacktestResult
from rltrader.execution import KIND_NAMES, REASON_NAMES

__all__ = ["KIND_NAMES", "POLICY_NAMES", "REASON_NAMES", "SPLIT_BLOCK", "BacktestFilters", "BacktestResult",
           "EnvView", "backtest_params", "backtest_sessions", "continuous_split", "load_policy", "make_policy",
           "masked_softmax", "rule_decisions", "run_backtest"]
