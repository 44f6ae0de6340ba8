"""Dataset benchmark: features and sessions for every shared futures 1m kline zip, ours against ``ta`` over pandas.

    python benchmarks/bench_dataset.py [--quick] [--archive-base PATH] [--repeats N]

The zips under ``<archive-base>/futures/um/{monthly,daily}/klines/<SYMBOL>/1m/`` are parsed (CRC-checked unzip,
``parse_klines`` with the file's period check) outside every timer into one sorted polars frame per symbol; the
peer gets the same frames converted to pandas, also outside its timer. One JSON line per figure goes to stdout::

    {"metric": ..., "value": ..., "unit": ..., "peer": ..., "peer_value": ..., "ratio": ...}

``ratio`` > 1 means ours is better: ours / peer for rates, peer / ours for memory. A human-readable table goes
to stderr.

Figures
  1. ``features_rows_per_s``: ``compute_features(bars, FeatureSettings(), "1m")`` per symbol, i.e. the full
     model feature set (log returns, RSI, EMA distances, MACD / signal / histogram, Bollinger %B and width, ATR,
     realized volatility, volume and trade-count z-scores, taker-buy ratio, time-of-day / day-of-week sin/cos),
     as float32 columns with the ``valid`` flag. Peer: the same feature set the way a pandas user writes it with
     the ``ta`` package: per symbol, per gap-free segment (a new segment wherever the time step is not exactly
     60 s, our rule), ``ta.momentum.RSIIndicator``, ``ta.trend.EMAIndicator``, ``ta.trend.MACD``,
     ``ta.volatility.BollingerBands`` (pband / wband) and ``ta.volatility.AverageTrueRange`` with the same
     periods, pandas for log returns, rolling std, rolling z-scores, the taker ratio and the calendar encodings,
     normalised as ``feature_exprs`` does, then float32 and ``valid`` too. Outside the timers the peer's table is
     checked against ours: the same ``valid`` rows, and several columns equal within 1e-3 of their typical size
     (float32 output; ``ta`` and ours agree to 1e-6 in float64, see tests/test_features.py), except a few rows
     in flat 20-bar windows where pandas' rolling std leaves a rounding residue and ``ta``'s %B is defined while
     ours is not (counted on stderr). Rows / s, best of ``--repeats``.
  2. ``features_peak_mem_mb``: peak RSS increment of computing the features of every symbol (one after the
     other, each result dropped before the next, as the features stage does), ours vs the peer, each in a fresh
     subprocess (this script with a hidden flag): it loads the bars from a Parquet file (the peer converts
     them to pandas), resets the kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``), computes, and
     reports peak - baseline in MB. The peak is the process's own mark, ``VmHWM`` of ``/proc/self/status``:
     ``ru_maxrss`` of a freshly exec'd child starts at the *parent's* RSS at fork time (Linux carries the
     pre-exec memory's peak into it), so with this script's data loaded it would hide the increment; it is
     shown on stderr for reference, and used where the reset is refused.
  3. ``features_sessions_e2e_rows_per_s``: ``run_features_stage`` (reading a ParquetStore filled in a temp dir
     outside the timer, writing ``data/features``) + ``run_sessions_stage`` with the session settings of
     ``params.yaml`` (environment overrides ignored), ``data.dir`` in the temp dir and ``ingest.symbols`` = every
     symbol found; input rows / seconds. Peer: what a pandas pipeline spends to get to the same point:
     ``pandas.read_parquet`` of the same store folder per symbol, the ``ta`` features of figure 1 and
     ``DataFrame.to_parquet`` (zstd) of the same per-symbol table. The peer has no sessions stage, so this
     figure favours the peer. If the sessions stage fails (e.g. a split without sessions) the line carries the
     error instead of a value.

``--quick`` (< 1 min on 2 cores): one repetition; the peer of every figure, and both sides of figure 2, run on
a subset of the symbols (the smallest, up to about ``--peer-rows`` rows; named in the ``peer`` field).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import _harness as h
import numpy as np
import pandas as pd
import polars as pl
import ta

REPO = h.REPO  # _harness put src/ on the path when the package is not installed

from rltrader.config import FeatureSettings, Settings, load_settings  # noqa: E402
from rltrader.data.archive import ArchiveFile, parse_klines, read_zip_member  # noqa: E402
from rltrader.data.parquet_store import ParquetStore  # noqa: E402
from rltrader.data.schema import Market  # noqa: E402
from rltrader.dataset.build import run_features_stage, run_sessions_stage  # noqa: E402
from rltrader.dataset.features import compute_features, feature_spec, segments  # noqa: E402
from rltrader.errors import ConfigError, DataError  # noqa: E402

DEFAULT_ARCHIVE_BASE = REPO.parent / "shared" / "data" / "binance"
INTERVAL = "1m"
STEP = pd.Timedelta(minutes=1)
MARKET = Market.FUTURES_UM
# columns compared between the peer and ours: one per indicator family
CHECK_COLUMNS = ("ret_60", "rsi", "ema_dist_50", "macd_hist", "bb_pctb", "bb_width", "atr", "rv_60", "volume_z",
                 "trades_z", "taker_buy", "dow_sin")
CHECK_TOL = 1e-3
PEER_TA = "ta 0.11 over pandas, per gap-free segment"


log = h.logger("bench_dataset")


# -- the data set ------------------------------------------------------------------------------------------
def discover(base: Path) -> dict[str, list[ArchiveFile]]:
    """Every futures-um 1m kline zip under the archive base, grouped by symbol (sorted)."""
    out: dict[str, list[ArchiveFile]] = {}
    for freq in ("monthly", "daily"):
        for path in sorted((base / "futures" / "um" / freq / "klines").glob(f"*/{INTERVAL}/*-{INTERVAL}-*.zip")):
            symbol = path.parent.parent.name
            period = path.stem.split(f"-{INTERVAL}-", 1)[1]
            f = ArchiveFile(MARKET, "klines", symbol, INTERVAL, freq, period)  # type: ignore[arg-type]
            if f.relpath != path.relative_to(base).as_posix():
                raise SystemExit(f"{path}: does not follow the archive layout ({f.relpath})")
            out.setdefault(symbol, []).append(f)
    if not out:
        raise SystemExit(f"no futures/um 1m kline zips under {base}")
    return dict(sorted(out.items()))


def load_bars(base: Path, files: dict[str, list[ArchiveFile]]) -> dict[str, pl.DataFrame]:
    """One sorted frame per symbol from its zips; the benchmark needs clean files."""
    bars: dict[str, pl.DataFrame] = {}
    for symbol, fs in files.items():
        frames = []
        for f in fs:
            parsed = parse_klines(read_zip_member(base / f.relpath), source=f.relpath, market=MARKET, symbol=symbol,
                                  interval=INTERVAL, period=f.period_bounds)
            if not parsed.bad.is_empty():
                raise SystemExit(f"{f.relpath}: {parsed.bad.height} invalid rows; the benchmark needs clean files")
            frames.append(parsed.rows)
        df = pl.concat(frames).sort("open_time")
        if df["open_time"].is_duplicated().any():
            raise SystemExit(f"{symbol}: overlapping files (duplicate open_time)")
        bars[symbol] = df
    return bars


def peer_subset(bars: dict[str, pl.DataFrame], target_rows: int) -> list[str]:
    """The smallest symbols, up to about ``target_rows`` rows (at least one), in name order."""
    chosen: list[str] = []
    rows = 0
    for symbol in sorted(bars, key=lambda s: (bars[s].height, s)):
        if chosen and rows + bars[symbol].height > target_rows:
            break
        chosen.append(symbol)
        rows += bars[symbol].height
    return sorted(chosen)


def n_segments(df: pl.DataFrame) -> int:
    return int(df.select(segments(pl.col("open_time"), INTERVAL).max()).item() or 0)


# -- the peer: ta over pandas ------------------------------------------------------------------------------
def _zscore(x: pd.Series, window: int) -> pd.Series:
    mean, std = x.rolling(window).mean(), x.rolling(window).std()
    return ((x - mean) / std).where(std > 0, 0.0).where(std.notna())


def ta_segment(g: pd.DataFrame, p: FeatureSettings) -> dict[str, pd.Series]:
    """Features of one gap-free segment (index 0..n-1) with ta and pandas, normalised as ``feature_exprs``."""
    c, h, lo, v = g["close"], g["high"], g["low"], g["volume"]
    logc = np.log(c)
    f: dict[str, pd.Series] = {}
    for hz in p.return_horizons:
        f[f"ret_{hz}"] = logc - logc.shift(hz)
    f["rsi"] = (ta.momentum.RSIIndicator(c, window=p.rsi).rsi() - 50.0) / 50.0
    for n in p.ema:
        f[f"ema_dist_{n}"] = c / ta.trend.EMAIndicator(c, window=n).ema_indicator() - 1.0
    fast, slow, sig = p.macd
    macd = ta.trend.MACD(c, window_slow=slow, window_fast=fast, window_sign=sig)
    f["macd"] = macd.macd() / c
    f["macd_signal"] = macd.macd_signal() / c
    f["macd_hist"] = macd.macd_diff() / c
    bb = ta.volatility.BollingerBands(c, window=p.bollinger, window_dev=p.bollinger_dev)
    f["bb_pctb"] = bb.bollinger_pband()
    f["bb_width"] = bb.bollinger_wband() / 100.0
    if len(g) >= p.atr:  # ta's ATR indexes bar window-1 and writes 0 (not NaN) before it
        atr = ta.volatility.AverageTrueRange(h, lo, c, window=p.atr).average_true_range()
        atr.iloc[: p.atr - 1] = np.nan
        f["atr"] = atr / c
    else:
        f["atr"] = pd.Series(np.nan, index=g.index)
    ret1 = logc.diff()
    for w in p.volatility:
        f[f"rv_{w}"] = ret1.rolling(w).std()
    f["volume_z"] = _zscore(np.log1p(v), p.zscore_window)
    f["trades_z"] = _zscore(np.log1p(g["trades"].astype("float64")), p.zscore_window)
    f["taker_buy"] = (g["taker_buy_volume"] / v).where(v > 0, 0.5)
    return f


def ta_features(df: pd.DataFrame, p: FeatureSettings, names: Sequence[str]) -> pd.DataFrame:
    """One symbol's bars (pandas, sorted) → the same table as ``compute_features``."""
    t = df["open_time"]
    segment = (t.diff() != STEP).cumsum().astype("int32")
    parts = [pd.DataFrame(ta_segment(g.reset_index(drop=True), p))
             for _, g in df.groupby(segment, sort=False)]
    feats = pd.concat(parts, ignore_index=True)
    minute = t.dt.hour * 60.0 + t.dt.minute
    day = t.dt.day_of_week + minute / 1440.0
    feats["tod_sin"] = np.sin(minute * (2 * np.pi / 1440)).to_numpy()
    feats["tod_cos"] = np.cos(minute * (2 * np.pi / 1440)).to_numpy()
    feats["dow_sin"] = np.sin(day * (2 * np.pi / 7)).to_numpy()
    feats["dow_cos"] = np.cos(day * (2 * np.pi / 7)).to_numpy()
    feats = feats[list(names)].replace([np.inf, -np.inf], np.nan).astype("float32")
    out = df[["open_time", "open", "high", "low", "close", "volume"]].reset_index(drop=True)
    out["segment"] = segment.to_numpy()
    out["valid"] = feats.notna().all(axis=1).to_numpy()
    return pd.concat([out, feats], axis=1)


def check_peer(symbol: str, ours: pl.DataFrame, peer: pd.DataFrame) -> int:
    """The peer computes the same thing: same rows and validity, checked columns equal within CHECK_TOL.

    Validity may differ only where the close was flat over the Bollinger window: pandas' rolling std is then a
    rounding residue instead of 0, so ``ta``'s %B is defined (0.5) where ours is not (the bands coincide).
    Returns the number of such rows.
    """
    assert len(peer) == ours.height, (symbol, len(peer), ours.height)
    ours_valid, peer_valid = ours["valid"].to_numpy(), peer["valid"].to_numpy()
    rows = np.flatnonzero(ours_valid != peer_valid)
    flat = ours["bb_pctb"].is_null().to_numpy() & (ours["bb_width"].fill_null(1.0).to_numpy() == 0)
    assert flat[rows].all(), f"{symbol}: peer's valid rows differ from ours at rows {rows[~flat[rows]][:5]}"
    differ = len(rows)
    valid = ours_valid & peer_valid
    assert valid.any(), f"{symbol}: no valid rows"
    for name in CHECK_COLUMNS:
        a = ours[name].to_numpy()[valid].astype(np.float64)
        b = peer[name].to_numpy()[valid].astype(np.float64)
        scale = np.maximum(np.abs(b), np.median(np.abs(b)))
        scale[scale == 0] = 1.0
        worst = float(np.max(np.abs(a - b) / scale))
        assert worst <= CHECK_TOL, f"{symbol}.{name}: peer differs from ours by {worst:.2e} (relative)"
    return differ


# -- timing helpers ----------------------------------------------------------------------------------------
Timing = h.Timing


def time_features(fn: Callable[[Any], Any], inputs: Sequence[Any], repeats: int) -> tuple[Timing, list[Any]]:
    timing = Timing(sum(len(x) for x in inputs))
    results: list[Any] = []
    for _ in range(repeats):
        results = []
        gc.collect()
        t0 = time.perf_counter()
        for x in inputs:
            results.append(fn(x))
        timing.seconds.append(time.perf_counter() - t0)
    return timing, results


# -- figure 2: peak memory in a fresh process --------------------------------------------------------------
def _rss_mb() -> dict[str, float]:
    """Current RSS, this process's peak mark (VmHWM) and ``ru_maxrss``, in MB (Linux reports kB)."""
    out = {"rss": 0.0, "hwm": 0.0, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out["rss" if line.startswith("VmRSS") else "hwm"] = int(line.split()[1]) / 1024
    return out


def mem_child(who: str, src: Path, symbols: Sequence[str]) -> None:
    """Hidden entry point: load, reset the peak mark, compute every symbol's features, print the increment."""
    p = FeatureSettings()
    names = feature_spec(p).names
    table = pl.read_parquet(src)  # decoded into the heap (an IPC file could be memory-mapped)
    frames = {k[0]: v for k, v in table.partition_by("symbol", as_dict=True).items() if k[0] in symbols}
    del table
    inputs: list[Any] = [frames[s] for s in symbols]
    if who == "peer":
        inputs = [df.to_pandas() for df in inputs]
        del frames
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets the peak-RSS mark (VmHWM / ru_maxrss) to the current RSS
        reset = True
    except OSError:
        reset = False
    before = _rss_mb()
    rows = 0
    for x in inputs:
        out = compute_features(x, p, INTERVAL) if who == "ours" else ta_features(x, p, names)
        rows += len(out)
        del out
    after = _rss_mb()
    key = "hwm" if reset else "maxrss"
    print(json.dumps({"who": who, "rows": rows, "rss_before_mb": before["rss"], "baseline_mb": before[key],
                      "peak_mb": after[key], "delta_mb": after[key] - before[key], "hwm_reset": reset,
                      "maxrss_before_mb": before["maxrss"], "maxrss_after_mb": after["maxrss"]}), flush=True)


def measure_mem(who: str, src: Path, symbols: Sequence[str]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_mem", who, "--_mem-input", str(src),
           "--_mem-symbols", ",".join(symbols)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"memory subprocess ({who}) failed:\n{res.stderr}")
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


# -- figure 3: the stages end to end -----------------------------------------------------------------------
def stage_settings(data_dir: Path, symbols: Sequence[str]) -> Settings:
    base = load_settings(REPO / "params.yaml", env={})
    dump = base.model_dump(mode="json")
    return Settings.model_validate({
        **dump,
        "data": {**dump["data"], "dir": str(data_dir), "store_url": None},
        "ingest": {**dump["ingest"], "market": MARKET.value, "interval": INTERVAL, "symbols": list(symbols)},
    })


def peer_e2e(store_root: Path, out: Path, symbols: Sequence[str], p: FeatureSettings, names: Sequence[str]
             ) -> tuple[float, int]:
    """pandas.read_parquet of each symbol's store folder, ta features, to_parquet: seconds, rows read."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rows = 0
    gc.collect()
    t0 = time.perf_counter()
    for symbol in symbols:
        series = store_root / "klines" / f"market={MARKET.value}" / f"symbol={symbol}" / f"interval={INTERVAL}"
        df = pd.read_parquet(series).sort_values("open_time", ignore_index=True)
        rows += len(df)
        ta_features(df, p, names).to_parquet(out / f"{symbol}.parquet", compression="zstd")
    return time.perf_counter() - t0, rows


# -- reporting ---------------------------------------------------------------------------------------------
@dataclass
class Figure:
    metric: str
    value: float | None
    unit: str
    peer: str
    peer_value: float | None
    higher_is_better: bool = True
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        return h.ratio(self.value, self.peer_value, higher_is_better=self.higher_is_better)

    def line(self) -> dict[str, Any]:
        extra = {} if self.error is None else {"error": self.error}
        return h.line(self.metric, self.value, self.unit, self.peer, self.peer_value,
                      digits=0 if self.unit == "rows/s" else 1, ratio_value=self.ratio, **extra)


def emit(fig: Figure, figures: list[Figure]) -> None:
    figures.append(fig)
    h.emit(fig.line())


def summary(figures: Sequence[Figure], extra: Sequence[str]) -> None:
    head = f"{'metric':36} {'ours':>12} {'peer':>12} {'unit':>7} {'ratio':>6}"
    out = ["", head, "-" * len(head)]
    for f in figures:
        v = f"{f.value:12,.1f}" if f.value is not None else f"{'error':>12}"
        pv = f"{f.peer_value:12,.1f}" if f.peer_value is not None else f"{'-':>12}"
        r = f"{f.ratio:6.2f}" if f.ratio is not None else f"{'-':>6}"
        out.append(f"{f.metric:36} {v} {pv} {f.unit:>7} {r}")
    out.append("")
    out += [f"peer of {f.metric}: {f.peer}" for f in figures]
    out += [f"error of {f.metric}: {f.error}" for f in figures if f.error]
    out += ["", *extra]
    h.table(out)


# -- main --------------------------------------------------------------------------------------------------
def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the context managers: the temp dir is removed


def run(args: argparse.Namespace) -> None:
    load0 = os.getloadavg()[0]
    base = Path(args.archive_base).resolve()
    files = discover(base)
    t0 = time.perf_counter()
    bars = load_bars(base, files)
    parse_s = time.perf_counter() - t0
    symbols = list(bars)
    total = sum(df.height for df in bars.values())
    n_files = sum(len(fs) for fs in files.values())
    segs = {s: n_segments(df) for s, df in bars.items()}
    log(f"{n_files} files, {len(symbols)} symbols, {total:,} rows, {sum(segs.values())} gap-free segments; "
        f"parse {parse_s:.2f} s")

    p = FeatureSettings()
    names = feature_spec(p).names
    repeats = args.repeats if args.repeats else (1 if args.quick else 3)
    peer_syms = peer_subset(bars, args.peer_rows) if args.quick else symbols
    peer_rows = sum(bars[s].height for s in peer_syms)
    peer_desc = (f"{', '.join(peer_syms)}: {len(peer_syms)} of {len(symbols)} symbols, {peer_rows:,} rows"
                 if len(peer_syms) < len(symbols) else f"all {len(symbols)} symbols, {peer_rows:,} rows")
    figures: list[Figure] = []
    extra = [f"files: {n_files}, symbols: {', '.join(symbols)}; rows: {total:,}; peer data: {peer_desc}; "
             f"best of {repeats}"]

    # (1) features, in process
    ours_t, ours_out = time_features(lambda df: compute_features(df, p, INTERVAL), list(bars.values()), repeats)
    ours_by_sym = dict(zip(symbols, ours_out, strict=True))
    del ours_out
    pd_bars = [bars[s].to_pandas() for s in peer_syms]  # conversion outside the peer's timer
    peer_t, peer_out = time_features(lambda df: ta_features(df, p, names), pd_bars, repeats)
    differ = sum(check_peer(s, ours_by_sym[s], out) for s, out in zip(peer_syms, peer_out, strict=True))
    del peer_out, pd_bars, ours_by_sym
    check = (f"peer matches ours on {', '.join(CHECK_COLUMNS)} (rows valid in both, {CHECK_TOL:g} relative); "
             f"validity differs on {differ} of {peer_rows:,} rows (flat Bollinger windows)")
    log(f"features: ours {ours_t.best:.2f} s for {ours_t.rows:,} rows, peer {peer_t.best:.2f} s for "
        f"{peer_t.rows:,} rows; {check}")
    emit(Figure("features_rows_per_s", ours_t.rate, "rows/s",
                f"{PEER_TA}: RSI, EMA, MACD, Bollinger, ATR + pandas returns/rolling/z-scores/calendar ({peer_desc})",
                peer_t.rate), figures)
    extra.append(f"features: ours {ours_t.best:.3f} s / {ours_t.rows:,} rows, peer {peer_t.best:.3f} s / "
                 f"{peer_t.rows:,} rows; {check}")

    with tempfile.TemporaryDirectory(prefix="bench-dataset-") as tmp_s:
        tmp = Path(tmp_s)

        # (2) peak memory, fresh processes
        mem_syms = peer_syms
        src = tmp / "bars.parquet"
        pl.concat([bars[s] for s in mem_syms]).write_parquet(src, compression="uncompressed")
        m_ours = measure_mem("ours", src, mem_syms)
        m_peer = measure_mem("peer", src, mem_syms)
        src.unlink()
        mem_desc = (f"{PEER_TA}, fresh process, peak RSS increment over the loaded data "
                    f"({peer_desc}; ours on the same)")
        emit(Figure("features_peak_mem_mb", m_ours["delta_mb"], "MB", mem_desc, m_peer["delta_mb"],
                    higher_is_better=False), figures)
        for m in (m_ours, m_peer):
            extra.append(f"memory {m['who']}: RSS {m['rss_before_mb']:.0f} MB after loading, peak "
                         f"{m['peak_mb']:.0f} MB (+{m['delta_mb']:.1f}), peak mark reset: {m['hwm_reset']}; "
                         f"ru_maxrss {m['maxrss_before_mb']:.0f} → {m['maxrss_after_mb']:.0f} MB")

        # (3) features + sessions stages end to end
        data_dir = tmp / "data"
        store = ParquetStore(data_dir / "store")
        for s in symbols:
            assert store.write_klines(bars[s]).inserted == bars[s].height
        store.compact()  # the peer reads the folders with pandas: one plain file per month, no delta files
        settings = stage_settings(data_dir, symbols)
        e2e = Timing(total)
        feat_s: list[float] = []
        error: str | None = None
        for _ in range(repeats):
            gc.collect()
            t0 = time.perf_counter()
            fsum = run_features_stage(settings, store)
            t1 = time.perf_counter()
            try:
                ssum = run_sessions_stage(settings)
            except (DataError, ConfigError) as exc:
                error = f"run_sessions_stage failed: {exc}"
                log(error)
                break
            e2e.seconds.append(time.perf_counter() - t0)
            feat_s.append(t1 - t0)
            assert sum(v["rows"] for v in fsum["symbols"].values()) == total
        peer_e2e_t = Timing(peer_rows)
        for _ in range(repeats):
            dt, n = peer_e2e(data_dir / "store", tmp / "peer_features", peer_syms, p, names)
            assert n == peer_rows, (n, peer_rows)
            peer_e2e_t.seconds.append(dt)
        e2e_peer = (f"pandas.read_parquet of the store + {PEER_TA} features (figure 1) + DataFrame.to_parquet zstd "
                    f"per symbol, no sessions stage ({peer_desc})")
        if error is None:
            emit(Figure("features_sessions_e2e_rows_per_s", e2e.rate, "rows/s", e2e_peer, peer_e2e_t.rate), figures)
            splits = ", ".join(f"{k} {v['sessions']:,}" for k, v in ssum["splits"].items())
            extra.append(f"stages: features {min(feat_s):.2f} s + sessions {e2e.best - min(feat_s):.2f} s "
                         f"(best run {e2e.best:.2f} s) for {total:,} rows, {len(names)} features; sessions: {splits}")
        else:
            emit(Figure("features_sessions_e2e_rows_per_s", None, "rows/s", e2e_peer, peer_e2e_t.rate,
                        error=error), figures)
        extra.append(f"peer e2e {peer_e2e_t.best:.2f} s for {peer_rows:,} rows")

    extra.append(f"load average (1 min) at start {load0:.1f}, at end {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
                 "CPUs: other processes share this machine, so rates vary between runs")
    summary(figures, extra)


def main(argv: Sequence[str] | None = None) -> None:
    ap = h.parser(__doc__, "one repetition; peers on a subset of the symbols")
    ap.add_argument("--archive-base", default=str(DEFAULT_ARCHIVE_BASE),
                    help="folder mirroring data.binance.vision's data/ (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=0, help="repetitions (best of N; default 3, 1 with --quick)")
    ap.add_argument("--peer-rows", type=int, default=320_000, help="--quick: about this many rows for the peers")
    ap.add_argument("--_mem", choices=("ours", "peer"), help=argparse.SUPPRESS)
    ap.add_argument("--_mem-input", help=argparse.SUPPRESS)
    ap.add_argument("--_mem-symbols", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._mem:
        mem_child(args._mem, Path(args._mem_input), args._mem_symbols.split(","))
        return
    signal.signal(signal.SIGTERM, _sigterm)
    run(args)


if __name__ == "__main__":
    main()
