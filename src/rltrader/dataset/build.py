"""The two dataset stages DVC runs: ``features`` (store → per-symbol feature tables) and ``sessions``
(feature tables → train/val/test/backtest session splits). Plain functions; the CLI, ``dvc.yaml``, the Prefect
flows and the tests all call these.

Both stages write into a temporary folder next to their output and swap it in with a rename at the end, so a
failure (bad parameter, missing symbol, empty split) leaves the previous output untouched and no partial files.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

import rltrader
from rltrader.config import SessionSettings, Settings
from rltrader.data.ingest import klines_fingerprint
from rltrader.data.schema import interval_us
from rltrader.data.store import Store
from rltrader.dataset.market_features import compute_all_features, full_feature_spec
from rltrader.dataset.plots import ExampleSession
from rltrader.dataset.split import META_KEY, PRICE_COLUMNS, SplitWriter, read_metadata
from rltrader.errors import ConfigError, DataError
from rltrader.integrity import read_arrow, read_parquet, reading
from rltrader.utils import atomic_dir, parse_day, write_json

FEATURES_DIR = "features"
FEATURES_HINT = "re-run `rltrader dataset features` (`dvc repro features`)"
SESSIONS_DIR = "sessions"


# ---------------------------------------------------------------------------------------------------- helpers


def code_version() -> dict[str, str | None]:
    """Package version and a hash of the dataset code: recorded in every output's metadata.

    Not the git commit: an output must be a function of its inputs (stored bars, params, this code), so that a
    stage re-run in a later commit writes the same bytes and DVC re-runs nothing after it. With the commit in
    the footer, any re-run of ``features`` (e.g. after an unrelated commit touched ``reports/ingest.json``)
    changed every file's hash and retrained every model. Which commit built an output is in git already:
    ``dvc.lock`` records its hash next to the code of that commit."""
    src = Path(__file__).parent
    h = hashlib.sha256()
    for f in sorted(src.glob("*.py")):
        h.update(f.read_bytes())
    return {"rltrader": rltrader.__version__, "dataset_code_sha256": h.hexdigest()[:16]}


def standardize(x: np.ndarray, mean: np.ndarray, std: np.ndarray, clip: float) -> np.ndarray:
    """The features models see: train-split mean/std scaling, clipped to ±clip, float32. One definition for
    the sessions stage and the continuous backtest, so both feed a model identical inputs."""
    out: np.ndarray = np.clip((x.astype(np.float32) - mean) / std, -clip, clip).astype(np.float32)
    return out


def _ts(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).isoformat()


# ---------------------------------------------------------------------------------------------- features stage


def run_features_stage(settings: Settings, store: Store, out_dir: Path | None = None) -> dict[str, Any]:
    """``features`` stage: one Parquet table per symbol with every bar, its segment, validity and features.

    Every bar is kept (also warm-up rows, ``valid`` = false) so the backtest can run continuously over a split;
    the sessions stage picks the windows it needs.
    """
    cfg, p = settings.ingest, settings.features
    out = out_dir or settings.data.dir / FEATURES_DIR
    spec = full_feature_spec(p, cfg.interval)
    version = code_version()
    summary: dict[str, Any] = {"features": list(spec.names), "warmup": spec.warmup, "symbols": {}}
    # the market features (features.market) of one symbol read every symbol's bars: then all symbols first;
    # otherwise one symbol at a time, so peak memory is one symbol's bars and features whatever the symbol count
    cross_symbol = p.market or bool(p.timeframes)
    all_bars = {s: _read_bars(store, settings, s) for s in cfg.symbols} if cross_symbol else {}
    all_feats = compute_all_features(all_bars, p, cfg.interval) if cross_symbol else {}
    with atomic_dir(out) as tmp:
        for symbol in cfg.symbols:
            if cross_symbol:
                bars, feats = all_bars.pop(symbol), all_feats.pop(symbol)
            else:
                bars = _read_bars(store, settings, symbol)
                feats = compute_all_features({symbol: bars}, p, cfg.interval)[symbol]
            meta = {"symbol": symbol, "market": cfg.market.value, "interval": cfg.interval,
                    "features": list(spec.names), "warmup": spec.warmup,
                    "params": p.model_dump(mode="json"), "input_sha256": klines_fingerprint(bars),
                    "code": version}
            table = feats.to_arrow()
            table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
            # no dictionary pages: float features are almost all distinct, so pyarrow's dictionary attempt only
            # costs time (2-3x the write) and bytes (~8 % larger files); the values are the same either way
            pq.write_table(table, tmp / f"{symbol}.parquet", compression="zstd", use_dictionary=False,
                           write_page_checksum=True)
            summary["symbols"][symbol] = {"rows": feats.height, "valid": int(feats["valid"].sum()),
                                          "segments": int(feats["segment"].n_unique()),
                                          "start": str(feats["open_time"][0]), "end": str(feats["open_time"][-1]),
                                          "input_sha256": meta["input_sha256"]}
            del bars, feats, table
        if p.forecast:  # pooled over the symbols, fitted on train only: after every symbol's file is written
            from rltrader.dataset.forecast_features import add_forecast_columns

            summary["features"] += list(add_forecast_columns(settings, tmp))
    return summary


def _read_bars(store: Store, settings: Settings, symbol: str) -> pl.DataFrame:
    cfg = settings.ingest
    bars = store.read_klines(cfg.market.value, symbol, cfg.interval)
    if bars.is_empty():
        raise DataError(f"ingest.symbols: {symbol} has no {cfg.market.value} {cfg.interval} bars in the "
                        f"store {store.url} (run `rltrader data ingest` or remove it from ingest.symbols)")
    return bars


def read_features(features_dir: Path, symbol: str) -> tuple[pl.DataFrame, dict[str, Any]]:
    path = features_dir / f"{symbol}.parquet"
    if not path.exists():
        raise DataError(f"{path}: no features for {symbol} (run `rltrader dataset features`)")
    with reading(path, "features file", FEATURES_HINT):
        return read_parquet(path, "features file", FEATURES_HINT), read_metadata(path)


def _read_feature_columns(features_dir: Path, symbol: str, columns: list[str] | None, n_rows: int | None = None
                          ) -> pl.DataFrame:
    """Some columns (None: all) of a symbol's features file, for the sessions stage's passes over it, page CRCs
    verified; refuses a file that changed length since the first pass (``n_rows``: rewritten underneath)."""
    path = features_dir / f"{symbol}.parquet"
    if not path.exists():
        raise DataError(f"{path}: no features for {symbol} (run `rltrader dataset features`)")
    with reading(path, "features file", FEATURES_HINT):
        frame = pl.from_arrow(read_arrow(path, "features file", FEATURES_HINT, columns=columns))
    assert isinstance(frame, pl.DataFrame)
    if n_rows is not None and frame.height != n_rows:
        raise DataError(f"{path}: {frame.height} rows, {n_rows} when the sessions stage first read it "
                        f"(rewritten while the stage ran?); {FEATURES_HINT}")
    return frame


# ---------------------------------------------------------------------------------------------- sessions stage


@dataclass
class _Candidates:
    """Per symbol, what the first pass keeps once its frame is dropped: the session starts that fall inside a
    split (row numbers), that split (index into the sorted ranges), the context volatility and whether the
    context moved at least ``min_abs_move``. About 2 bytes per bar, against the frame's ~150."""

    symbol: str
    n_rows: int
    starts: np.ndarray
    split: np.ndarray
    vol: np.ndarray
    move_ok: np.ndarray


def _check_session_params(s: SessionSettings) -> list[tuple[str, int, int]]:
    if s.embargo < s.context:
        raise ConfigError(f"sessions.embargo: {s.embargo} bars is shorter than sessions.context ({s.context}); "
                          "a context could then reach back across a split boundary")
    if "train" not in s.splits:
        raise ConfigError("sessions.splits: needs a 'train' split (standardisation and the volatility threshold "
                          "are fitted on it)")
    ranges = []
    for name, r in s.splits.items():
        lo, hi = parse_day(r.start, f"sessions.splits.{name}.start"), parse_day(r.end, f"sessions.splits.{name}.end")
        if lo >= hi:
            raise ConfigError(f"sessions.splits.{name}: start {r.start} is not before end {r.end}")
        ranges.append((name, lo, hi))
    ranges.sort(key=lambda x: x[1])
    for (a, _, a_hi), (b, b_lo, _) in itertools.pairwise(ranges):
        if b_lo < a_hi:
            raise ConfigError(f"sessions.splits.{b}: starts before sessions.splits.{a} ends (splits must not overlap)")
    return ranges


def _candidates(symbol: str, frame: pl.DataFrame, s: SessionSettings, ranges: list[tuple[str, int, int]],
                step_us: int) -> _Candidates:
    """Every start ``t`` on the stride grid whose window ``[t - context, t + length)`` is gap-free and valid and
    lies inside a split (context and last bar included), clear of the embargo after a boundary."""
    window = s.context + s.length
    valid = frame["valid"].to_numpy()
    seg = frame["segment"].to_numpy()
    t_us = frame["open_time"].dt.epoch("us").to_numpy()
    # run length of consecutive valid bars within one segment, ending at each row
    brk = np.ones(len(valid), dtype=bool)
    brk[1:] = (seg[1:] != seg[:-1]) | ~valid[:-1]
    run_id = np.cumsum(brk)
    first = np.flatnonzero(brk)
    run_len = np.arange(len(valid)) - first[run_id - 1] + 1
    run_len[~valid] = 0
    t = np.arange(s.context, len(valid) - s.length + 1)
    ok = run_len[t + s.length - 1] >= window
    ok &= (t_us[t] // step_us) % s.stride == 0  # stride on a fixed time grid: starts don't move when data is added
    starts = t[ok]
    close = frame["close"].to_numpy()
    logc = np.log(close)
    # context statistics use the context bars only (causal: known when the session's first decision is made)
    move = logc[starts - 1] - logc[starts - s.context]
    if s.context > 2:
        r = np.diff(logc)  # r[i] = return into bar i+1
        cs, cs2 = np.concatenate([[0.0], np.cumsum(r)]), np.concatenate([[0.0], np.cumsum(r * r)])
        lo, hi = starts - s.context, starts - 1  # returns into bars lo+1 .. hi (context - 1 of them)
        n = s.context - 1
        mean = (cs[hi] - cs[lo]) / n
        vol = np.sqrt(np.maximum((cs2[hi] - cs2[lo]) / n - mean * mean, 0.0))
    else:
        vol = np.abs(move)
    ctx_time = t_us[starts - s.context]
    end_time = t_us[starts + s.length - 1] + step_us
    split = np.full(len(starts), -1, dtype=np.int8)
    for i, (_, lo_us, hi_us) in enumerate(ranges):  # ranges are sorted and disjoint: at most one split each
        keep = (ctx_time >= lo_us) & (end_time <= hi_us)
        if i > 0:  # embargo after a boundary: no context may reach back across it
            keep &= ctx_time >= lo_us + s.embargo * step_us
        split[keep] = i
    inside = split >= 0
    return _Candidates(symbol, frame.height, starts[inside], split[inside], vol[inside],
                       (np.abs(move) >= s.min_abs_move)[inside])


def _covered(n: int, starts: np.ndarray, s: SessionSettings) -> np.ndarray:
    """Boolean mask of the rows any session window ``[start - context, start + length)`` uses."""
    cover = np.zeros(n + 1, dtype=np.int32)
    np.add.at(cover, starts - s.context, 1)
    np.add.at(cover, starts + s.length, -1)
    return np.cumsum(cover[:n]) > 0


def run_sessions_stage(settings: Settings, features_dir: Path | None = None, out_dir: Path | None = None,
                       metrics_path: Path | None = None, plot_path: Path | None = None) -> dict[str, Any]:
    """``sessions`` stage: split by date, select sessions, standardise on train, write splits + summary + plot.

    Three passes over the features files, one symbol at a time, so peak memory is one symbol's frame plus one
    row group's buffer (``SplitWriter``) whatever the number of symbols: (1) the candidate sessions and their
    context statistics, (2) once the train volatility threshold is known, the train mean/std (float64 sums per
    symbol, in symbol order), (3) per split, each symbol's covered rows standardised and appended.
    """
    s = settings.sessions
    ranges = _check_session_params(s)
    fdir = features_dir or settings.data.dir / FEATURES_DIR
    out = out_dir or settings.data.dir / SESSIONS_DIR
    step_us = interval_us(settings.ingest.interval)
    symbols = tuple(settings.ingest.symbols)
    cands: list[_Candidates] = []
    inputs: dict[str, str] = {}
    names: tuple[str, ...] | None = None
    longest = 0
    for sym in symbols:  # pass 1
        frame = _read_feature_columns(fdir, sym, ["open_time", "close", "segment", "valid"])
        fmeta = read_metadata(fdir / f"{sym}.parquet")
        names = tuple(fmeta["features"])
        inputs[sym] = fmeta["input_sha256"]
        cands.append(_candidates(sym, frame, s, ranges, step_us))
        seg_sizes = frame.filter(pl.col("valid")).group_by("segment").len()["len"]
        longest = max(longest, int(seg_sizes.max() or 0))  # type: ignore[arg-type]
        del frame
    assert names is not None
    if longest < s.context + s.length:
        raise DataError(f"sessions.context + sessions.length = {s.context + s.length} bars is longer than any "
                        f"gap-free stretch of valid bars ({longest}) for {', '.join(symbols)}")

    # selection thresholds and standardisation are fitted on the train split only (never on later data)
    train = next(i for i, (name, _, _) in enumerate(ranges) if name == "train")
    train_vol = np.concatenate([c.vol[c.split == train] for c in cands])
    vol_threshold = float(np.percentile(train_vol, s.volatility_percentile)) if len(train_vol) else 0.0
    del train_vol
    # chosen[i][k]: the session starts (row numbers in symbol k's file) of split ranges[i]
    chosen: list[list[np.ndarray]] = [[] for _ in ranges]
    for c in cands:
        ok = (c.vol >= vol_threshold) & c.move_ok
        for i in range(len(ranges)):
            chosen[i].append(c.starts[(c.split == i) & ok])
    n_rows = [c.n_rows for c in cands]
    del cands
    for (name, lo, hi), starts in zip(ranges, chosen, strict=True):
        if not any(len(st) for st in starts):
            raise DataError(f"sessions.splits.{name}: no sessions in [{_ts(lo)}, {_ts(hi)}) for {', '.join(symbols)} "
                            f"with windows of sessions.context + sessions.length = {s.context + s.length} bars "
                            f"(is there data in that range? else shorten the windows, relax "
                            f"sessions.volatility_percentile / min_abs_move or sessions.embargo)")
    for k, sym in enumerate(symbols):
        if not any(len(split[k]) for split in chosen):
            # passes 2 and 3 never read this symbol's feature columns: check every page's CRC here, so a
            # damaged features file is refused whether or not it has sessions (as when the stage read it whole)
            _read_feature_columns(fdir, sym, None, n_rows[k])
    mean, std = _train_stats(fdir, symbols, n_rows, chosen[train], s, names)  # pass 2

    meta_common = {"params": {"sessions": s.model_dump(mode="json"),
                              "features": settings.features.model_dump(mode="json"),
                              "market": settings.ingest.market.value, "interval": settings.ingest.interval},
                   "input_sha256": inputs, "code": code_version(),
                   "normalization": {n: [float(m), float(v)] for n, m, v in zip(names, mean, std, strict=True)},
                   "volatility_threshold": vol_threshold}
    summary: dict[str, Any] = {"context": s.context, "length": s.length, "features": len(names),
                               "volatility_threshold": vol_threshold, "splits": {}}
    picks: list[tuple[str, int]] = []
    if plot_path is not None:
        from rltrader.dataset.plots import pick_examples

        picks = pick_examples({name: sum(len(st) for st in starts)
                               for (name, _, _), starts in zip(ranges, chosen, strict=True)}, s.example_plots)
    examples: dict[int, ExampleSession] = {}
    with atomic_dir(out) as tmp:
        for (name, _, _), starts_by_sym in zip(ranges, chosen, strict=True):  # pass 3, a split at a time
            wanted = {i: k for k, (split, i) in enumerate(picks) if split == name}
            summary["splits"][name] = _write_split(tmp / name, name, meta_common, fdir, symbols, names, n_rows,
                                                   starts_by_sym, s, mean, std, wanted, examples)
        write_json(tmp / "summary.json", summary)
    summary["feature_stats"] = {n: {"train_mean": float(m), "train_std": float(v)}
                                for n, m, v in zip(names, mean, std, strict=True)}
    if metrics_path is not None:
        write_json(metrics_path, summary)
    if plot_path is not None:
        from rltrader.dataset.plots import plot_examples

        plot_examples([examples[k] for k in range(len(picks))], plot_path)
    return summary


_SLICE_ROWS = 1 << 16


def _write_split(directory: Path, name: str, meta: dict[str, Any], fdir: Path, symbols: tuple[str, ...],
                 names: tuple[str, ...], n_rows: list[int], starts_by_sym: list[np.ndarray], s: SessionSettings,
                 mean: np.ndarray, std: np.ndarray, wanted: dict[int, int],
                 examples: dict[int, ExampleSession]) -> dict[str, Any]:
    """One split, a symbol at a time: the rows covered by any kept session (stored once), standardised
    features and the session offsets, appended to the split's ``SplitWriter``; the split's summary entry.
    ``wanted`` maps session numbers in the split to example-plot slots, filled into ``examples``."""
    # the split's row count first (the writer sizes its buffer by it); masks are recomputed per symbol below
    total = sum(int(_covered(n, st, s).sum()) for n, st in zip(n_rows, starts_by_sym, strict=True) if len(st))
    t_lo, t_hi, sessions = np.iinfo(np.int64).max, np.iinfo(np.int64).min, 0
    per_symbol: dict[str, int] = {}
    cols = [*names, *PRICE_COLUMNS, "open_time"]
    with SplitWriter(directory, name, meta, symbols, names, s.context, s.length, total) as w:
        for sym_id, (sym, starts) in enumerate(zip(symbols, starts_by_sym, strict=True)):
            if len(starts) == 0:
                continue
            mask = _covered(n_rows[sym_id], starts, s)
            rows = _read_feature_columns(fdir, sym, cols, n_rows[sym_id]).filter(pl.Series(mask))
            b = (np.cumsum(mask) - 1)[starts]  # session starts as row numbers among the covered rows
            raw = rows.select(names).to_numpy()
            prices = {k: rows[k].to_numpy().astype(np.float64) for k in PRICE_COLUMNS}
            t_us = rows["open_time"].dt.epoch("us").to_numpy()
            del rows
            w.add_sessions(w.rows + b - s.context, w.rows + b, w.rows + b + s.length, t_us[b],
                           np.full(len(b), sym_id, dtype=np.int16))
            # standardised in slices: elementwise, so the same values, without float64 temporaries of the symbol
            for a in range(0, len(raw), _SLICE_ROWS):
                sl = slice(a, a + _SLICE_ROWS)
                w.append(standardize(raw[sl], mean, std, s.clip), {k: v[sl] for k, v in prices.items()}, t_us[sl],
                         np.full(len(t_us[sl]), sym_id, dtype=np.int16))
            del raw
            t_lo = min(t_lo, int(t_us[b - s.context].min()))
            t_hi = max(t_hi, int(t_us[b + s.length - 1].max()))
            for i, slot in wanted.items():
                if sessions <= i < sessions + len(b):
                    st = int(b[i - sessions])
                    lo, en = st - s.context, st + s.length
                    examples[slot] = ExampleSession(name, sym, prices["close"][lo:en].copy(),
                                                    prices["low"][lo:en].copy(), prices["high"][lo:en].copy(),
                                                    int(t_us[st]), s.context)
            sessions += len(b)
            per_symbol[sym] = len(b)
            del prices, t_us
    return {"sessions": sessions, "rows": total, "start": _ts(t_lo), "end": _ts(t_hi), "symbols": per_symbol}


def _train_stats(features_dir: Path, symbols: tuple[str, ...], n_rows: list[int], starts_by_sym: list[np.ndarray],
                 s: SessionSettings, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Mean/std of each feature over the bars train sessions use (context included), float64; a symbol's
    frame at a time, summed in symbol order."""
    total = np.zeros(len(names))
    total2 = np.zeros(len(names))
    count = 0
    for sym, n, starts in zip(symbols, n_rows, starts_by_sym, strict=True):
        if len(starts) == 0:
            continue
        mask = _covered(n, starts, s)
        frame = _read_feature_columns(features_dir, sym, list(names), n)
        x = frame.filter(pl.Series(mask)).select(names).to_numpy().astype(np.float64)
        del frame
        total += x.sum(axis=0)
        total2 += (x * x).sum(axis=0)
        count += len(x)
    mean = total / count
    std = np.sqrt(np.maximum(total2 / count - mean * mean, 0.0))
    std[std < 1e-12] = 1.0
    return mean, std
