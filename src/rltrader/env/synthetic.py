"""Synthetic ``SessionSet``s: random-walk prices for tests and benchmarks that must not depend on real data."""

from __future__ import annotations

import numpy as np

from rltrader.dataset.split import SessionSet


def synthetic_sessions(n_symbols: int = 3, bars_per_symbol: int = 400, n_features: int = 6, context: int = 30,
                       length: int = 10, gap: int = 3, volatility: float = 0.002, volume: float = 5_000.0,
                       seed: int = 0) -> SessionSet:
    """Geometric random walks per symbol (price ~100·k, 1-minute bars), Gaussian features, and sessions of
    ``length`` bars after ``context`` bars of each symbol, ``gap`` bars apart (so sessions are not contiguous)."""
    rng = np.random.default_rng(seed)
    n = n_symbols * bars_per_symbol
    close, open_ = np.empty(n), np.empty(n)
    for s in range(n_symbols):
        lr = rng.normal(0.0, volatility, bars_per_symbol)
        c = 100.0 * (s + 1) * np.exp(np.cumsum(lr))
        rows = slice(s * bars_per_symbol, (s + 1) * bars_per_symbol)
        close[rows] = c
        open_[rows] = np.concatenate([[c[0] * np.exp(-lr[0])], c[:-1]])
    wick = rng.uniform(0.0, volatility, (2, n))
    high = np.maximum(open_, close) * (1.0 + wick[0])
    low = np.minimum(open_, close) * (1.0 - wick[1])
    starts = [s * bars_per_symbol + st for s in range(n_symbols)
              for st in range(context, bars_per_symbol - length + 1, length + gap)]
    start = np.asarray(starts, np.int64)
    features = rng.normal(size=(n, n_features)).astype(np.float32)  # drawn before the volumes, as always
    # the price columns as the rows of one (5, N) block: every env over the set reads it in place (env.core.bars_block)
    bars = np.stack([open_, high, low, close, rng.uniform(0.2, 1.8, n) * volume])
    return SessionSet(
        features=features, open=bars[0], high=bars[1], low=bars[2], close=bars[3], volume=bars[4],
        time=np.tile(np.arange(bars_per_symbol, dtype=np.int64) * 60_000_000, n_symbols),
        symbol_id=np.repeat(np.arange(n_symbols, dtype=np.int16), bars_per_symbol),
        ctx_start=start - context, start=start, end=start + length,
        symbols=tuple(f"SYM{i}USDT" for i in range(n_symbols)),
        feature_names=tuple(f"f{i}" for i in range(n_features)), context=context, length=length)
