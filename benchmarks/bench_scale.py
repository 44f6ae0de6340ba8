"""Growth: the features + sessions stages and a continuous backtest over 1×, 4× and 16× the default data.

    python benchmarks/bench_scale.py [--quick] [--bars N] [--sizes 1,4,16] [--stages features,sessions]
                                     [--peer-src /tmp/before/src]

Data: the default run has ``ingest.symbols`` (6) symbols; size k has 6·k synthetic symbols of ``--bars`` 1m bars
each (default 300 k ≈ the real data's 1.9 M rows / 6 per symbol; ``--quick``: 8 k). Each synthetic symbol is a
block bootstrap of a real symbol's bars (blocks of 240 consecutive bars drawn with replacement from the shared
archive's LINKUSDT month: log return, open gap, high/low excursions, volume, trade count and taker ratio move
together, so volatility clustering within a block and the cross-column structure are real); a price path is
rebuilt from the drawn returns. Sessions splits are the default's four, placed at 60/15/15/10 % of the span.

Per size, a fresh subprocess (this script with a hidden flag) writes the symbols into a temporary ParquetStore
one at a time (untimed); then ``run_features_stage``, ``run_sessions_stage`` and ``run_backtest(settings,
"sma_cross")`` (the public API) each run in their own fresh subprocess, timed, with the peak-RSS increment over
the RSS before the call (``VmHWM`` after resetting the kernel's peak mark through ``/proc/self/clear_refs``;
``ru_maxrss`` where the reset is refused). ``--quick`` runs a size's fill and three stages in ONE subprocess
(process start-up would otherwise take most of the minute): a later stage's peak is then measured over the heap
the earlier ones left behind, so quick memory figures understate the sessions and backtest peaks. The
backtest's numba kernels are cached on disk (``cache=True``): the very first run on a
checkout also compiles them inside the 1× backtest timer; run the script twice there. One JSON line per stage
and size, then per stage the growth figures::

    {"metric": "scale_<stage>_time_growth", "value": t(16×)/t(1×), "unit": "x", "peer": "linear", "peer_value": 16,
     "ratio": 16 / value}          # ratio ≥ 1: at most linear
    {"metric": "scale_<stage>_peak_mem_growth", "value": peak(16×) MB, "unit": "MB", "peer": "1× size",
     "peer_value": peak(1×) MB, "ratio": peak(1×) / peak(16×)}   # ≈ 1: bounded, not growing with the data

``--stages`` picks the stages (the later ones read what ``features`` writes, so it always runs). ``--peer-src``
runs every stage a second time, right after ours on the same data, with another source tree's ``rltrader``
(e.g. the commit before a change, from ``git archive <ref> src | tar -x -C /tmp/before``): the per-size lines
then carry that tree's seconds and peak memory as the peer, from the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parent.parent
try:
    import rltrader  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO / "src"))

from rltrader.config import Settings, load_settings  # noqa: E402
from rltrader.data.archive import parse_klines, read_zip_member  # noqa: E402
from rltrader.data.parquet_store import ParquetStore  # noqa: E402
from rltrader.data.schema import KLINE_SCHEMA, Market  # noqa: E402
from rltrader.dataset.build import run_features_stage, run_sessions_stage  # noqa: E402
from rltrader.evaluate.backtest import run_backtest  # noqa: E402

ARCHIVE = Path(os.environ.get("RLTRADER_TEST_ARCHIVE", str(REPO.parent / "shared" / "data" / "binance")))
SOURCE = "futures/um/monthly/klines/LINKUSDT/1m/LINKUSDT-1m-2023-02.zip"
BASE_SYMBOLS = 6
BLOCK = 240
START_US = 1_672_531_200_000_000  # 2023-01-01
STEP_US = 60_000_000
STAGES = ("features", "sessions", "backtest")


def source_rows() -> dict[str, np.ndarray]:
    """Per-bar statistics of the real month the blocks are drawn from."""
    bars = parse_klines(read_zip_member(ARCHIVE / SOURCE), source=SOURCE, market=Market.FUTURES_UM,
                        symbol="LINKUSDT", interval="1m").rows.sort("open_time")
    c = bars["close"].to_numpy()
    return {
        "r": np.diff(np.log(c)),
        "gap": np.log(bars["open"].to_numpy()[1:] / c[:-1]),
        "hi": np.log(bars["high"].to_numpy()[1:] / c[1:]),
        "lo": np.log(bars["low"].to_numpy()[1:] / c[1:]),
        "v": bars["volume"].to_numpy()[1:],
        "n": bars["trades"].to_numpy()[1:],
        "tb": (bars["taker_buy_volume"].to_numpy()[1:] / np.maximum(bars["volume"].to_numpy()[1:], 1e-12)),
    }


def synthetic(src: dict[str, np.ndarray], symbol: str, n: int, seed: int) -> pl.DataFrame:
    """``n`` bars of a block bootstrap of ``src`` (blocks of ``BLOCK`` bars), as the store's kline table."""
    rng = np.random.default_rng(seed)
    m = len(src["r"])
    starts = rng.integers(0, m - BLOCK, size=n // BLOCK + 1)
    idx = (starts[:, None] + np.arange(BLOCK)[None, :]).ravel()[:n]
    d = {k: v[idx] for k, v in src.items()}
    close = rng.uniform(1, 100) * np.exp(np.cumsum(d["r"]))
    prev = np.concatenate([[close[0] / np.exp(d["r"][0])], close[:-1]])
    open_ = prev * np.exp(d["gap"])
    high = np.maximum.reduce([open_, close, close * np.exp(d["hi"])])
    low = np.minimum.reduce([open_, close, close * np.exp(d["lo"])])
    vol = d["v"]
    t = START_US + np.arange(n, dtype=np.int64) * STEP_US
    return pl.DataFrame({
        "market": "futures-um", "symbol": symbol, "interval": "1m",
        "open_time": t, "open": open_, "high": high, "low": low, "close": close, "volume": vol,
        "close_time": t + STEP_US - 1_000, "quote_volume": vol * close, "trades": d["n"].astype(np.int64),
        "taker_buy_volume": vol * d["tb"], "taker_buy_quote_volume": vol * d["tb"] * close,
    }).with_columns(pl.col("open_time", "close_time").cast(pl.Datetime("us", "UTC"))).select(list(KLINE_SCHEMA))


def settings_for(data_dir: Path, symbols: list[str], n: int) -> Settings:
    base = load_settings(REPO / "params.yaml", env={})
    dump = base.model_dump(mode="json")

    def day(frac: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime((START_US + int(n * frac) * STEP_US) / 1e6))

    cuts = [day(0.0), day(0.6), day(0.75), day(0.9), day(1.0)]
    splits = {k: {"start": cuts[i], "end": cuts[i + 1]} for i, k in enumerate(("train", "val", "test", "backtest"))}
    return Settings.model_validate({
        **dump,
        "data": {**dump["data"], "dir": str(data_dir), "store_url": None},
        "ingest": {**dump["ingest"], "market": "futures-um", "interval": "1m", "symbols": symbols},
        "sessions": {**dump["sessions"], "splits": splits},
    })


def _mem() -> dict[str, float]:
    out = {"rss": 0.0, "hwm": 0.0, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out["rss" if line.startswith("VmRSS") else "hwm"] = int(line.split()[1]) / 1024
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def child(stage: str, size: int, bars: int, workdir: Path, stages: tuple[str, ...] = STAGES) -> None:
    """Hidden entry point: one stage of one size in this fresh process (``fill`` writes the store, untimed);
    prints one JSON object for the timed stages."""
    symbols = [f"S{i:03d}USDT" for i in range(BASE_SYMBOLS * size)]
    data_dir = workdir / "data"
    store = ParquetStore(data_dir / "store")
    settings = settings_for(data_dir, symbols, bars)
    if stage in ("fill", "all"):
        src = source_rows()
        for i, sym in enumerate(symbols):
            store.write_klines(synthetic(src, sym, bars, seed=i))
        del src
    if stage == "all":
        for one in stages:
            _stage(one, settings, store, symbols, bars)
    elif stage != "fill":
        _stage(stage, settings, store, symbols, bars)


def _stage(stage: str, settings: Settings, store: ParquetStore, symbols: list[str], bars: int) -> None:
    gc.collect()
    reset = _reset_peak()
    before = _mem()
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if stage == "features":
        run_features_stage(settings, store)
    elif stage == "sessions":
        run_sessions_stage(settings)
    else:
        result = run_backtest(settings, "sma_cross")
        extra["bars"] = float(result.totals["bars"])
    dt = time.perf_counter() - t0
    after = _mem()
    key = "hwm" if reset else "maxrss"
    print(json.dumps({"stage": stage, "seconds": dt, "peak_mb": after[key] - before["rss"],
                      "rss_before_mb": before["rss"], "peak_reset": reset, "rows": len(symbols) * bars,
                      "symbols": len(symbols), **extra}),
          flush=True)


def run_child(stage: str, size: int, bars: int, workdir: Path, stages: tuple[str, ...] = STAGES,
              src: str | None = None) -> dict[str, dict[str, Any]]:
    """One child process; ``src``: another tree's ``rltrader`` (first on its PYTHONPATH)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", stage, "--_size", str(size), "--bars",
           str(bars), "--_dir", str(workdir), "--stages", ",".join(stages)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    p = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env if src else None)
    if p.returncode != 0:
        raise SystemExit(f"{stage} at size {size}x failed:\n{p.stderr[-3000:]}")
    return {d["stage"]: d for d in map(json.loads, p.stdout.strip().splitlines()) if d}


def emit(line: dict[str, Any]) -> None:
    print(json.dumps(line), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="8 k bars per symbol (under a minute in all)")
    ap.add_argument("--bars", type=int, default=0, help="bars per synthetic symbol (default 300 k, 20 k quick)")
    ap.add_argument("--sizes", default="1,4,16", help="multiples of the default data's symbol count")
    ap.add_argument("--stages", default=",".join(STAGES), help="stages to time (features always runs)")
    ap.add_argument("--peer-src", help="another tree's src folder: run each stage with it too, as the peer")
    ap.add_argument("--_child", choices=("fill", "all", *STAGES), help=argparse.SUPPRESS)
    ap.add_argument("--_size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    bars = args.bars or (8_000 if args.quick else 300_000)
    stages = tuple(st for st in STAGES if st in {"features", *args.stages.split(",")})
    if args._child:
        child(args._child, args._size, bars, Path(args._dir), stages)
        return
    load0 = os.getloadavg()[0]
    sizes = [int(s) for s in args.sizes.split(",")]
    res: dict[int, dict[str, Any]] = {}
    peer: dict[int, dict[str, Any]] = {}
    for k in sizes:
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
            if args.quick:
                res[k] = run_child("all", k, bars, Path(tmp), stages)
                if args.peer_src:
                    with tempfile.TemporaryDirectory(prefix="bench-scale-peer-") as tmp2:
                        peer[k] = run_child("all", k, bars, Path(tmp2), stages, args.peer_src)
            else:
                run_child("fill", k, bars, Path(tmp))
                res[k], peer[k] = {}, {}
                for stage in stages:  # the peer right after ours, on the same data
                    res[k][stage] = run_child(stage, k, bars, Path(tmp), stages)[stage]
                    if args.peer_src:
                        peer[k][stage] = run_child(stage, k, bars, Path(tmp), stages, args.peer_src)[stage]
        for stage in stages:
            r, q = res[k][stage], peer.get(k, {}).get(stage)
            emit({"metric": f"scale_{stage}_{k}x", "value": round(r["seconds"], 3), "unit": "s",
                  "peer": f"tree {args.peer_src}" if q else None, "peer_value": round(q["seconds"], 3) if q else None,
                  "ratio": round(q["seconds"] / r["seconds"], 2) if q else None, "rows": r["rows"],
                  "symbols": r["symbols"], "peak_mem_mb": round(r["peak_mb"], 1),
                  "peer_peak_mem_mb": round(q["peak_mb"], 1) if q else None,
                  "rows_per_s": round(r["rows"] / r["seconds"])})
    lo, hi = sizes[0], sizes[-1]
    grow = hi / lo
    for stage in stages:
        t_lo, t_hi = res[lo][stage]["seconds"], res[hi][stage]["seconds"]
        m_lo, m_hi = res[lo][stage]["peak_mb"], res[hi][stage]["peak_mb"]
        emit({"metric": f"scale_{stage}_time_growth", "value": round(t_hi / t_lo, 2), "unit": "x",
              "peer": f"linear ({hi}x / {lo}x data)", "peer_value": grow, "ratio": round(grow / (t_hi / t_lo), 2)})
        emit({"metric": f"scale_{stage}_peak_mem_growth", "value": round(m_hi, 1), "unit": "MB",
              "peer": f"peak at {lo}x data", "peer_value": round(m_lo, 1),
              "ratio": round(m_lo / m_hi, 2) if m_hi > 0 else None})
        if args.peer_src:
            p_lo, p_hi = peer[lo][stage]["peak_mb"], peer[hi][stage]["peak_mb"]
            emit({"metric": f"scale_{stage}_peak_mem_growth_peer_tree", "value": round(p_hi, 1), "unit": "MB",
                  "peer": f"tree {args.peer_src}: peak at {lo}x data", "peer_value": round(p_lo, 1),
                  "ratio": round(p_lo / p_hi, 2) if p_hi > 0 else None})
    print(f"[bench_scale] {bars:,} bars per symbol, {BASE_SYMBOLS} symbols per 1x; load average (1 min) "
          f"{load0:.1f} at start, {os.getloadavg()[0]:.1f} at end on {os.cpu_count()} CPUs (shared machine)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
