"""Backtest throughput: our engine against backtesting.py and vectorbt on the same SMA cross with the same fee,
plus a trained agent over the backtest split: the split network (window part of the net precomputed in batches,
the state-dependent rest in the numba loop) against our generic stepped path (one forward pass per bar).

Prints one JSON line per figure: ``{"metric", "value", "unit", "peer", "peer_value", "ratio"}`` (ratio = ours /
peer, > 1 better). ``--quick`` (< 60 s): backtesting.py on a smaller subset (named in the peer field), the agent
on the first bars of each stretch.

Our SMA run is checked against the every-bar loop (``fast=False``: the env's full step on every bar) on the same
data, every frame identical, before the figures are printed.

Data: every gap-free stretch of valid bars of ``data/features/*.parquet`` (the real futures data), concatenated
(≥ 1 M bars); a 1 M-bar random walk when the features are absent. Our run is end to end: vectorised SMA
decisions, one numba loop (bars that send no order and book nothing: the execution model's mark only; the others
through the env's step kernel and the execution model: fees, slippage off to match the peers, which charge the
fee only), and the result frames (equity curve, fills, round trips, daily returns). The
peers run one series: vectorbt ``Portfolio.from_signals`` (long-only entries/exits on crossovers; warm: run
once before timing) and backtesting.py's standard ``SmaCross`` strategy (``position.close(); buy()/sell()``).

Timing: CPU seconds of this process (``time.process_time``), best of 3 (quick) or 5 runs for ours and vectorbt,
each warmed by one untimed run on the same data (compiled, memory touched) and timed with the garbage collector
paused (``no_gc``), so that other processes on a shared box and a stray collection do not count against either
side. The SMA line carries where our best run's time went: CPU seconds per phase
(``setup_cpu_s``: env arrays and event log; ``decisions_cpu_s``: the vectorised SMA signals; ``loop_cpu_s``: the
numba run loop, also as ``kernel_ns_per_bar``; ``frames_cpu_s``: the result frames) and, in wall seconds,
``decisions_and_kernel_wall_s`` / ``setup_and_frames_wall_s`` (polars may use more than one thread in the frames).
"""

from __future__ import annotations

import gc
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import _harness as h
import numpy as np
import polars as pl

from rltrader.dataset.split import SessionSet
from rltrader.env import EnvParams, ExecutionParams
from rltrader.evaluate.backtest import backtest_sessions

FAST, SLOW, CONTEXT, FEE = 5, 20, 30, 0.0005


@contextmanager
def no_gc() -> Iterator[None]:
    """Collect first, then keep Python's cyclic garbage collector out of the timed run (as ``timeit`` does):
    a collection triggered by whoever allocates last costs tens of ms with torch and polars loaded, and would
    land on one side at random. Applied to ours and to vectorbt alike."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def emit(metric: str, value: float, unit: str, peer: str | None, peer_value: float | None) -> None:
    h.emit(h.line(metric, value, unit, peer, peer_value, digits=1, ratio_value=h.ratio(value, peer_value)))


def load_bars(features_dir: Path, min_bars: int) -> tuple[SessionSet, str]:
    """Gap-free valid stretches of every symbol as one variable-length SessionSet without features."""
    files = sorted(features_dir.glob("*.parquet"))
    parts, ctx, st, en, symbols = [], [], [], [], []
    offset = 0
    for i, f in enumerate(files):
        df = pl.read_parquet(f, columns=["open_time", "open", "high", "low", "close", "volume", "segment", "valid"])
        valid, seg = df["valid"].to_numpy(), df["segment"].to_numpy()
        brk = np.ones(len(df), bool)
        brk[1:] = (seg[1:] != seg[:-1]) | (valid[1:] != valid[:-1])
        first = np.flatnonzero(brk)
        last = np.concatenate([first[1:], [len(df)]])
        keep = valid[first] & (last - first > CONTEXT)
        first, last = first[keep], last[keep]
        take = np.concatenate([np.arange(a, b) for a, b in zip(first, last, strict=True)])
        parts.append(df[take].with_columns(pl.lit(i, pl.Int16).alias("sym")))
        lens = last - first
        b0 = offset + np.concatenate([[0], np.cumsum(lens)[:-1]])
        ctx.append(b0)
        st.append(b0 + CONTEXT)
        en.append(b0 + lens)
        offset += len(take)
        symbols.append(f.stem)
    if offset >= min_bars:
        d = pl.concat(parts)
        source = f"real futures data, {len(files)} symbols"
        arrays = {k: d[k].to_numpy().astype(np.float64) for k in ("open", "high", "low", "close", "volume")}
        t = d["open_time"].dt.epoch("us").to_numpy()
        sym = d["sym"].to_numpy()
        c, s, e = (np.concatenate(x) for x in (ctx, st, en))
    else:  # synthetic 1 M-bar random walk
        n = min_bars + CONTEXT
        rng = np.random.default_rng(0)
        close = 100 * np.exp(np.cumsum(rng.normal(0, 0.001, n)))
        open_ = np.concatenate([[100.0], close[:-1]])
        arrays = {"open": open_, "high": np.maximum(open_, close) * 1.0005, "low": np.minimum(open_, close) * 0.9995,
                  "close": close, "volume": rng.uniform(500, 1500, n)}
        t = np.arange(n, dtype=np.int64) * 60_000_000
        sym = np.zeros(n, np.int16)
        c, s, e = np.array([0]), np.array([CONTEXT]), np.array([n])
        symbols, source = ["SYNTHUSDT"], "synthetic 1M-bar random walk"
    bars = np.stack([arrays[k] for k in ("open", "high", "low", "close", "volume")])  # one block, as continuous_split
    data = SessionSet(features=np.zeros((len(t), 0), np.float32), open=bars[0], high=bars[1],
                      low=bars[2], close=bars[3], volume=bars[4], time=t.astype(np.int64),
                      symbol_id=sym.astype(np.int16), ctx_start=c, start=s, end=e, symbols=tuple(symbols),
                      feature_names=(), context=CONTEXT, length=0)
    return data, source


def sma_signals(close: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cs = np.concatenate([[0.0], np.cumsum(close)])
    n = len(close)
    fast = np.full(n, np.nan)
    slow = np.full(n, np.nan)
    fast[FAST - 1:] = (cs[FAST:] - cs[:-FAST]) / FAST
    slow[SLOW - 1:] = (cs[SLOW:] - cs[:-SLOW]) / SLOW
    up = fast > slow
    prev = np.concatenate([[False], up[:-1]])
    return up & ~prev, ~up & prev & ~np.isnan(slow)


def ours(data: SessionSet, repeats: int) -> tuple[float, dict[str, float]]:
    """(bars/s of the best of ``repeats`` end-to-end runs, where that run's CPU time went)."""
    ex = ExecutionParams(taker_fee=FEE, half_spread_bps=0.0, impact=0.0)
    n = float((data.end - data.start).sum())
    backtest_sessions(data, "sma_cross", ex, EnvParams(), chain=True)  # warm (compiled, memory touched): as vectorbt
    best, split = float("inf"), {}
    for _ in range(repeats):
        with no_gc():
            t0, w0 = time.process_time(), time.perf_counter()
            res = backtest_sessions(data, "sma_cross", ex, EnvParams(), chain=True)
            dt, wall = time.process_time() - t0, time.perf_counter() - w0
        if dt < best:
            run_s = float(res.meta["run_seconds"])  # wall seconds of decisions + the numba loop (one thread)
            cpu = res.meta["cpu_seconds"]  # CPU seconds per phase of the same run
            best, split = dt, {"cpu_s": round(dt, 3), "wall_s": round(wall, 3),
                               "decisions_and_kernel_wall_s": round(run_s, 3),
                               "setup_and_frames_wall_s": round(wall - run_s, 3),
                               **{f"{k}_cpu_s": round(v, 4) for k, v in cpu.items()},
                               "kernel_ns_per_bar": round(cpu["loop"] / n * 1e9, 1)}
        assert res.totals["bars"] == n
        del res  # like vectorbt's run, which keeps only the final value: the next run does not hold two results
    # the quiet-bar loop must give the every-bar loop's run, frame for frame (untimed)
    fast = backtest_sessions(data, "sma_cross", ex, EnvParams(), chain=True)
    slow = backtest_sessions(data, "sma_cross", ex, EnvParams(), chain=True, fast=False)
    for name in ("equity", "fills", "trades", "daily", "stretches"):
        assert getattr(fast, name).equals(getattr(slow, name)), f"quiet-bar and every-bar loops differ: {name}"
    assert fast.totals == slow.totals and np.array_equal(fast.events, slow.events)
    return n / best, split


def vectorbt_run(close: np.ndarray, repeats: int) -> float:
    import pandas as pd
    import vectorbt as vbt

    s = pd.Series(close, index=pd.date_range("2020-01-01", periods=len(close), freq="1min"))

    def run() -> Any:
        entries, exits = sma_signals(close)
        return vbt.Portfolio.from_signals(s, entries, exits, fees=FEE, freq="1min").final_value()

    run()  # warm: numba compilation
    best = float("inf")
    for _ in range(repeats):
        with no_gc():
            t0 = time.process_time()
            run()
            best = min(best, time.process_time() - t0)
    return len(close) / best


def backtesting_run(data: SessionSet, n: int) -> float:
    import pandas as pd
    from backtesting import Backtest, Strategy
    from backtesting.lib import crossover
    from backtesting.test import SMA

    class SmaCross(Strategy):  # type: ignore[misc]
        n1, n2 = FAST, SLOW

        def init(self) -> None:
            self.sma1 = self.I(SMA, self.data.Close, self.n1)
            self.sma2 = self.I(SMA, self.data.Close, self.n2)

        def next(self) -> None:
            if crossover(self.sma1, self.sma2):
                self.position.close()
                self.buy()
            elif crossover(self.sma2, self.sma1):
                self.position.close()
                self.sell()

    df = pd.DataFrame({"Open": data.open[:n], "High": data.high[:n], "Low": data.low[:n], "Close": data.close[:n],
                       "Volume": data.volume[:n]}, index=pd.date_range("2020-01-01", periods=n, freq="1min"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bt = Backtest(df, SmaCross, commission=FEE, cash=1e9)
        t0 = time.process_time()
        bt.run()
    return n / (time.process_time() - t0)


def agent(quick: bool) -> tuple[float, float, str] | None:
    """A trained agent (data/models/d3qn.pt, else a randomly initialised demo-size D3QN net) over the backtest
    split: bars/s of the whole run with the split network (window part precomputed in batches, the rest in the
    numba loop) and with the generic stepped path (one batched forward pass per bar over all symbols), which
    must give the same fills, equity and trades."""
    import torch

    from rltrader.config import load_settings
    from rltrader.evaluate.backtest import BacktestFilters, backtest_params, continuous_split

    settings = load_settings()
    try:
        data = continuous_split(settings, "backtest")
    except Exception:
        return None
    torch.set_num_threads(1)
    execution, env_params = backtest_params(settings)
    path = Path("data/models/d3qn.pt")
    if path.exists():
        module = torch.load(path, map_location="cpu", weights_only=False)
        what = "trained d3qn.pt"
    else:  # no trained model: a randomly initialised net of the demo size (params.yaml d3qn.net)
        from rltrader.agents.networks import DuelingQNet, NetConfig
        from rltrader.agents.packaging import PolicyModule
        from rltrader.env.core import N_STATE

        n_actions = env_params.n_actions
        net = DuelingQNet(data.n_features, data.context, N_STATE, n_actions, NetConfig(**settings.d3qn.get("net", {})))
        module = PolicyModule(net, "q_values", data.context, data.n_features, N_STATE, n_actions)
        what = "random-init demo-size D3QN (no data/models/d3qn.pt)"
    if quick:
        data = replace(data, end=np.minimum(data.end, data.start + 3000))
        what += ", first 3000 bars of each stretch"

    def run(fast: bool, d: SessionSet) -> tuple[float, Any]:
        t0 = time.perf_counter()
        res = backtest_sessions(d, module, execution, env_params, BacktestFilters(), chain=True, fast=fast)
        return res.totals["bars"] / (time.perf_counter() - t0), res

    small = replace(data, end=np.minimum(data.end, data.start + 200))
    run(True, small)  # compile / warm both paths
    run(False, small)
    fast_bps, fast = run(True, data)
    generic_bps, generic = run(False, data)
    assert fast.meta["path"].startswith("split network"), fast.meta["path"]
    for name in ("fills", "trades", "equity"):
        assert getattr(fast, name).equals(getattr(generic, name)), f"split network and generic path differ: {name}"
    n = int(fast.totals["bars"])
    return fast_bps, generic_bps, f"{what}, backtest split, {n} bars, {int(fast.totals['fills'])} fills, identical"


def main() -> None:
    ap = h.parser(__doc__)
    ap.add_argument("--features-dir", default="data/features")
    args = ap.parse_args()
    data, source = load_bars(Path(args.features_dir), 1_000_000)
    n = int((data.end - data.start).sum())
    repeats = 3 if args.quick else 5
    ours_bps, split = ours(data, repeats)
    vbt_bps = vectorbt_run(data.close, repeats)
    h.emit(h.line("backtest_sma_cross_bars_per_s", ours_bps, "bars/s",
                  f"vectorbt from_signals warm ({len(data.close)} bars, one series; {source})", vbt_bps, digits=1,
                  ratio_value=h.ratio(ours_bps, vbt_bps), **split))
    n_bt = 30_000 if args.quick else 200_000
    bt_bps = backtesting_run(data, n_bt)
    emit("backtest_sma_cross_bars_per_s", ours_bps, "bars/s",
         f"backtesting.py SmaCross ({n_bt} bar subset; ours on {n} bars)", bt_bps)
    got = agent(args.quick)
    if got is not None:
        emit("backtest_agent_bars_per_s", got[0], "bars/s",
             f"generic stepped (ours, before): one batched forward pass per bar ({got[2]})", got[1])


if __name__ == "__main__":
    main()
