"""What a trial is scored on: walk-forward folds inside train+val, net of costs; test and backtest are never read.

* ``d3qn`` / ``ppo``: expanding walk-forward over ``[train.start, val.end)``. Fold k trains from scratch on
  everything before its validation window (the last ``tune.val_days`` of that select the model, as in
  ``rltrader walk-forward``) and is scored by a continuous backtest over the next ``tune.fold_days``; the last
  fold's window ends where val ends. Sessions of each fold are built once per study and shared by every trial.
* ``filters``: the trained model ``tune.model`` is fixed; its backtest filters (confidence, cooldown, max trades
  per day — ``BacktestFilters``) are scored on ``tune.folds`` consecutive windows tiling the val split.

The objective is the mean fold score (``tune.metric``, default the daily Sharpe net of costs). After each fold the
running mean is reported to Optuna, so the pruner can stop a trial that is already worse than the median trial at
that fold. Each fold's score, dates and (for trained folds) MLflow run go into the trial's user attributes, and so
do its daily val returns: the tuning report's PBO (CSCV) needs every trial's return series.

Every fold reuses the stage functions (``run_sessions_stage``, ``run_train``, ``continuous_split``,
``backtest_sessions``, ``compute_metrics``): nothing of the pipeline is re-implemented here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import itertools
import math
import shutil
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from rltrader.config import Settings, SplitRange
from rltrader.errors import ConfigError

KINDS = ("d3qn", "ppo", "xgb", "filters")
"""What ``rltrader tune`` can tune: the two agents, the study's XGBoost forecaster (``tune/forecast.py``) and a trained
model's backtest filters."""

# name → (type, low, high, log) ; nested keys with dots (``net.hidden``)
Space = dict[str, tuple[str, float, float, bool]]
SPACES: dict[str, Space] = {
    "d3qn": {"lr": ("float", 3e-5, 1e-3, True), "gamma": ("float", 0.9, 0.999, False), "n_step": ("int", 1, 5, False),
             "target_sync": ("int", 250, 5000, True), "per_alpha": ("float", 0.3, 0.9, False),
             "eps_end": ("float", 0.01, 0.1, False)},
    "ppo": {"lr": ("float", 3e-5, 1e-3, True), "ent_coef": ("float", 1e-4, 0.05, True),
            "clip_coef": ("float", 0.1, 0.3, False), "gae_lambda": ("float", 0.9, 0.99, False),
            "update_epochs": ("int", 2, 8, False)},
    "filters": {"confidence": ("float", 0.0, 1.0, False), "cooldown_bars": ("int", 0, 60, False),
                "max_trades_per_day": ("int", 0, 48, False)},
}
"""Search spaces. Ranges stay within what the params.yaml defaults were tuned around; sizes of the networks are
not searched (they change the cost of a trial, not only its quality)."""


def suggest(trial: optuna.Trial, space: Space) -> dict[str, Any]:
    """Flat ``{name: value}`` drawn from ``space``."""
    out: dict[str, Any] = {}
    for name, (kind, lo, hi, log) in space.items():
        out[name] = (trial.suggest_int(name, int(lo), int(hi), log=log) if kind == "int"
                     else trial.suggest_float(name, lo, hi, log=log))
    return out


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"net.hidden": 8}`` → ``{"net": {"hidden": 8}}`` (a params.yaml section's shape)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def replaced(section: Any, **changes: Any) -> Any:
    """A settings section with ``changes``: pydantic models copy, dataclass sections are replaced."""
    if dataclasses.is_dataclass(section) and not isinstance(section, type):
        return dataclasses.replace(section, **changes)
    return section.model_copy(update=changes)


def _day(text: str) -> date:
    return date.fromisoformat(str(text)[:10])


def with_splits(settings: Settings, extra: dict[str, tuple[date, date]]) -> Settings:
    splits = {**settings.sessions.splits, **{k: SplitRange(start=a.isoformat(), end=b.isoformat())
                                             for k, (a, b) in extra.items()}}
    return settings.model_copy(update={"sessions": settings.sessions.model_copy(update={"splits": splits})})


def filter_windows(settings: Settings) -> list[tuple[date, date]]:
    """``tune.folds`` consecutive windows (whole days) tiling the val split."""
    val = settings.sessions.splits.get("val")
    if val is None:
        raise ConfigError("sessions.splits: tuning needs a val split (the filters are tuned on it)")
    lo, hi = _day(val.start), _day(val.end)
    days, k = (hi - lo).days, settings.tune.folds
    if days < k:
        raise ConfigError(f"tune.folds: {k} folds do not fit in the {days}-day val split")
    cuts = [lo + timedelta(days=round(i * days / k)) for i in range(k + 1)]
    return list(itertools.pairwise(cuts))


def train_folds(settings: Settings) -> list[tuple[date, date, date, date]]:
    """Expanding walk-forward folds inside ``[train.start, val.end)``: the last ``tune.folds`` windows of
    ``tune.fold_days``, each trained on everything before it."""
    from rltrader.evaluate.metrics import walk_forward_folds

    sp, t = settings.sessions.splits, settings.tune
    if "train" not in sp or "val" not in sp:
        raise ConfigError("sessions.splits: tuning needs train and val splits (folds lie inside train+val)")
    lo, hi = _day(sp["train"].start), _day(sp["val"].end)
    train_days = (hi - lo).days - t.folds * t.fold_days
    if train_days <= t.val_days:
        raise ConfigError(f"tune: {t.folds} folds of {t.fold_days} days leave {train_days} training days in "
                          f"[{lo}, {hi}), not more than tune.val_days ({t.val_days}); use fewer or shorter folds")
    return walk_forward_folds(lo, hi, train_days, t.fold_days, t.fold_days, expanding=True)


class Objective:
    """Mean fold score of one trial, with the running mean reported after each fold (pruning)."""

    kind: str
    space: Space
    windows: list[tuple[date, date]]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metric = settings.tune.metric

    def run_fold(self, k: int, params: dict[str, Any], trial: optuna.Trial) -> tuple[dict[str, float], Any, str]:
        """Metrics of fold ``k``, its daily returns frame (day, ret), and the MLflow run it made ('' if none)."""
        raise NotImplementedError

    def __call__(self, trial: optuna.Trial) -> float:
        from rltrader.evaluate.metrics import METRIC_NAMES

        if self.metric not in METRIC_NAMES:
            raise ConfigError(f"tune.metric: {self.metric!r} is not a backtest metric ({', '.join(METRIC_NAMES)})")
        params = suggest(trial, self.space)
        rows: list[dict[str, Any]] = []
        daily: list[list[Any]] = []
        for k, (start, end) in enumerate(self.windows):
            m, days, run_id = self.run_fold(k, params, trial)
            score = float(m[self.metric])
            rows.append({"fold": k, "start": start.isoformat(), "end": end.isoformat(), self.metric: score,
                         "total_return": float(m["total_return"]), "max_drawdown": float(m["max_drawdown"]),
                         "n_trades": float(m["n_trades"]), "run_id": run_id})
            daily += [[d.isoformat(), float(r)] for d, r in days.iter_rows()]
            trial.set_user_attr("folds", rows)
            trial.set_user_attr("daily", daily)
            scores = [r[self.metric] for r in rows if math.isfinite(r[self.metric])]
            if scores:
                trial.report(float(np.mean(scores)), k)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"fold {k}: running mean {np.mean(scores):.4g} below the pruner's bar")
        scores = [r[self.metric] for r in rows if math.isfinite(r[self.metric])]
        if not scores:
            raise optuna.TrialPruned(f"{self.metric} is undefined on every fold (e.g. constant returns)")
        return float(np.mean(scores))


class FiltersObjective(Objective):
    """The trained model's backtest filters on windows tiling val; the model itself never changes."""

    kind = "filters"

    def __init__(self, settings: Settings, *, sessions_dir: Path | None = None,
                 features_dir: Path | None = None) -> None:
        from rltrader.data.schema import interval_us
        from rltrader.evaluate.backtest import backtest_params, continuous_split

        super().__init__(settings)
        self.windows = filter_windows(settings)
        self.policy = load_policy_for(settings, settings.tune.model)
        self.space = {k: v for k, v in SPACES["filters"].items()
                      if k != "confidence" or hasattr(self.policy, "scores")}  # rules have no confidence
        self.execution, self.env_params = backtest_params(settings)
        self.bar_us = interval_us(settings.ingest.interval)
        names = {f"tune_fold_{k}": w for k, w in enumerate(self.windows)}
        s = with_splits(settings, names)
        self.data = [continuous_split(s, n, sessions_dir=sessions_dir, features_dir=features_dir) for n in names]

    def filters(self, params: dict[str, Any]) -> Any:
        from rltrader.evaluate.backtest import BacktestFilters

        bt = self.settings.backtest
        return BacktestFilters(confidence=float(params.get("confidence", bt.confidence)),
                               cooldown_bars=int(params.get("cooldown_bars", bt.cooldown_bars)),
                               max_trades_per_day=int(params.get("max_trades_per_day", bt.max_trades_per_day)),
                               stop_loss=bt.stop_loss, take_profit=bt.take_profit, repeat_cycles=bt.repeat_cycles)

    def backtest(self, data: Any, params: dict[str, Any]) -> tuple[dict[str, float], Any]:
        from rltrader.evaluate.backtest import backtest_sessions
        from rltrader.evaluate.metrics import compute_metrics
        from rltrader.evaluate.stats import daily_series

        res = backtest_sessions(data, self.policy, self.execution, self.env_params, self.filters(params),
                                chain=True, bar_us=self.bar_us, seed=self.settings.backtest.seed)
        m = compute_metrics(res.equity, res.trades, initial_cash=res.initial_cash, bootstrap=0)
        return m, daily_series(res.equity, res.initial_cash)

    def run_fold(self, k: int, params: dict[str, Any], trial: optuna.Trial) -> tuple[dict[str, float], Any, str]:
        m, days = self.backtest(self.data[k], params)
        return m, days, ""


class TrainObjective(Objective):
    """Train ``algo`` from scratch in each walk-forward fold with the trial's hyper-parameters."""

    def __init__(self, settings: Settings, algo: str, study_dir: Path, *, features_dir: Path | None = None,
                 on_run: Callable[[str, optuna.Trial, int], None] | None = None) -> None:
        super().__init__(settings)
        self.kind = algo
        self.space = SPACES[algo]
        self.folds = train_folds(settings)
        self.windows = [(f[2], f[3]) for f in self.folds]
        self.study_dir = study_dir
        self.features_dir = features_dir
        self.on_run = on_run
        t = settings.tune
        self.base = settings.model_copy(update={
            "walk_forward": replaced(settings.walk_forward, val_days=t.val_days),
            "backtest": replaced(settings.backtest, bootstrap=0)})

    def sessions(self, k: int, fs: Settings) -> Path:
        """Fold ``k``'s sessions, built once per study (a file lock keeps two local workers from racing)."""
        from rltrader.dataset.build import run_sessions_stage

        sdir = self.study_dir / "sessions" / f"fold_{k}"
        sdir.parent.mkdir(parents=True, exist_ok=True)
        with (sdir.parent / f"fold_{k}.lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            if not (sdir / "done").is_file():
                shutil.rmtree(sdir, ignore_errors=True)
                run_sessions_stage(fs, features_dir=self.features_dir, out_dir=sdir)
                (sdir / "done").write_text("ok\n")
        return sdir

    def run_fold(self, k: int, params: dict[str, Any], trial: optuna.Trial) -> tuple[dict[str, float], Any, str]:
        from rltrader.evaluate.backtest import continuous_split
        from rltrader.evaluate.stage import evaluate, load_trained
        from rltrader.evaluate.stats import daily_series
        from rltrader.evaluate.walk_forward import fold_settings
        from rltrader.train import run_train

        out = self.study_dir / "trials" / f"trial_{trial.number}" / f"fold_{k}"
        fs = fold_settings(self.base, self.folds[k], out)
        sdir = self.sessions(k, fs)
        overrides = deep_merge(dict(getattr(self.settings, self.kind)), nest(params))
        try:
            rec = run_train(fs, self.kind, progress=False, sessions_dir=sdir, overrides=overrides)
            if self.on_run is not None:
                self.on_run(rec["run_id"], trial, k)
            module = load_trained(fs, self.kind)
            data = continuous_split(fs, "backtest", sessions_dir=sdir, features_dir=self.features_dir)
            res, m = evaluate(fs, module, data, "backtest")
        finally:
            with contextlib.suppress(OSError):
                shutil.rmtree(out)  # the model is in MLflow; trials must not fill the disk
        return m, daily_series(res.equity, res.initial_cash), str(rec["run_id"])


def load_policy_for(settings: Settings, name: str) -> Any:
    """A baseline name as is; otherwise the trained model ``<train.models_dir>/<name>.pt`` (or a path / URI)."""
    from rltrader.evaluate.backtest import POLICY_NAMES, backtest_params, load_policy
    from rltrader.evaluate.stage import load_trained

    if name in POLICY_NAMES:
        return name
    if "/" in name or name.endswith(".pt") or ":" in name:
        _, env_params = backtest_params(settings)
        return load_policy(name, env_params.mode, settings.backtest.seed)
    return load_trained(settings, name)
