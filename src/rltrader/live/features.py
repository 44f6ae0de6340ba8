"""Incremental features: the batch ``features`` stage (:mod:`rltrader.dataset.features`) one closed bar at a time.

Why a second formulation exists at all: the batch stage is polars over a whole history, which is the right tool
for a dataset and the wrong one for a trader that must answer within a millisecond of a candle closing.
Recomputing polars over the window every bar costs milliseconds and grows with the window; this module keeps
the rolling state (EWM values, ring buffers of the last ``window`` inputs) in numpy arrays and updates it in
one numba call per bar: O(1) for the recursive indicators, O(window) for the rolling means/deviations, which
are recomputed from the ring with two passes (exact, unlike add/subtract running sums whose rounding error
grows with the run length).

The definitions are the batch stage's, term for term, in the same column order (``feature_spec``):

- polars ``ewm_mean(adjust=False)``: ``y_0 = x_0``, ``y_t = (1-α)·y_{t-1} + α·x_t``, null until
  ``min_samples`` observations; MACD's signal starts at the first defined MACD value (``ignore_nulls``);
- ATR: Wilder's smoothing seeded with the mean of the first ``n`` true ranges (the first true range is
  ``high - low``: no previous close);
- rolling std: ``ddof=0`` for Bollinger, polars' default ``ddof=1`` for the realized volatility and z-scores;
- a gap (a bar that is not exactly one interval after the previous one) restarts every window, as the batch
  stage's ``segment`` does, so the warm-up rows after a gap are NaN again;
- values are cast to float32 and anything non-finite becomes NaN (the batch stage's null): a bar with a NaN
  feature is not ``valid`` and a trader takes no new risk on it.

``tests/test_live_features.py`` checks equality with the batch stage (1e-6 relative after warm-up) on real bars.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from rltrader.config import FeatureSettings
from rltrader.data.schema import interval_us
from rltrader.dataset.features import feature_spec

DAY_US = 86_400_000_000
# rows of the ring buffer
R_LOGC, R_CLOSE, R_RET, R_LVOL, R_LTRADES, R_TR = range(6)
N_RINGS = 6
# scalar state slots (EWMs for the EMAs follow S_EMA0 on, one per span)
S_N, S_LAST_T, S_UP, S_DOWN, S_SIG, S_SIG_N, S_ATR, S_EMA_FAST, S_EMA_SLOW, S_EMA0 = range(10)
# integer parameters: fixed slots, then the variable-length lists (offsets in the fixed slots)
I_RSI, I_BOLL, I_ATR, I_ZWIN, I_FAST, I_SLOW, I_SIGNAL, I_CAP, I_NH, I_NE, I_NV, I_STEP = range(12)
I_LISTS = 12


@njit(cache=True, inline="always")
def _lag(ring: np.ndarray, row: int, n: int, k: int, cap: int) -> float:
    """Value of ring ``row`` ``k`` bars before bar ``n`` (0-based index since the segment start)."""
    return float(ring[row, (n - k) % cap])


@njit(cache=True, inline="always", error_model="numpy")
def _mean_std(ring: np.ndarray, row: int, n: int, w: int, cap: int, ddof: int) -> tuple[float, float]:
    """Mean and standard deviation of the last ``w`` values (two passes: exact for a window of any age)."""
    s = 0.0
    for k in range(w):
        s += ring[row, (n - k) % cap]
    mean = s / w
    ss = 0.0
    for k in range(w):
        d = ring[row, (n - k) % cap] - mean
        ss += d * d
    return mean, math.sqrt(ss / (w - ddof)) if w - ddof > 0 else math.nan


@njit(cache=True, inline="always")
def _ewm(prev: float, x: float, alpha: float, n: int) -> float:
    return x if n == 0 else (1.0 - alpha) * prev + alpha * x


@njit(cache=True, error_model="numpy")  # x/0 → inf/NaN as in polars, not an exception
def update_features(st: np.ndarray, ring: np.ndarray, ip: np.ndarray, fp: np.ndarray, t_us: int, o: float,
                    h: float, lo: float, c: float, v: float, trades: float, taker_buy: float,
                    out: np.ndarray) -> bool:
    """Advance the state by one closed bar and write its feature row into ``out`` (float32, NaN = undefined).

    Returns True when every feature is defined (the batch stage's ``valid``). ``ip``/``fp`` are the packed
    integer and float parameters (``IncrementalFeatures``); ``st``/``ring`` the state it owns.
    """
    step = ip[I_STEP]
    if st[S_N] > 0 and t_us - int(st[S_LAST_T]) != step:
        st[S_N] = 0.0  # a gap: every window restarts (the batch stage's new segment)
    n = int(st[S_N])
    cap = ip[I_CAP]
    st[S_LAST_T] = t_us
    i = n % cap
    logc = math.log(c) if c > 0.0 else math.nan
    prev_c = ring[R_CLOSE, (n - 1) % cap] if n > 0 else math.nan
    ring[R_LOGC, i] = logc
    ring[R_CLOSE, i] = c
    ring[R_RET, i] = logc - ring[R_LOGC, (n - 1) % cap] if n > 0 else math.nan
    ring[R_LVOL, i] = math.log1p(v)
    ring[R_LTRADES, i] = math.log1p(trades)
    ring[R_TR, i] = (max(h, prev_c) - min(lo, prev_c)) if n > 0 else h - lo
    nh, ne, nv = ip[I_NH], ip[I_NE], ip[I_NV]
    horizons = ip[I_LISTS:I_LISTS + nh]
    spans = ip[I_LISTS + nh:I_LISTS + nh + ne]
    windows = ip[I_LISTS + nh + ne:I_LISTS + nh + ne + nv]
    k = 0
    nan = math.nan
    # returns
    for j in range(nh):
        hz = horizons[j]
        out[k] = logc - _lag(ring, R_LOGC, n, hz, cap) if n >= hz else nan
        k += 1
    # RSI: Wilder-style EWMs of up/down moves; the first diff is 0 (fill_null)
    rsi_n = ip[I_RSI]
    diff = c - prev_c if n > 0 else 0.0
    up = diff if diff > 0.0 else 0.0
    down = -diff if diff < 0.0 else 0.0
    a_rsi = 1.0 / rsi_n
    st[S_UP] = _ewm(st[S_UP], up, a_rsi, n)
    st[S_DOWN] = _ewm(st[S_DOWN], down, a_rsi, n)
    if n + 1 >= rsi_n:
        rsi = 100.0 if st[S_DOWN] == 0.0 else 100.0 - 100.0 / (1.0 + st[S_UP] / st[S_DOWN])
        out[k] = (rsi - 50.0) / 50.0
    else:
        out[k] = nan
    k += 1
    # EMA distances
    for j in range(ne):
        span = spans[j]
        st[S_EMA0 + j] = _ewm(st[S_EMA0 + j], c, 2.0 / (span + 1.0), n)
        out[k] = c / st[S_EMA0 + j] - 1.0 if n + 1 >= span else nan
        k += 1
    # MACD
    fast, slow, signal = ip[I_FAST], ip[I_SLOW], ip[I_SIGNAL]
    st[S_EMA_FAST] = _ewm(st[S_EMA_FAST], c, 2.0 / (fast + 1.0), n)
    st[S_EMA_SLOW] = _ewm(st[S_EMA_SLOW], c, 2.0 / (slow + 1.0), n)
    macd = nan
    sig = nan
    if n + 1 >= slow and n + 1 >= fast:
        macd = st[S_EMA_FAST] - st[S_EMA_SLOW]
        m = int(st[S_SIG_N])
        st[S_SIG] = _ewm(st[S_SIG], macd, 2.0 / (signal + 1.0), m)
        st[S_SIG_N] = m + 1
        if m + 1 >= signal:
            sig = st[S_SIG]
    else:
        st[S_SIG_N] = 0.0
    out[k] = macd / c
    out[k + 1] = sig / c
    out[k + 2] = (macd - sig) / c
    k += 3
    # Bollinger (ddof 0)
    bw = ip[I_BOLL]
    if n + 1 >= bw:
        mavg, mstd = _mean_std(ring, R_CLOSE, n, bw, cap, 0)
        hband = mavg + fp[0] * mstd
        lband = mavg - fp[0] * mstd
        out[k] = (c - lband) / (hband - lband) if hband != lband else nan
        out[k + 1] = (hband - lband) / mavg * 100.0 / 100.0
    else:
        out[k] = nan
        out[k + 1] = nan
    k += 2
    # ATR: Wilder, seeded with the mean of the first n true ranges
    an = ip[I_ATR]
    if n + 1 == an:
        s = 0.0
        for j in range(an):
            s += ring[R_TR, (n - j) % cap]
        st[S_ATR] = s / an
    elif n + 1 > an:
        st[S_ATR] = st[S_ATR] * (1.0 - 1.0 / an) + ring[R_TR, i] / an
    out[k] = st[S_ATR] / c if n + 1 >= an else nan
    k += 1
    # realized volatility of 1-bar log returns (ddof 1; the first return is undefined)
    for j in range(nv):
        w = windows[j]
        out[k] = _mean_std(ring, R_RET, n, w, cap, 1)[1] if n >= w else nan
        k += 1
    # z-scores of log1p(volume), log1p(trades) (ddof 1; a flat window scores 0)
    zw = ip[I_ZWIN]
    for row in (R_LVOL, R_LTRADES):
        if n + 1 >= zw:
            mean, std = _mean_std(ring, row, n, zw, cap, 1)
            out[k] = (ring[row, i] - mean) / std if std > 0.0 else 0.0
        else:
            out[k] = nan
        k += 1
    out[k] = taker_buy / v if v > 0.0 else 0.5
    k += 1
    # calendar (UTC): minute of day and day of week (Monday = 0) on the unit circle
    day = t_us // DAY_US
    minute = float((t_us - day * DAY_US) // 60_000_000)
    dow = float((day + 3) % 7) + minute / 1440.0
    out[k] = math.sin(minute * (2 * math.pi / 1440))
    out[k + 1] = math.cos(minute * (2 * math.pi / 1440))
    out[k + 2] = math.sin(dow * (2 * math.pi / 7))
    out[k + 3] = math.cos(dow * (2 * math.pi / 7))
    k += 4
    st[S_N] = n + 1
    valid = True
    for j in range(k):
        x = np.float32(out[j])
        if not math.isfinite(x):
            out[j] = nan
            valid = False
        else:
            out[j] = x
    return valid


class IncrementalFeatures:
    """Rolling feature state of one symbol: ``update(bar)`` → the batch stage's feature row for that bar."""

    def __init__(self, p: FeatureSettings, interval: str = "1m") -> None:
        spec = feature_spec(p)
        self.names = spec.names
        self.warmup = spec.warmup
        fast, slow, signal = p.macd
        cap = max(max(p.return_horizons) + 1, p.bollinger, max(p.volatility) + 1, p.zscore_window, p.atr)
        step = interval_us(interval)
        fixed = [p.rsi, p.bollinger, p.atr, p.zscore_window, fast, slow, signal, cap, len(p.return_horizons),
                 len(p.ema), len(p.volatility), step]
        self.ip = np.array([*fixed, *p.return_horizons, *p.ema, *p.volatility], np.int64)
        self.fp = np.array([p.bollinger_dev], np.float64)
        self.st = np.zeros(S_EMA0 + len(p.ema))
        self.ring = np.full((N_RINGS, cap), np.nan)
        self.out = np.full(len(self.names), np.nan)
        self.row = np.full(len(self.names), np.nan, np.float32)

    @property
    def n_features(self) -> int:
        return len(self.names)

    @property
    def bars_in_segment(self) -> int:
        """Bars since the last gap (the batch stage's position within its segment)."""
        return int(self.st[S_N])

    def reset(self) -> None:
        self.st[:] = 0.0
        self.ring[:] = np.nan

    def update(self, open_time_us: int, o: float, h: float, lo: float, c: float, v: float, trades: float,
               taker_buy_volume: float) -> tuple[np.ndarray, bool]:
        """The next closed bar → (float32 feature row, valid). The row is a reused buffer: copy to keep it."""
        valid = update_features(self.st, self.ring, self.ip, self.fp, int(open_time_us), float(o), float(h),
                                float(lo), float(c), float(v), float(trades), float(taker_buy_volume), self.out)
        self.row[:] = self.out
        return self.row, bool(valid)

    def run(self, open_time_us: np.ndarray, o: np.ndarray, h: np.ndarray, lo: np.ndarray, c: np.ndarray,
            v: np.ndarray, trades: np.ndarray, taker_buy_volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Many bars in order (a warm-up from stored history, tests): (n, F) float32 rows and the valid flags."""
        n = len(open_time_us)
        rows = np.empty((n, self.n_features), np.float32)
        valid = np.empty(n, bool)
        for j in range(n):
            r, ok = self.update(int(open_time_us[j]), o[j], h[j], lo[j], c[j], v[j], trades[j], taker_buy_volume[j])
            rows[j] = r
            valid[j] = ok
        return rows, valid
