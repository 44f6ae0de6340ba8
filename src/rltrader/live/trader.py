"""The trader: on every CLOSED 1m bar, settle the bar, then decide the next one and send its order.

Per symbol and closed bar ``r`` (open time ``T``), in this order (the env's step, split at the bar boundary):

1. features: the incremental feature row of bar ``r`` (``live.features``), standardised with the train split's
   statistics (``dataset.build.standardize``, the backtest's scaling) into the symbol's window buffer;
2. settle: the broker books what filled in bar ``r`` (paper: the execution kernel's ``process_bar`` with the
   order due in ``r``; exchange: the fills it reported) and marks the account at ``close[r]``; the spot/Lowrider
   cycle bookkeeping of the backtest (a new cycle once a sell filled);
3. decide bar ``r + 1``: the observation (window of the last ``context`` rows, the position state and the
   action mask) is written by the env's own ``_observe``; the policy's masked argmax (or rule) picks an action;
   the backtest's filters (``params.yaml: backtest``: confidence, cooldown, max trades per day, stop loss, take
   profit) run on it through the backtest's own ``decisions.filter_decision`` and per-account filter state (a
   blocked decision becomes hold, recorded with reason ``filtered``; a protective exit the close action);
   the action becomes a target position through the env's ``order_for`` (the backtest's sizing and exchange
   filters); the order = target − committed position goes through the ``OrderGateway`` — sent now (the next
   bar's open) with ``latency_bars = 0``, or held ``latency_bars`` bars as the backtest's pending queue does.

Steps 1–3 are the per-bar critical section (``on_bar``: the collector paused, optionally under ``SCHED_FIFO``,
decision and mark rows deferred); ``between_bars`` commits those rows, checkpoints the WAL and collects. An
order's intent is always committed before its request leaves, together with the deferred rows before it.

Why not ``env.continuous.ContinuousRun.step``: that step is "decide bar t AND play bar t" in one kernel call —
the order for bar t is computed inside ``_step_one`` (``order_for``) and filled by ``process_bar`` on bar t's
prices in the same call. A live trader must send that order at bar t's open, before bar t exists, through the
``OrderGateway`` (journal intent, risk engine and operator hooks, client order id, an exchange that may reject,
reduce or fill differently); and the run's stretches (``SessionSet``) are known in advance, where a live trader
learns of a gap only when the next bar arrives. So the trader runs the same pieces split at the bar boundary:
the env's ``observe`` and ``order_for``, the backtest's ``filter_decision``, the kernel's ``process_bar``.

No new risk (decision recorded as hold, with the reason) when the window is not ``context`` consecutive valid
rows: warm-up, a NaN feature, or a missing bar. A missing bar ends the stretch (as a gap ends a backtest stretch)
and the open position is closed at the next bar's open; a backtest closes it at the gap's last close, which a
live trader only learns about afterwards. With ``until`` set (a replay, a session with a known end) the last
bar's position is closed at its close (``forced_close``), as the backtest closes a stretch at the range's end,
and the state's ``time_left`` is the backtest's; without, ``time_left`` is computed against a far horizon.

``Trader.run_bars`` drives the loop from stored or replayed bars (tests, benchmark); ``live.runner`` connects it
to the websocket ingester's closed klines.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from rltrader.dataset.build import standardize
from rltrader.env.core import (
    EQUITY_FLOOR,
    N_OUT_F,
    P_END,
    P_K,
    P_START,
    P_T,
    EnvArrays,
    is_decision_bar,
    observe,
    update_held,
)
from rltrader.env.modes import (
    E_HELD,
    E_N_BUYS,
    MODE_FUTURES,
    MODE_LOWRIDER,
    EnvParams,
    order_for,
    take_profit_due,
)
from rltrader.errors import ConfigError
from rltrader.evaluate.backtest.decisions import FS_LAST_FILL, FilterArrays, filter_decision, is_confident
from rltrader.evaluate.filters import BacktestFilters
from rltrader.execution import (
    AVG_ENTRY,
    CASH,
    EQUITY,
    FEES,
    N_FILLS,
    QTY,
    REASON_NAMES,
    REASON_SIGNAL,
    XP_CASH,
    ExecutionParams,
)
from rltrader.live.book import FAR, BookView, Decision, Normalization, SymbolBook
from rltrader.live.features import IncrementalFeatures
from rltrader.live.gateway import Bar, Fill, OrderGateway, OrderRequest
from rltrader.live.records import Records, order_id_for

log = logging.getLogger(__name__)

# EnvArrays fields the observation never reads (sessions, autoreset target, step outputs): typed placeholders
_NO_SESSIONS = np.zeros((2, 0), np.int64)
_NO_NEXT = np.zeros(1, np.int64)
_NO_OUT_F = np.zeros((N_OUT_F, 1))
_NO_OUT_B = np.zeros((2, 1), np.bool_)
CHECKPOINT_BARS = 360
"""SQLite WAL checkpoint cadence (between bars): every 6 hours of 1m bars per symbol. A checkpoint's writes and
fsync leave the CPU caches cold for the next bar, so it is kept rare; the WAL stays a few MB."""


def _event(name: str, **fields: Any) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info(json.dumps({"event": name, **fields}, default=str, separators=(",", ":")))


class Trader:
    """The decision loop over closed bars for a set of symbols; see the module docstring."""

    def __init__(self, *, policy: Any, policy_name: str, model_version: str | None, execution: ExecutionParams,
                 env_params: EnvParams, norm: Normalization, feature_settings: Any, symbols: Sequence[str],
                 gateway: OrderGateway, records: Records, session_id: str, repeat_cycles: bool = True,
                 until_us: int | None = None, interval: str = "1m", filters: BacktestFilters | None = None,
                 realtime_priority: int = 0) -> None:
        self.policy, self.policy_name, self.model_version = policy, policy_name, model_version
        self.execution, self.env_params, self.norm = execution, env_params, norm
        self.xp = execution.to_array()
        self.ep = env_params.to_array(execution.initial_cash)
        self.gateway, self.records, self.session_id = gateway, records, session_id
        self.repeat_cycles, self.until_us = repeat_cycles, until_us
        self.module = policy if getattr(policy, "kind", None) is not None and hasattr(policy, "scores") else None
        self.features: dict[str, IncrementalFeatures] = {}
        self.books: dict[str, SymbolBook] = {}
        self.views: dict[str, BookView] = {}
        self.finished: set[str] = set()
        self.action_names = env_params.action_names
        self.filters = filters or BacktestFilters()
        self.filter_params = FilterArrays.create(self.filters, env_params.mode, 1).params
        self.probs = np.zeros(env_params.n_actions)
        fe = IncrementalFeatures(feature_settings, interval)
        cols = [fe.names.index(n) for n in norm.names if n in fe.names]
        if len(cols) != len(norm.names):
            missing = [n for n in norm.names if n not in fe.names]
            raise ConfigError(f"trader: the model's features {missing} are not produced by the features settings")
        self.cols = np.asarray(cols)
        if self.module is not None:
            names = tuple(getattr(self.module, "meta", {}).get("feature_names", norm.names))
            if names != norm.names or self.module.context != norm.context:
                raise ConfigError("trader: the model was trained on other features or context than the sessions "
                                  f"metadata describes ({len(names)} vs {len(norm.names)} features, context "
                                  f"{self.module.context} vs {norm.context})")
            if self.module.n_actions != env_params.n_actions:
                raise ConfigError(f"trader: the model has {self.module.n_actions} actions, env.mode "
                                  f"{env_params.mode} has {env_params.n_actions}")
        for sym in symbols:
            self.features[sym] = IncrementalFeatures(feature_settings, interval)
            book = SymbolBook(sym, norm.context, len(norm.names), env_params.n_actions, execution.latency_bars,
                              execution.initial_cash)
            self.books[sym] = book
            self.views[sym] = BookView(book, env_params)
        self.decisions = 0
        self.latencies: list[float] = []
        self.resolved: Any = None
        """The ``live.policy.ResolvedModel`` this trader runs (set by ``build_trader``; None for a bare policy)."""
        self.queued: dict[tuple[str, int], OrderRequest] = {}
        """Orders held back ``latency_bars`` decisions (the backtest's pending queue), by (symbol, decision no.)."""
        self.risk: Any = None
        """The ``live.risk.RiskEngine`` every order passes (set by ``build_trader``; also a gateway hook)."""
        self.stopping = False
        """SIGTERM / stop: no new orders from here on (the journal is flushed by each commit already)."""
        self.last_bars: dict[str, Bar] = {}
        self.catching_up: set[str] = set()
        """Symbols whose current bar arrived long after its close (a REST repair catching up): no new risk."""
        self.bars_seen = 0
        self.frozen = False
        self.realtime = _realtime_params(realtime_priority)
        records.hold_checkpoints()  # checkpoints between bars (``between_bars``), never inside an order's commit
        self._bind_scorers()

    # -- input -----------------------------------------------------------------------------------------
    def warm_up(self, symbol: str, bars: Iterable[Bar]) -> int:
        """Feed history (before the run) into the feature state only: no decisions, no trading."""
        fe = self.features[symbol]
        n = 0
        for b in bars:
            fe.update(b.time, b.open, b.high, b.low, b.close, b.volume, b.trades, b.taker_buy_volume)
            n += 1
        return n

    def warm_up_book(self, symbol: str, bars: Iterable[Bar]) -> int:
        """A restarted trader: bars it had already handled go into the features *and* the symbol's window (no
        settling, no decisions), so the next bar is decided on the same window as an uninterrupted run's."""
        fe, book = self.features[symbol], self.books[symbol]
        n = 0
        for b in bars:
            raw, ok = fe.update(b.time, b.open, b.high, b.low, b.close, b.volume, b.trades, b.taker_buy_volume)
            row = standardize(raw[self.cols][None, :], self.norm.mean, self.norm.std, self.norm.clip)[0] if ok else None
            book.append(b, row)
            self.last_bars[symbol] = b
            if book.run == book.context:  # where _decide would start the stretch
                nxt = b.time + 60_000_000
                book.ptr[P_START, 0] = book.n
                book.ptr[P_END, 0] = (book.n + (self.until_us - nxt) // 60_000_000) if self.until_us is not None \
                    else FAR
            n += 1
        return n

    def restore_from_journal(self, symbol: str, rehandle: int | None = None) -> int:
        """A resumed session (same session id, after a crash): its account and the backtest filters' state rebuilt
        from its journal, so that it decides as the uninterrupted run would have. Returns the number of the
        session's journaled fills of ``symbol`` (0: nothing to resume).

        ``rehandle``: the open time of the first bar this trader handles again — its last marked bar, whose
        next-bar decision it recomputes (the crash may have come before that decision's order left; the journal
        dedupes it otherwise) — with the bars before it already in the book (``warm_up_book``). The journal's
        fills are then booked where the uninterrupted run booked them: before that bar, into the account
        (``execution.apply_fill``); of that bar, through the broker's ``adopt``, so its ``settle`` reports them as
        it would have; after it (the order its recomputed decision sends), when that decision finds its order
        filled (``OrderGateway.submit``). ``None`` (a trader that starts on new bars): every fill now.

        With ``latency_bars > 0`` the orders decided but not sent yet (the pending queue, in no journal table) are
        re-derived from the journaled decisions (``live.pending``), with the committed slots and decision count."""
        from rltrader.live.gateway import book_fill, fill_from_row
        from rltrader.live.pending import replay_queue

        book = self.books[symbol]
        queue = replay_queue(self.records, self.gateway, self.session_id, symbol, book.latency, rehandle)
        rows = [f for f in self.records.fills(self.session_id) if f["symbol"] == symbol]
        at_rehandle = []
        fill_times = set()
        bar_fills: list[Fill] = []  # one bar's booked fills: the cycle bookkeeping runs after each bar's
        for r in rows:
            f = fill_from_row(r)
            if rehandle is not None and f.time > rehandle and f.kind == "order":
                if f.client_order_id is not None:  # booked when the recomputed decision finds its order filled
                    book.unbooked.append(f.client_order_id)
                continue
            if rehandle is not None and f.time == rehandle and f.kind == "order":
                at_rehandle.append(f)
                continue
            if bar_fills and bar_fills[-1].time != f.time:
                self._count_cycle(book, bar_fills, queue.pending_at(bar_fills[-1].time))
                bar_fills = []
            book_fill(book.acct, f)
            bar_fills.append(f)
            if f.client_order_id is not None:
                self.gateway.booked.add(f.client_order_id)
                self.gateway.journaled.add(f.client_order_id)
            if f.kind in ("order", "liquidation"):
                fill_times.add(f.time)
        if bar_fills:
            self._count_cycle(book, bar_fills, queue.pending_at(bar_fills[-1].time))
        if at_rehandle and not self.gateway.adopt_fills(at_rehandle, book.acct):
            for f in at_rehandle:  # a broker that cannot report them again: booked now
                book_fill(book.acct, f)
            self._count_cycle(book, at_rehandle, queue.pending_at(at_rehandle[-1].time))
        # the pending queue (latency_bars > 0): the orders decided but not sent yet, their committed slots and
        # the decision count, as ``_decide`` left them (``live.pending``)
        book.k = queue.k
        book.pending[:] = queue.pending
        for key in [key for key in self.queued if key[0] == symbol]:
            del self.queued[key]
        self.queued.update({(symbol, due): req for due, req in queue.queued.items()})
        self._restore_filters(book, fill_times, rehandle)
        self._restore_held(book, rehandle)
        if rows:
            _event("account_restored", symbol=symbol, fills=len(rows), position=float(book.acct[QTY, 0]),
                   filter_state=book.filter_state[:, 0].tolist())
        return len(rows)

    def _restore_filters(self, book: SymbolBook, fill_times: set[int], rehandle: int | None) -> None:
        """The backtest filters' per-account state (``decisions.FS_*``) as ``_decide`` left it after deciding the
        bar ``rehandle`` (all journaled decisions when None), derived from the journal alone:

        - last fill: the last book row in the current stretch whose bar settled a fill (``_on_bar``; a stretch
          start clears it, as ``_decide`` does);
        - UTC day and count: the day of the last decision that went through the filters (every decision but the
          "no new risk" holds) and how many decisions of that day sent an order — ``filter_decision`` counts a
          valid non-hold action, and a valid action is exactly one whose ``order_for`` is non-zero, i.e. a
          decision recorded with a target; the one exception is Lowrider's automatic take-profit (target 0, every
          buy masked then); without ``max_trades_per_day`` the count never restarts (all such decisions);
        - blocked: the decisions recorded as ``filtered``."""
        from rltrader.evaluate.backtest.decisions import DAY_US, FS_BLOCKED, FS_COUNT, FS_DAY
        from rltrader.evaluate.filters import F_MAX_DAY

        fs = book.filter_state
        fs[:, 0] = FilterArrays.create(self.filters, self.env_params.mode, 1).state[:, 0]
        start = int(book.ptr[P_START, 0])
        for i in range(book.n - 1, max(start, 0) - 1, -1):
            if int(book.time[i]) in fill_times:
                fs[FS_LAST_FILL, 0] = i
                break
        lowrider = int(self.ep[0]) == MODE_LOWRIDER
        rows = [d for d in self.records.decision_outcomes(self.session_id, book.symbol, rehandle)
                if not str(d["reason"]).startswith("no new risk")]
        fs[FS_BLOCKED, 0] = sum(1 for d in rows if d["reason"] == "filtered")
        by_day = self.filter_params[F_MAX_DAY] > 0.0
        if by_day and rows:
            fs[FS_DAY, 0] = int(rows[-1]["bar_time"]) // DAY_US
        fs[FS_COUNT, 0] = sum(1 for d in rows if d["target"] is not None
                              and not (lowrider and d["reason"] == "take_profit")
                              and (not by_day or int(d["bar_time"]) // DAY_US == fs[FS_DAY, 0]))

    def _restore_held(self, book: SymbolBook, rehandle: int | None) -> None:
        """The env's count of bars the position has been open (``E_HELD``, for ``min_hold_bars``) as the
        uninterrupted run left it after the bar before ``rehandle`` (after every marked bar when None):
        ``update_held`` over the journal's marks — each handled bar's position after its fills — in bar order."""
        book.env[E_HELD, 0] = 0.0
        q0 = 0.0
        for m in self.records.marks(self.session_id, book.symbol):
            if rehandle is None or int(m["bar_time"]) < rehandle:
                q1 = float(m["position"])
                update_held(book.env, 0, q0, q1)
                q0 = q1

    def session_position(self, symbol: str) -> float:
        """The position this session's journaled fills add up to: its account's, once a resumed session has
        booked the fill its recomputed decision finds (``restore_from_journal``)."""
        return float(sum(f["qty"] for f in self.records.fills(self.session_id) if f["symbol"] == symbol))

    def on_bar(self, symbol: str, bar: Bar) -> Decision | None:
        """A closed bar of ``symbol``: settle it, then decide (and send) the next bar's order — the critical
        section from the closed candle to the order request, run with the garbage collector paused (a collection
        of the process's heap, torch and polars included, takes milliseconds); ``between_bars`` does the rest."""
        t0 = time.perf_counter()
        if symbol in self.finished:
            return None
        enabled = gc.isenabled()
        gc.disable()
        if self.realtime is not None:
            os.sched_setscheduler(0, os.SCHED_FIFO, self.realtime[0])
        try:
            return self._on_bar(symbol, bar, t0)
        finally:
            if self.realtime is not None:
                os.sched_setscheduler(0, os.SCHED_OTHER, self.realtime[1])
            if enabled:
                gc.enable()

    def between_bars(self) -> None:
        """What can wait until the order is out: commit the deferred decision and mark rows (one transaction),
        checkpoint the SQLite WAL every ``CHECKPOINT_BARS`` bars, bind a reloaded model's forward pass, and once,
        after the first bar, move the objects that live for the whole session (modules, model, buffers) out of
        the collector's generations (``gc.freeze``), so that later collections only walk what bars allocate."""
        self.records.flush()
        self.bars_seen += 1
        if self.bars_seen % CHECKPOINT_BARS == 0:
            self.records.checkpoint()
        self._bind_scorers()  # a reloaded model is traced here, not in the next bar's critical section
        if not self.frozen:
            gc.collect()
            gc.freeze()
            self.frozen = True

    def _bind_scorers(self) -> None:
        """Each book's forward pass bound to its buffers (``PolicyModule.bound_scores``: traces the network, tens
        of milliseconds) for the current module, outside the per-bar critical section."""
        if self.module is None:
            return
        for book in self.books.values():
            if book.scorer_of is not self.module:
                bind = getattr(self.module, "bound_scores", None)
                book.scorer = bind(book.window, book.state) if bind is not None else (
                    lambda m=self.module, b=book: m.scores(b.window, b.state))
                book.scorer_of = self.module

    def _on_bar(self, symbol: str, bar: Bar, t0: float) -> Decision | None:
        book = self.books[symbol]
        gap = book.last_time is not None and bar.time - book.last_time != 60_000_000
        raw, ok = self.features[symbol].update(bar.time, bar.open, bar.high, bar.low, bar.close, bar.volume,
                                               bar.trades, bar.taker_buy_volume)
        row = standardize(raw[self.cols][None, :], self.norm.mean, self.norm.std, self.norm.clip)[0] if ok else None
        book.append(bar, row)
        self.last_bars[symbol] = bar
        if self.risk is not None:
            self.risk.on_bar(symbol, valid=row is not None, repairing=symbol in self.catching_up)
        # settle bar r (paper: the kernel fills the order due in it), then the cycle bookkeeping
        fills = self.gateway.broker.settle(symbol, bar, book.acct)
        if fills:  # the cooldown counts from the bar of the last fill
            book.filter_state[FS_LAST_FILL, 0] = book.n - 1
        self._book_fills(book, fills)
        # the env's min-hold count (bars open) from the position before and after this bar's fills: an exchange
        # books a market order's fill when it answers (before this bar), the kernel at this bar's settle
        q_after = float(book.acct[QTY, 0])
        update_held(book.env, 0, q_after - sum(f.qty for f in fills), q_after)
        self.records.record_mark(self.session_id, symbol, bar.time, book.equity, float(book.acct[QTY, 0]), bar.close,
                                 deferred=True)
        if self.risk is not None:
            self.risk.on_mark(symbol, float(book.acct[QTY, 0]), bar.close, book.equity, bar.time)
        if self.until_us is not None and bar.time + 60_000_000 >= self.until_us:
            self._flatten(symbol, bar, "end_of_data")
            self.finished.add(symbol)
            return None
        if gap or row is None:
            _event("no_new_risk", symbol=symbol, bar=bar.time, reason="missing bar" if gap else "invalid features")
            if book.committed() != 0.0:
                self._send_target(book, bar.time + 60_000_000, 0.0, bar.close, "gap" if gap else "invalid_features")
        decision = self._decide(book, bar)
        if book.unbooked:  # a resumed session's first decision: every journaled fill is in the account from here
            for cid in book.unbooked:
                self.gateway.adopt(cid, book.acct)
            book.unbooked.clear()
        self.latencies.append(time.perf_counter() - t0)
        return decision

    # -- internals -------------------------------------------------------------------------------------
    def _book_fills(self, book: SymbolBook, fills: list[Fill]) -> None:
        if not fills:
            return
        self.gateway.record_fills(fills)
        self._count_cycle(book, fills)

    def _count_cycle(self, book: SymbolBook, fills: list[Fill], queued: bool | None = None) -> None:
        """Spot / Lowrider cycle bookkeeping after one bar's fills: the buys of the cycle (``E_N_BUYS``, the
        rule's DCA step) and, when a cycle closes flat, a new one with its fees moved to ``fees_carry`` (the
        take-profit prices the current cycle's fees only). ``restore_from_journal`` replays it bar by bar, with
        ``queued``: whether orders were held in the pending queue then (None: ``book.pending`` now)."""
        if any(f.kind == "order" and f.qty > 0 for f in fills):
            book.env[E_N_BUYS, 0] += 1.0
        mode = int(self.ep[0])
        held = bool(book.pending[0].any()) if queued is None else queued
        if (mode != MODE_FUTURES and book.env[E_N_BUYS, 0] > 0 and book.acct[QTY, 0] == 0.0
                and not held and self.repeat_cycles
                and book.acct[EQUITY, 0] > EQUITY_FLOOR * self.xp[XP_CASH]):
            book.env[E_N_BUYS, 0] = 0.0  # a new cycle (the backtest's repeat_cycles)
            book.fees_carry += float(book.acct[FEES, 0])
            book.acct[FEES, 0] = 0.0

    def _flatten(self, symbol: str, bar: Bar, reason: str) -> None:
        book = self.books[symbol]
        if getattr(self.gateway.broker, "name", "") == "exchange":
            # through the journal and the risk engine, as every exchange order (a leg of its own: seq 1)
            q = float(book.acct[QTY, 0])
            if q != 0.0 and not self.stopping:
                self.gateway.submit(OrderRequest(symbol, bar.time, order_id_for(self.session_id, symbol, bar.time, 1),
                                                 -q, bar.close, reason, True, q, True), book.acct)
            fills = self.gateway.broker.settle(symbol, bar, book.acct)
        else:
            fills = self.gateway.broker.flatten(symbol, bar, book.acct)
        book.pending[:] = 0.0
        if fills:
            self.gateway.record_fills(fills)
            self.records.record_mark(self.session_id, symbol, bar.time, book.equity, float(book.acct[QTY, 0]),
                                     bar.close)
        _event("flattened", symbol=symbol, bar=bar.time, reason=reason, fills=len(fills))

    def _send_target(self, book: SymbolBook, bar_time: int, target: float, ref: float, reason: str) -> None:
        req = self.gateway.order_for_target(book.symbol, bar_time, target, book.committed(), ref, reason)
        if req is not None and not self.stopping:
            self.gateway.submit(req, book.acct)

    def seed_position(self, symbol: str, qty: float, entry: float) -> None:
        """A restarted exchange-mode trader starts from the exchange's position (recovery's), entered at the
        exchange's entry price, as if filled there without a fee."""
        acct = self.books[symbol].acct
        if acct[QTY, 0] != 0.0 or qty == 0.0:
            return
        acct[QTY, 0] = qty
        acct[AVG_ENTRY, 0] = entry
        acct[CASH, 0] -= qty * entry
        # journaled as a fill of kind "seed" (not an exchange fill: the journal's positions leave it out), so a
        # restart of this session restores it with the rest
        t = self.last_bars[symbol].time if symbol in self.last_bars else 0
        self.records.record_fill(self.session_id, symbol, None, t, "seed", qty, entry, 0.0, 0.0, 0.0, qty)
        _event("position_seeded", symbol=symbol, qty=qty, entry=entry)

    def _decide(self, book: SymbolBook, bar: Bar) -> Decision:
        """Decision for the bar after ``bar`` (sent at its open); hold with a reason when not allowed."""
        nxt = bar.time + 60_000_000
        ctx = book.context
        lat = book.latency
        nslot = lat + 1
        if book.run < ctx:
            reason = "warm-up" if book.run > 0 else "invalid features"
            self.records.record_decision(self.session_id, book.symbol, nxt, 0, "hold", None, None,
                                         float(book.acct[QTY, 0]), f"no new risk: {reason}", self.model_version,
                                         deferred=True)
            return Decision(book.symbol, nxt, 0, None, None, reason)
        t = book.n  # the next bar's row
        if book.run == ctx:  # a new stretch starts here (the backtest's fresh account, equity carried)
            book.ptr[P_START, 0] = t
            book.filter_state[FS_LAST_FILL, 0] = -1e18  # no cooldown carried over a gap (the next stretch)
            if book.acct[QTY, 0] == 0.0 and not book.pending[0].any():
                book.env[E_N_BUYS, 0] = 0.0
            book.ptr[P_END, 0] = (t + (self.until_us - nxt) // 60_000_000) if self.until_us is not None else FAR
        book.ptr[P_T, 0] = t
        book.ptr[P_K, 0] = book.run - ctx  # bars into the stretch: the env's decision cadence counts from its start
        book.time[t] = nxt  # the decided bar's open time (the filters' UTC day)
        arrays = EnvArrays(book.acct, book.env, book.ptr, book.pending, _NO_SESSIONS, book.bars, book.time,
                           book.feats, self.xp, self.ep, _NO_NEXT, book.window, book.state, book.mask,
                           _NO_OUT_F, _NO_OUT_B)
        observe(0, arrays)
        scores = None
        confident = True
        if self.module is not None:
            if book.scorer_of is not self.module:  # a model switched in without ``between_bars`` since
                self._bind_scorers()
            scores = book.scorer()[0]
            a = int(np.where(book.mask[0], scores, -np.inf).argmax())
            confident = bool(is_confident(np.ascontiguousarray(scores, np.float32), book.mask[0], a,
                                          self.module.kind == "logits", float(self.filters.confidence), self.probs))
        else:
            bind = getattr(self.policy, "bind", None)
            if bind is not None:
                bind(self.views[book.symbol])
            a = int(np.asarray(self.policy(book.window, book.state, book.mask))[0])
        if a < 0 or a >= book.n_actions:
            a = 0
        # the backtest's filters, its own code: a blocked decision becomes hold, a stop/take-profit the close
        chosen = a
        a, why = filter_decision(0, a, confident, arrays, FilterArrays(self.filter_params, book.filter_state))
        a = int(a)
        # the env's order for this action (``_step_one``): Lowrider's automatic take-profit, else order_for
        ref = float(book.bars[3, t - 1])
        committed = book.committed()
        dq = 0.0
        reason = REASON_NAMES[int(why)] if why != REASON_SIGNAL else ("filtered" if a != chosen else "signal")
        if t + lat < book.ptr[P_END, 0] and book.acct[EQUITY, 0] > EQUITY_FLOOR * self.xp[XP_CASH]:
            if (int(self.ep[0]) == MODE_LOWRIDER and committed > 0.0
                    and take_profit_due(book.acct, 0, ref, self.xp, self.ep)):
                dq, reason = -committed, "take_profit"
            elif 0 < a < book.n_actions and is_decision_bar(int(book.ptr[P_K, 0]), self.ep):
                dq = float(order_for(a, committed, ref, book.acct, book.env, 0, self.xp, self.ep))
        target = committed + dq if dq != 0.0 else None
        if dq != 0.0 and -dq == committed:
            target = 0.0
        # deferred: committed between bars, or with this bar's order intent (before it), whichever is first
        self.records.record_decision(self.session_id, book.symbol, nxt, a, self.action_names[a],
                                     None if scores is None else scores.tolist(), target,
                                     float(book.acct[QTY, 0]), reason, self.model_version, deferred=True)
        self.decisions += 1
        # the backtest's pending queue: this bar's order goes out ``latency`` bars later
        k = book.k
        book.pending[0, k % nslot] = 0.0
        # a recomputed bar (a restart) re-derives the same order and client id: the journal dedupes it
        if target is not None and not self.stopping:
            req = self.gateway.order_for_target(book.symbol, nxt, target, committed, ref, reason)
            if req is not None:
                book.pending[0, k % nslot] = req.qty
                if lat == 0:
                    self.gateway.submit(req, book.acct)
                    book.pending[0, k % nslot] = 0.0
                else:
                    self.queued[(book.symbol, k + lat)] = req
        if lat > 0:
            due = self.queued.pop((book.symbol, k), None)
            book.pending[0, (k - lat) % nslot] = 0.0
            if due is not None:  # an order for the bar it is sent at (an exchange's fill is booked at it)
                self.gateway.submit(replace(due, bar_time=nxt), book.acct)
        book.k = k + 1
        book.decided = nxt
        return Decision(book.symbol, nxt, a, scores, target, reason)

    def run_bars(self, bars: Iterable[tuple[str, Bar]]) -> None:
        """Drive the loop from an ordered stream of (symbol, closed bar)."""
        for sym, bar in bars:
            self.on_bar(sym, bar)
            self.between_bars()

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies) * 1e3
        per = {s: {"equity": b.equity, "position": float(b.acct[QTY, 0]), "fees": b.fees,
                   "fills": int(b.acct[N_FILLS, 0])} for s, b in self.books.items()}
        return {"session_id": self.session_id, "model": self.policy_name, "model_version": self.model_version,
                "decisions": self.decisions, "symbols": per,
                "equity": float(sum(b.equity for b in self.books.values())),
                "latency_ms_p50": float(np.quantile(lat, 0.5)) if lat.size else None,
                "latency_ms_p99": float(np.quantile(lat, 0.99)) if lat.size else None}


def _realtime_params(priority: int) -> tuple[Any, Any] | None:
    """(the FIFO param, the normal one) for ``trader.realtime_priority``; None when 0. Checked here, at start:
    a trader that cannot get the priority it was configured for refuses to start rather than run slower."""
    if priority <= 0:
        return None
    if not hasattr(os, "sched_setscheduler"):
        raise ConfigError("trader.realtime_priority: needs Linux's sched_setscheduler; set it to 0 here")
    fifo, normal = os.sched_param(priority), os.sched_param(0)
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, fifo)
        os.sched_setscheduler(0, os.SCHED_OTHER, normal)
    except PermissionError as exc:
        raise ConfigError(f"trader.realtime_priority {priority}: SCHED_FIFO refused ({exc}); it needs "
                          "CAP_SYS_NICE (root, `setcap cap_sys_nice+ep` on the interpreter, or the container's "
                          "--cap-add SYS_NICE), or set it to 0") from None
    return fifo, normal


def new_session_id() -> str:
    return time.strftime("%Y%m%d%H%M%S", time.gmtime()) + uuid.uuid4().hex[:6]


def bars_from_frame(df: Any) -> list[Bar]:
    """Closed bars from a klines frame (the store's schema), in open-time order."""
    d = df.sort("open_time")
    t = d["open_time"].dt.epoch("us").to_numpy()
    cols = [d[c].to_numpy().astype(np.float64) for c in ("open", "high", "low", "close", "volume", "trades",
                                                           "taker_buy_volume")]
    return [Bar(int(t[i]), *(float(c[i]) for c in cols)) for i in range(len(t))]


def build_trader(settings: Any, *, mode: str, symbols: Sequence[str], model: str, records: Records,
                 broker: Any, until_us: int | None = None, sessions_dir: Path | None = None,
                 hooks: Sequence[Any] = (), use_risk: bool = True, session_id: str | None = None) -> Trader:
    """A trader with the backtest's execution/env params and filters (``evaluate.backtest.backtest_params``),
    the sessions metadata's standardisation, the resolved (pinned) policy and a new recorded session."""
    from rltrader.evaluate.backtest import backtest_params
    from rltrader.live.policy import resolve

    if mode not in ("paper", "testnet", "live"):
        raise ConfigError(f"trade --mode {mode}: choose paper, testnet or live")
    bt = settings.backtest
    execution, env_params = backtest_params(settings)
    resolved = resolve(settings, model, env_params.mode, bt.seed)
    meta_mode = getattr(resolved.policy, "meta", {}).get("mode")
    if meta_mode is not None and meta_mode != env_params.mode:
        raise ConfigError(f"trader: the model was trained for env.mode {meta_mode!r}, params say {env_params.mode!r}")
    norm = Normalization.from_sessions(Path(sessions_dir or settings.data.dir / "sessions"))
    session_id = session_id or new_session_id()
    xp = execution.to_array()
    if hasattr(broker, "xp"):
        broker.xp = xp  # the broker fills/books with the same execution params
    from rltrader.live.risk import RiskEngine, RiskLimits

    risk = RiskEngine(RiskLimits.from_settings(settings.risk), records, xp, session_id) if use_risk else None
    gateway = OrderGateway(broker, records, session_id, xp, [*hooks, *([risk] if risk is not None else [])])
    records.start_session(session_id, mode=mode, model=resolved.uri, model_version=resolved.version,
                          symbols=list(symbols), params={"initial_cash": execution.initial_cash,
                                                         "execution": execution.as_dict(),
                                                         "env": env_params.as_dict(), "model_spec": model})
    trader = Trader(policy=resolved.policy, policy_name=resolved.uri, model_version=resolved.version,
                    execution=execution, env_params=env_params, norm=norm, feature_settings=settings.features,
                    symbols=symbols, gateway=gateway, records=records, session_id=session_id,
                    repeat_cycles=bt.repeat_cycles, until_us=until_us, interval=settings.ingest.interval,
                    filters=BacktestFilters.from_settings(bt),
                    realtime_priority=settings.trader.realtime_priority)
    trader.resolved = resolved
    trader.risk = risk
    return trader
