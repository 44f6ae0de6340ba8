"""``tune xgb``: the study's XGBoost forecaster (``rltrader.study``), tuned on walk-forward folds tiling val.

Fold k fits the forecaster (every horizon of ``study.horizons``) on everything before its window — the train split
and the val days before it, both at ``study.train_stride`` — and scores the forecast on the window as a strategy:
trade a horizon when the forecast return exceeds the round-trip cost (the study's ``k = 1`` threshold, costs from the
execution kernel), net of that cost. The fold's daily Sharpe is that strategy's (per-horizon daily net results
averaged over horizons, ×√365); its per-bar Sharpe is kept too. Test and backtest rows are never loaded.

The tuned values are the study section's ``xgb_rounds``, ``xgb_depth`` and ``xgb_eta`` (params.tuned.yaml →
``study``), which the DVC ``study`` stage reads.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import polars as pl

from rltrader.config import Settings
from rltrader.tune.objectives import Objective, Space, filter_windows

SPACE: Space = {"xgb_rounds": ("int", 50, 400, True), "xgb_depth": ("int", 2, 8, False),
                "xgb_eta": ("float", 0.01, 0.3, True)}


class XGBObjective(Objective):
    kind = "xgb"

    def __init__(self, settings: Settings, *, features_dir: Path | None = None) -> None:
        from rltrader.study.data import load_rows

        super().__init__(settings)
        st = settings.study
        self.space = SPACE
        self.windows = filter_windows(settings)
        self.rows = load_rows(settings, Path(features_dir or settings.data.dir / "features"),
                              list(st.symbols or settings.ingest.symbols), ["train", "val"], train_split="train",
                              train_stride=st.train_stride, eval_stride=1, horizons=list(st.horizons),
                              vol_window=st.vol_window)
        from rltrader.data.schema import interval_us

        self.step = interval_us(settings.ingest.interval)
        self.cost = np.where(self.rows.split_id == 0, self.rows.row_cost("train"), self.rows.row_cost("val"))

    def run_fold(self, k: int, params: dict[str, Any], trial: optuna.Trial) -> tuple[dict[str, float], Any, str]:
        from rltrader.evaluate.metrics import DAYS_PER_YEAR, sharpe_ratio
        from rltrader.study.models import XGB

        st = self.settings.study
        rows = self.rows
        lo = int(np.datetime64(self.windows[k][0], "us").astype(np.int64))
        hi = int(np.datetime64(self.windows[k][1], "us").astype(np.int64))
        t = rows.time
        fit_rows = (t < lo) & ((t // self.step) % st.train_stride == 0)
        score_rows = (t >= lo) & (t < hi) & (rows.split_id == 1)
        day = t // 86_400_000_000
        days = np.unique(day[score_rows])
        per_day = np.zeros((len(st.horizons), len(days)))
        per_bar = np.zeros((len(st.horizons), int(score_rows.sum())))
        n_trades = 0
        for i, h in enumerate(st.horizons):
            y = rows.target(h)
            fit = fit_rows & np.isfinite(y) & (rows.fwd[h] == rows.fwd[h])
            if fit.sum() < 100:
                raise optuna.TrialPruned(f"fold {k}: only {int(fit.sum())} rows to fit horizon {h} on")
            model = XGB(rounds=int(params["xgb_rounds"]), depth=int(params["xgb_depth"]),
                        eta=float(params["xgb_eta"]), threads=st.xgb_threads, seed=st.seed)
            model.fit(rows.x[fit], np.clip(y[fit], -st.target_clip, st.target_clip))
            f_ret = model.predict(rows.x[score_rows]) * rows.sigma[score_rows] * math.sqrt(h)
            r = np.nan_to_num(rows.fwd[h][score_rows])
            cost = self.cost[score_rows]
            trade = (np.abs(f_ret) > cost) & np.isfinite(rows.fwd[h][score_rows])
            net = np.where(trade, np.sign(f_ret) * r - cost, 0.0)
            n_trades += int(trade.sum())
            per_bar[i] = net
            per_day[i] = np.bincount(np.searchsorted(days, day[score_rows]), weights=net, minlength=len(days))
        daily = per_day.mean(axis=0)
        bars_per_year = DAYS_PER_YEAR * 86_400e6 / self.step
        equity = 1.0 + np.cumsum(daily)
        peak = np.maximum.accumulate(np.concatenate([[1.0], equity]))[1:]
        m = {"sharpe_daily_annualized": sharpe_ratio(daily, DAYS_PER_YEAR),
             "sharpe_minute_annualized": sharpe_ratio(per_bar.mean(axis=0), bars_per_year),
             "total_return": float(daily.sum()), "max_drawdown": float(np.max(1.0 - equity / peak, initial=0.0)),
             "n_trades": float(n_trades)}
        frame = pl.DataFrame({"day": (days * 86_400_000_000).astype("datetime64[us]").astype("datetime64[D]"),
                              "ret": daily})
        return m, frame, ""
