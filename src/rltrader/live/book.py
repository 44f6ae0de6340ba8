"""One symbol's live state for the trader (``live.trader``): the bar/feature buffers, the account, the env's fields
and the filters' state, laid out as the env kernels read them (one account); the train split's feature statistics
the rows are standardised with are ``dataset.normalization``'s (re-exported here). Kept apart from the decision
loop so the loop reads as the steps it runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rltrader.dataset.normalization import Normalization as Normalization  # re-exported for the trader
from rltrader.env.core import N_PTR, N_STATE, P_END, P_START, P_T
from rltrader.env.modes import E_N_BUYS, E_PEAK, E_PREV_EQUITY, N_ENV_FIELDS, EnvParams
from rltrader.evaluate.backtest.decisions import FS_LAST_FILL, FilterArrays
from rltrader.evaluate.filters import BacktestFilters
from rltrader.execution import AVG_ENTRY, EQUITY, FEES, N_FIELDS, QTY, reset_account
from rltrader.live.gateway import Bar

FAR = 1 << 60
"""``P_END`` when the run has no known end (``time_left`` ≈ 1)."""


class BookView:
    """What rule baselines' ``bind`` reads of an env (context, bars, pointers, params), over one symbol's book."""

    def __init__(self, book: SymbolBook, params: EnvParams) -> None:
        self.core = self
        self.data = self
        self.book, self.params = book, params
        self.context = book.context
        self.n_actions = book.mask.shape[1]
        self.num_envs = 1

    @property
    def bars(self) -> np.ndarray:
        return self.book.bars

    @property
    def ptr(self) -> np.ndarray:
        return self.book.ptr

    def rule_actions(self) -> np.ndarray:
        from rltrader.env.modes import lowrider_rule

        b = self.book
        t = int(b.ptr[P_T, 0])
        return lowrider_rule(b.bars[3, t - 1:t], b.acct[QTY], b.acct[AVG_ENTRY], b.env[E_N_BUYS], b.mask,
                             self.params)


@dataclass
class SymbolBook:
    """One symbol's live state: bar/feature buffers (compacted when full), the account and the env's fields."""

    symbol: str
    context: int
    n_features: int
    n_actions: int
    latency: int
    initial_cash: float
    capacity: int = 4096
    bars: np.ndarray = field(init=False)
    time: np.ndarray = field(init=False)
    feats: np.ndarray = field(init=False)
    n: int = 0
    run: int = 0
    """Consecutive valid, contiguous rows ending at the last one (the current stretch's length)."""
    last_time: int | None = None
    acct: np.ndarray = field(init=False)
    env: np.ndarray = field(init=False)
    ptr: np.ndarray = field(init=False)
    pending: np.ndarray = field(init=False)
    k: int = 0
    fees_carry: float = 0.0
    decided: int | None = None
    """Open time of the bar the last decision was for."""
    filter_state: np.ndarray = field(init=False)
    """The backtest filters' per-account state (``decisions.FilterArrays.state``, one column; its last-fill bar
    is a row of ``time``)."""
    unbooked: list[str] = field(default_factory=list)
    """A resumed session: client ids of journaled fills after the bar it handles again first, booked when its
    recomputed decision finds the order filled, or after that decision in any case."""

    def __post_init__(self) -> None:
        self.bars = np.zeros((5, self.capacity))
        self.time = np.zeros(self.capacity, np.int64)
        self.feats = np.zeros((self.capacity, self.n_features), np.float32)
        self.acct = np.zeros((N_FIELDS, 1))
        reset_account(self.acct, 0, self.initial_cash)
        self.env = np.zeros((N_ENV_FIELDS, 1))
        self.env[E_PREV_EQUITY, 0] = self.env[E_PEAK, 0] = self.initial_cash
        self.ptr = np.zeros((N_PTR, 1), np.int64)
        self.pending = np.zeros((1, self.latency + 1))
        self.window = np.zeros((1, self.context, self.n_features), np.float32)
        self.state = np.zeros((1, N_STATE), np.float32)
        self.mask = np.zeros((1, self.n_actions), np.bool_)
        self.scorer: Any = None
        """The policy module's forward bound to this book's window/state buffers (``bound_scores``)."""
        self.scorer_of: Any = None
        self.filter_state = FilterArrays.create(BacktestFilters(), "futures_session", 1).state

    def append(self, bar: Bar, row: np.ndarray | None) -> None:
        """Add a closed bar (``row`` None: its features are not valid); keeps the last rows when full (always
        one free row after it: the next bar's, whose open time the filters read at decision time)."""
        if self.n >= self.capacity - 1:
            keep = self.context + 1
            s = self.n - keep
            self.bars[:, :keep] = self.bars[:, s:self.n]
            self.time[:keep] = self.time[s:self.n]
            self.feats[:keep] = self.feats[s:self.n]
            self.n = keep
            for p in (P_T, P_START, P_END):
                if self.ptr[p, 0] < FAR // 2:
                    self.ptr[p, 0] -= s
            self.filter_state[FS_LAST_FILL, 0] -= s  # a row index too (a far-past one stays far past)
        i = self.n
        self.bars[:, i] = (bar.open, bar.high, bar.low, bar.close, bar.volume)
        self.time[i] = bar.time
        contiguous = self.last_time is not None and bar.time - self.last_time == 60_000_000
        self.feats[i] = np.nan if row is None else row
        self.run = 0 if row is None else (self.run + 1 if contiguous else 1)
        self.last_time = bar.time
        self.n = i + 1

    def committed(self) -> float:
        return float(self.acct[QTY, 0] + self.pending[0].sum())

    @property
    def equity(self) -> float:
        return float(self.acct[EQUITY, 0])

    @property
    def fees(self) -> float:
        return float(self.acct[FEES, 0] + self.fees_carry)


@dataclass
class Decision:
    symbol: str
    bar_time: int
    action: int
    scores: np.ndarray | None
    target: float | None
    reason: str
