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
from rltrader.dataset.split import META_KEY, SessionSet, read_metadata, write_split
from rltrader.errors import ConfigError, DataError
from rltrader.integrity import read_parquet, reading
from rltrader.utils import atomic_dir, git_commit, parse_day, write_json

FEATURES_DIR = "features"
FEATURES_HINT = "re-run `rltrader dataset features` (`dvc repro features`)"
SESSIONS_DIR = "sessions"


# ---------------------------------------------------------------------------------------------------- helpers


def code_version() -> dict[str, str | None]:
    """Package version, git commit and a hash of the dataset code: recorded in every output's metadata."""
    src = Path(__file__).parent
    h = hashlib.sha256()
    for f in sorted(src.glob("*.py")):
        h.update(f.read_bytes())
    return {"rltrader": rltrader.__version__, "git_commit": git_commit(), "dataset_code_sha256": h.hexdigest()[:16]}


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


# ---------------------------------------------------------------------------------------------- sessions stage


@dataclass
class _Candidates:
    """Per symbol: the bars (numpy) and every admissible session start with its context statistics."""

    symbol: str
    frame: pl.DataFrame
    starts: np.ndarray
    vol: np.ndarray
    move: np.ndarray


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


def _candidates(symbol: str, frame: pl.DataFrame, s: SessionSettings, step_us: int) -> _Candidates:
    """Every start ``t`` on the stride grid whose window ``[t - context, t + length)`` is gap-free and valid."""
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
    return _Candidates(symbol, frame, starts, vol, move)


def _split_sessions(c: _Candidates, s: SessionSettings, lo: int, hi: int, embargo_from: int | None,
                    step_us: int) -> np.ndarray:
    """Mask over ``c.starts``: sessions inside ``[lo, hi)`` (context and last bar included), clear of the
    embargo after a boundary."""
    t_us = c.frame["open_time"].dt.epoch("us").to_numpy()
    ctx_time = t_us[c.starts - s.context]
    end_time = t_us[c.starts + s.length - 1] + step_us
    keep = (ctx_time >= lo) & (end_time <= hi)
    if embargo_from is not None:
        keep &= ctx_time >= embargo_from + s.embargo * step_us
    mask: np.ndarray = keep
    return mask


def _covered(n: int, starts: np.ndarray, s: SessionSettings) -> np.ndarray:
    """Boolean mask of the rows any session window ``[start - context, start + length)`` uses."""
    cover = np.zeros(n + 1, dtype=np.int32)
    np.add.at(cover, starts - s.context, 1)
    np.add.at(cover, starts + s.length, -1)
    return np.cumsum(cover[:n]) > 0


def _assemble(cands: list[_Candidates], keeps: list[np.ndarray], s: SessionSettings, names: tuple[str, ...],
              symbols: tuple[str, ...], mean: np.ndarray, std: np.ndarray, meta: dict[str, Any]) -> SessionSet:
    """Rows covered by any kept session (stored once), standardised features, and the session offsets."""
    parts: list[dict[str, np.ndarray]] = []
    ctx, st, en = [], [], []
    offset = 0
    for sym_id, (c, keep) in enumerate(zip(cands, keeps, strict=True)):
        starts = c.starts[keep]
        if len(starts) == 0:
            continue
        mask = _covered(c.frame.height, starts, s)
        new_index = np.cumsum(mask) - 1
        rows = c.frame.filter(pl.Series(mask))
        x = standardize(rows.select(names).to_numpy(), mean, std, s.clip)
        parts.append({
            "features": x,
            **{k: rows[k].to_numpy().astype(np.float64) for k in ("open", "high", "low", "close", "volume")},
            "time": rows["open_time"].dt.epoch("us").to_numpy(),
            "symbol_id": np.full(rows.height, sym_id, dtype=np.int16),
        })
        b = new_index[starts] + offset
        ctx.append(b - s.context)
        st.append(b)
        en.append(b + s.length)
        offset += rows.height
    cat = {k: np.concatenate([p[k] for p in parts]) if parts else np.empty((0, len(names)) if k == "features"
                                                                              else 0) for k in
           ("features", "open", "high", "low", "close", "volume", "time", "symbol_id")}
    empty = np.empty(0, dtype=np.int64)
    return SessionSet(
        features=np.ascontiguousarray(cat["features"], dtype=np.float32),
        open=cat["open"], high=cat["high"], low=cat["low"], close=cat["close"], volume=cat["volume"],
        time=cat["time"].astype(np.int64), symbol_id=cat["symbol_id"].astype(np.int16),
        ctx_start=np.concatenate(ctx) if ctx else empty, start=np.concatenate(st) if st else empty,
        end=np.concatenate(en) if en else empty,
        symbols=symbols, feature_names=names, context=s.context, length=s.length, meta=meta,
    )


def run_sessions_stage(settings: Settings, features_dir: Path | None = None, out_dir: Path | None = None,
                       metrics_path: Path | None = None, plot_path: Path | None = None) -> dict[str, Any]:
    """``sessions`` stage: split by date, select sessions, standardise on train, write splits + summary + plot."""
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
    for sym in symbols:
        frame, fmeta = read_features(fdir, sym)
        names = tuple(fmeta["features"])
        inputs[sym] = fmeta["input_sha256"]
        cands.append(_candidates(sym, frame, s, step_us))
        seg_sizes = frame.filter(pl.col("valid")).group_by("segment").len()["len"]
        longest = max(longest, int(seg_sizes.max() or 0))  # type: ignore[arg-type]
    assert names is not None
    if longest < s.context + s.length:
        raise DataError(f"sessions.context + sessions.length = {s.context + s.length} bars is longer than any "
                        f"gap-free stretch of valid bars ({longest}) for {', '.join(symbols)}")

    # selection thresholds and standardisation are fitted on the train split only (never on later data)
    keeps: dict[str, list[np.ndarray]] = {}
    prev_end: int | None = None
    for name, lo, hi in ranges:
        keeps[name] = [_split_sessions(c, s, lo, hi, lo if prev_end is not None else None, step_us) for c in cands]
        prev_end = hi
    train_vol = np.concatenate([c.vol[k] for c, k in zip(cands, keeps["train"], strict=True)])
    vol_threshold = float(np.percentile(train_vol, s.volatility_percentile)) if len(train_vol) else 0.0
    for name in keeps:
        keeps[name] = [k & (c.vol >= vol_threshold) & (np.abs(c.move) >= s.min_abs_move)
                       for c, k in zip(cands, keeps[name], strict=True)]
    for name, lo, hi in ranges:
        if not any(k.any() for k in keeps[name]):
            raise DataError(f"sessions.splits.{name}: no sessions in [{_ts(lo)}, {_ts(hi)}) for {', '.join(symbols)} "
                            f"with windows of sessions.context + sessions.length = {s.context + s.length} bars "
                            f"(is there data in that range? else shorten the windows, relax "
                            f"sessions.volatility_percentile / min_abs_move or sessions.embargo)")
    mean, std = _train_stats(cands, keeps["train"], s, names)

    meta_common = {"params": {"sessions": s.model_dump(mode="json"),
                              "features": settings.features.model_dump(mode="json"),
                              "market": settings.ingest.market.value, "interval": settings.ingest.interval},
                   "input_sha256": inputs, "code": code_version(),
                   "normalization": {n: [float(m), float(v)] for n, m, v in zip(names, mean, std, strict=True)},
                   "volatility_threshold": vol_threshold}
    summary: dict[str, Any] = {"context": s.context, "length": s.length, "features": len(names),
                               "volatility_threshold": vol_threshold, "splits": {}}
    sets: dict[str, SessionSet] = {}
    with atomic_dir(out) as tmp:
        for name, _, _ in ranges:
            set_ = _assemble(cands, keeps[name], s, names, symbols, mean, std, meta_common)
            write_split(set_, tmp / name, name, meta_common)
            sets[name] = set_
            per_symbol = np.bincount(set_.symbol_id[set_.start], minlength=len(symbols))
            summary["splits"][name] = {
                "sessions": set_.n_sessions, "rows": len(set_.features),
                "start": _ts(int(set_.time[set_.ctx_start].min())), "end": _ts(int(set_.time[set_.end - 1].max())),
                "symbols": {sym: int(n) for sym, n in zip(symbols, per_symbol, strict=True) if n},
            }
        write_json(tmp / "summary.json", summary)
    summary["feature_stats"] = {n: {"train_mean": float(m), "train_std": float(v)}
                                for n, m, v in zip(names, mean, std, strict=True)}
    if metrics_path is not None:
        write_json(metrics_path, summary)
    if plot_path is not None:
        from rltrader.dataset.plots import plot_example_sessions

        plot_example_sessions(sets, plot_path, s.example_plots)
    return summary


def _train_stats(cands: list[_Candidates], keeps: list[np.ndarray], s: SessionSettings,
                 names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Mean/std of each feature over the bars train sessions use (context included), float64."""
    total = np.zeros(len(names))
    total2 = np.zeros(len(names))
    count = 0
    for c, keep in zip(cands, keeps, strict=True):
        starts = c.starts[keep]
        if len(starts) == 0:
            continue
        mask = _covered(c.frame.height, starts, s)
        x = c.frame.filter(pl.Series(mask)).select(names).to_numpy().astype(np.float64)
        total += x.sum(axis=0)
        total2 += (x * x).sum(axis=0)
        count += len(x)
    mean = total / count
    std = np.sqrt(np.maximum(total2 / count - mean * mean, 0.0))
    std[std < 1e-12] = 1.0
    return mean, std
