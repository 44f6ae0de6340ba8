"""Forecast-as-feature (``features.forecast``): the signal study's XGBoost forecaster output as extra columns
``fc_<h>`` that D3QN and PPO see like any other feature. Off by default: the study finds out-of-sample IC of
0.00–0.04, and a column is only worth the agents' capacity when val says it helps.

Causal by construction, and fitted on train only:

- The forecast at bar ``t`` is ``model(features[t])``: features are causal, so is the input.
- The model is refitted walk-forward inside the train split: refit dates every ``forecast_refit_days`` from the
  train start, and the model used in ``[b_i, b_{i+1})`` is fitted only on train rows whose whole target (exit
  bar's open included) lies before ``b_i``. From the train split's end on (val, test, backtest and later) the
  last model — fitted on the train split only — is frozen. Rows before the first model (the first refit period
  and anything before the train split) get 0, the forecast of "no edge".
- Hence no value at ``t`` can change when data after ``t`` changes (``tests/test_forecast_features.py`` mutates
  the bars after a cut and checks every earlier value), and no val/test/backtest price ever reaches a fit.

Why walk-forward and not one model for all train rows: a model fitted on the train split predicts its own train
rows in sample (the study: XGBoost IC 0.18–0.22 in sample vs 0–0.06 out of sample). An agent trained on train
sessions would learn to trust a column that is only that good where it trains, and be misled everywhere else.

The live trader computes features from bars (``live.features``) and has no forecast column: a model trained with
``features.forecast`` on is refused there by its feature count until the live path computes it too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq
from rich.console import Console

from rltrader.data.schema import interval_us
from rltrader.dataset.split import META_KEY
from rltrader.errors import DataError
from rltrader.utils import parse_day

console = Console(stderr=True)
DAY_US = 86_400_000_000


def forecast_names(horizons: list[int]) -> tuple[str, ...]:
    return tuple(f"fc_{h}" for h in horizons)


def refit_dates(settings: Any) -> np.ndarray:
    """Start of each model's period (µs): every ``forecast_refit_days`` from the train start, before its end."""
    r = settings.sessions.splits[settings.study.train_split]
    lo = parse_day(r.start, f"sessions.splits.{settings.study.train_split}.start")
    hi = parse_day(r.end, f"sessions.splits.{settings.study.train_split}.end")
    step = settings.features.forecast_refit_days * DAY_US
    return np.append(np.arange(lo, hi, step, dtype=np.int64), hi)


def add_forecast_columns(settings: Any, features_dir: Path) -> tuple[str, ...]:
    """Append ``fc_<h>`` for each ``features.forecast`` horizon to every symbol's features file in
    ``features_dir`` (module docstring); returns the new column names."""
    from rltrader.study.data import load_rows
    from rltrader.study.models import make_model

    p, st = settings.features, settings.study
    horizons = list(p.forecast)
    symbols = list(settings.ingest.symbols)
    rows = load_rows(settings, features_dir, symbols, [st.train_split], train_split=st.train_split,
                     train_stride=st.train_stride, eval_stride=1, horizons=horizons, vol_window=st.vol_window)
    step = interval_us(settings.ingest.interval)
    lat = int(settings.execution.latency_bars)
    dates = refit_dates(settings)
    frames = {s: pl.read_parquet(features_dir / f"{s}.parquet") for s in symbols}
    names = tuple(rows.names)
    out: dict[str, dict[str, np.ndarray]] = {s: {} for s in symbols}
    for h in horizons:
        y = rows.target(h)
        # a row's target is known once its exit bar opens: time + (1 + latency + h) bars
        known = rows.time + (1 + lat + h) * step
        models: list[Any] = []
        for b in dates:
            fit = np.isfinite(y) & (known <= b)
            if fit.sum() < max(100, len(names)):
                models.append(None)
                continue
            models.append(make_model("xgboost", st).fit(rows.x[fit], np.clip(y[fit], -st.target_clip, st.target_clip)))
        console.print(f"features.forecast h={h}: {sum(m is not None for m in models)} walk-forward model(s), "
                      f"the last one fitted on {int((np.isfinite(y) & (known <= dates[-1])).sum()):,} train rows",
                      soft_wrap=True)
        for s, f in frames.items():
            t = f["open_time"].dt.epoch("us").to_numpy()
            x = f.select(names).to_numpy().astype(np.float32)
            # period i = [dates[i], dates[i+1]); the last model from the train end on; before dates[0]: none
            period = np.searchsorted(dates, t, side="right") - 1
            fc = np.zeros(len(t), np.float32)
            for i, m in enumerate(models):
                sel = period == i
                if m is not None and sel.any():
                    fc[sel] = m.predict(x[sel]).astype(np.float32)
            fc[~np.isfinite(fc)] = 0.0
            out[s][f"fc_{h}"] = fc
    added = forecast_names(horizons)
    for s, f in frames.items():
        path = features_dir / f"{s}.parquet"
        meta = json.loads(pq.read_schema(path).metadata[META_KEY])
        if set(added) & set(meta["features"]):
            raise DataError(f"{path}: already has forecast columns {sorted(set(added) & set(meta['features']))}")
        meta["features"] = [*meta["features"], *added]
        meta["forecast"] = {"horizons": horizons, "refit_days": p.forecast_refit_days, "model": "xgboost",
                            "fit_split": st.train_split}
        table = f.with_columns(*(pl.Series(n, out[s][n]) for n in added)).to_arrow()
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
        pq.write_table(table, path, compression="zstd", use_dictionary=False, write_page_checksum=True)
    return added
