"""The backtest's data: a split as continuous gap-free stretches, and the execution/env params of a continuous run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from rltrader.dataset.build import standardize  # the sessions stage's scaling
from rltrader.dataset.normalization import Normalization
from rltrader.dataset.split import SessionSet
from rltrader.env.modes import EnvParams
from rltrader.errors import ConfigError, DataError
from rltrader.execution import ExecutionParams
from rltrader.integrity import read_parquet
from rltrader.utils import parse_day  # the sessions stage's date rule

if TYPE_CHECKING:  # typing only: the settings module imports nothing from here
    from rltrader.config import Settings


def continuous_split(settings: Settings, split: str = "backtest", *, sessions_dir: Path | None = None,
                     features_dir: Path | None = None) -> SessionSet:
    """Every gap-free stretch of valid bars in ``sessions.splits[split]``, per symbol, as a variable-length
    ``SessionSet`` (``length = 0``): sessions ``[stretch_start + context, stretch_end)``, features standardised
    with the train split's statistics (``<sessions>/train`` metadata) and clipped like the sessions stage."""
    s = settings.sessions
    if split not in s.splits:
        raise ConfigError(f"backtest.split: {split!r} is not one of sessions.splits ({', '.join(s.splits)})")
    r = s.splits[split]
    lo = parse_day(r.start, f"sessions.splits.{split}.start")
    hi = parse_day(r.end, f"sessions.splits.{split}.end")
    sdir = Path(sessions_dir or settings.data.dir / "sessions")
    fdir = Path(features_dir or settings.data.dir / "features")
    norm = Normalization.from_sessions(sdir)  # the train split's statistics, as the live trader reads them
    names, mean, std, clip, context = norm.names, norm.mean, norm.std, norm.clip, norm.context
    symbols = tuple(settings.ingest.symbols)
    parts: list[dict[str, np.ndarray]] = []
    ctx, st, en = [], [], []
    offset = 0
    for sym_id, sym in enumerate(symbols):
        path = fdir / f"{sym}.parquet"
        if not path.exists():
            raise DataError(f"{path}: no features for {sym} (run `rltrader dataset features`)")
        f = read_parquet(path, "features file", "re-run `rltrader dataset features`")
        f = f.filter((pl.col("open_time").dt.epoch("us") >= lo) & (pl.col("open_time").dt.epoch("us") < hi))
        if f.is_empty():
            continue
        valid = f["valid"].to_numpy()
        seg = f["segment"].to_numpy()
        brk = np.ones(len(f), bool)
        brk[1:] = (seg[1:] != seg[:-1]) | (valid[1:] != valid[:-1])
        first = np.flatnonzero(brk)
        last = np.concatenate([first[1:], [len(f)]])
        keep = valid[first] & (last - first > context)
        first, last = first[keep], last[keep]
        if len(first) == 0:
            continue
        lens = last - first
        take = np.concatenate([np.arange(a, b) for a, b in zip(first, last, strict=True)])
        rows = f[take]
        parts.append({
            "features": standardize(rows.select(names).to_numpy(), mean, std, clip),
            **{k: rows[k].to_numpy().astype(np.float64) for k in ("open", "high", "low", "close", "volume")},
            "time": rows["open_time"].dt.epoch("us").to_numpy(),
            "symbol_id": np.full(rows.height, sym_id, np.int16),
        })
        b0 = offset + np.concatenate([[0], np.cumsum(lens)[:-1]])
        ctx.append(b0)
        st.append(b0 + context)
        en.append(b0 + lens)
        offset += rows.height
    if not parts:
        raise DataError(f"sessions.splits.{split}: no gap-free stretch longer than the context ({context} bars) in "
                        f"[{r.start}, {r.end}) for {', '.join(symbols)} (is there data in that range?)")
    prices = ("open", "high", "low", "close", "volume")
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k not in prices}
    # the price columns as the rows of one (5, N) block: the env reads it as is (``env.core.bars_block``)
    bars = np.empty((len(prices), offset))
    for i, k in enumerate(prices):
        np.concatenate([p[k] for p in parts], out=bars[i])
    return SessionSet(
        features=np.ascontiguousarray(cat["features"]), open=bars[0], high=bars[1], low=bars[2],
        close=bars[3], volume=bars[4], time=cat["time"].astype(np.int64),
        symbol_id=cat["symbol_id"].astype(np.int16), ctx_start=np.concatenate(ctx).astype(np.int64),
        start=np.concatenate(st).astype(np.int64), end=np.concatenate(en).astype(np.int64), symbols=symbols,
        feature_names=names, context=context, length=0,
        meta={"split": split, "range": [r.start, r.end], "normalization": norm.table, "clip": clip})


def backtest_params(settings: Settings) -> tuple[ExecutionParams, EnvParams]:
    """Execution and env params for a continuous run: the settings', with ``trade_size_quote`` mapped onto the
    env's sizing (module docstring) and stretch ends always force-closed (a position cannot cross a data gap)."""
    from rltrader.env import params_from_settings

    execution, env_params = params_from_settings(settings)
    size = settings.backtest.trade_size_quote
    changes: dict[str, Any] = {"force_close": True}
    if size is not None:
        if env_params.mode == "lowrider":
            changes["base_lot"] = float(size)
        else:
            cap = execution.initial_cash * (execution.leverage if env_params.mode == "futures_session" else 1.0)
            changes["position_size"] = min(1.0, float(size) / cap)
    return execution, replace(env_params, **changes)
