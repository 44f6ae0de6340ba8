"""The tuning report: the best trial and how far to trust it.

Written when a study is complete (``rltrader tune`` after its workers finish): ``reports/tune/<study>/`` holds
``summary.json``, ``report.html`` and the Optuna figures (optimisation history, parameter importances, parallel
coordinates — ``optuna.visualization.matplotlib``), all also logged to the study's MLflow parent run; the best
values go to ``params.tuned.yaml`` beside params.yaml, which the train stages read, so ``dvc repro`` retrains
exactly the winner.

Trust: the best trial's deflated Sharpe counts every configuration tried (``evaluate.stats.trials_run``: all Optuna
trials of the storage plus untuned training runs), with the variance of the trials' Sharpe ratios as Bailey & López
de Prado prescribe; the probability of backtest overfitting is CSCV over the complete trials' daily val returns.
For ``filters``, the tuned filters' effect on the untouched backtest split is shown next to the params.yaml
filters' — reported, never used for selection.
"""

from __future__ import annotations

import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import optuna
import polars as pl
import yaml
from optuna.trial import TrialState

from rltrader.config import TUNED_PARAMS, Settings
from rltrader.evaluate.metrics import deflated_sharpe_ratio
from rltrader.evaluate.report import finite_or_none, write_html_report
from rltrader.evaluate.stats import PBO_SPLITS, pbo_cscv, trials_run
from rltrader.integrity import tune_producer, write_report
from rltrader.tune.objectives import nest
from rltrader.tune.runner import PARENT_RUN_ATTR, _experiment_id, open_study
from rltrader.tune.storage import quiet

_NAN = float("nan")


def tuned_params_path() -> Path:
    """``params.tuned.yaml`` beside the params file in use (``RLTRADER_PARAMS`` or ./params.yaml)."""
    return Path(os.environ.get("RLTRADER_PARAMS", "params.yaml")).with_name(TUNED_PARAMS)


def write_tuned_params(kind: str, params: dict[str, Any], note: str, path: Path | None = None) -> Path:
    """Merge the best values into ``params.tuned.yaml`` (other sections, e.g. an earlier ``tune d3qn``, stay):
    ``d3qn``/``ppo`` → that section, ``filters`` → ``backtest``, ``xgb`` → ``study``."""
    path = path or tuned_params_path()
    current: dict[str, Any] = {}
    if path.is_file():
        current = yaml.safe_load(path.read_text()) or {}
    section = {"filters": "backtest", "xgb": "study"}.get(kind, kind)
    current[section] = {**current.get(section, {}), **nest(params)}
    path.write_text(f"# Written by `rltrader tune`; overlaid on params.yaml by rltrader and read by the DVC train "
                    f"stages.\n# {note}\n" + yaml.safe_dump(current, sort_keys=True))
    return path


def _figure(fn: Any, study: optuna.Study, path: Path, **kwargs: Any) -> Path:
    """One Optuna matplotlib figure; when Optuna cannot draw it (e.g. importances of fewer than two complete
    trials) a figure saying why, so the report never silently lacks a plot."""
    try:
        with quiet():  # the matplotlib backend is "experimental" in Optuna
            ax = fn(study, **kwargs)
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        fig.set_size_inches(9, 5)
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        fig, a = plt.subplots(figsize=(9, 2))
        a.axis("off")
        a.text(0.5, 0.5, f"{path.stem}: not drawable ({exc})", ha="center", va="center", wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def daily_matrix(trials: list[optuna.trial.FrozenTrial]) -> np.ndarray:
    """(days, trials) of the trials' daily val returns, aligned by day (a day a trial did not trade counts 0)."""
    frames = [pl.DataFrame(t.user_attrs.get("daily", []), schema={"day": pl.Utf8, f"t{t.number}": pl.Float64},
                           orient="row").unique("day", keep="last") for t in trials]
    if not frames:
        return np.zeros((0, 0))
    wide = frames[0]
    for f in frames[1:]:
        wide = wide.join(f, on="day", how="full", coalesce=True)
    return wide.sort("day").drop("day").fill_null(0.0).to_numpy().astype(np.float64)


def write_tune_report(settings: Settings, kind: str, name: str, url: str) -> dict[str, Any]:
    t = settings.tune
    study, _ = open_study(settings, kind, name, url, create=False)
    trials = study.get_trials(deepcopy=False)
    complete = [tr for tr in trials if tr.state == TrialState.COMPLETE]
    if not complete:
        raise RuntimeError(f"tune {name}: no trial completed ({len(trials)} trials, all pruned or failed)")
    best = study.best_trial
    out_dir = Path(t.out_dir) / name
    out_dir.mkdir(parents=True, exist_ok=True)

    matrix = daily_matrix(complete)
    splits = min(PBO_SPLITS, matrix.shape[0] - matrix.shape[0] % 2)
    pbo: dict[str, Any] = (pbo_cscv(matrix, n_splits=max(splits, 2)) if matrix.size
                           else {"pbo": _NAN, "reason": "no returns"})
    counted = trials_run(storage=url, tracking_uri=settings.train.tracking_uri, experiment=settings.train.experiment)
    best_daily = matrix[:, [tr.number for tr in complete].index(best.number)] if matrix.size else np.zeros(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        srs = matrix.mean(axis=0) / matrix.std(axis=0, ddof=1) if matrix.shape[0] > 1 else np.zeros(0)
    srs = srs[np.isfinite(srs)]
    sr_var = float(np.var(srs, ddof=1)) if len(srs) > 1 else None
    dsr = deflated_sharpe_ratio(best_daily, max(1, counted["total"]), sharpe_variance=sr_var)

    vis = optuna.visualization.matplotlib
    images = {"optimisation history": _figure(vis.plot_optimization_history, study, out_dir / "history.png"),
              "parameter importances": _figure(vis.plot_param_importances, study, out_dir / "importances.png"),
              "parallel coordinates": _figure(vis.plot_parallel_coordinate, study, out_dir / "parallel.png")}

    effect: list[dict[str, Any]] = []
    if kind == "filters":
        effect = filters_effect(settings, best.params)

    states = {s.name.lower(): sum(tr.state == s for tr in trials) for s in TrialState}
    note = (f"study {name!r}, best trial {best.number}, mean fold {t.metric} {best.value:.6g}, "
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    tuned = write_tuned_params(kind, dict(best.params), note)
    summary: dict[str, Any] = {
        "study": name, "kind": kind, "metric": t.metric, "best_trial": best.number, "best_value": best.value,
        "best_params": best.params, "trial_states": states, "trials_counted": counted,
        "deflated_sharpe": dsr, "pbo": {k: v for k, v in pbo.items() if k != "logits"},
        "best_folds": best.user_attrs.get("folds", []), "backtest_effect": effect, "tuned_params": str(tuned),
    }
    write_report(out_dir / "summary.json", finite_or_none(summary), tune_producer(name))
    headline = {"best_value": float(best.value or _NAN), "deflated_sharpe": dsr,
                "trials_counted": float(counted["total"]), "pbo": float(pbo["pbo"]),
                "trials_complete": float(states.get("complete", 0)), "trials_pruned": float(states.get("pruned", 0)),
                "trials_failed": float(states.get("fail", 0))}
    verdicts = [f"Best of {len(complete)} complete trials: trial {best.number}, mean fold {t.metric} "
                f"{best.value:.4g} on walk-forward folds inside train+val (net of costs).",
                f"Deflated Sharpe {dsr:.3f} counts {counted['total']} configurations tried "
                f"({counted['optuna_trials']} Optuna trials, {counted['mlflow_runs']} untuned training runs).",
                (f"Probability of backtest overfitting (CSCV, {pbo.get('n_combinations', 0)} splits): "
                 f"{pbo['pbo']:.2f}" + (" — the best trial is likely overfit." if pbo["pbo"] > 0.5 else ".")
                 if math.isfinite(pbo["pbo"]) else f"PBO not computed: {pbo.get('reason', 'n/a')}.")]
    tables: dict[str, list[dict[str, Any]]] = {
        "Trials": [{"trial": tr.number, "state": tr.state.name, "value": tr.value, **tr.params} for tr in trials],
        "Best trial's folds": best.user_attrs.get("folds", [])}
    if effect:
        tables["Filters on the untouched backtest split (reported, not used to select)"] = effect
    html = write_html_report(out_dir / "report.html", f"Tuning {kind}: study {name}", headline, [], verdicts,
                             images, [f"Best values written to {tuned}; `dvc repro` retrains with them.",
                                      f"Objective: mean over {t.folds} folds of {t.metric}; pruner {t.pruner}."],
                             tables=tables)
    _log_parent(settings, study, headline, [*images.values(), html, out_dir / "summary.json"])
    return {"best_value": best.value, "best_params": best.params, "pbo": pbo["pbo"], "deflated_sharpe": dsr,
            "trials_counted": counted["total"], "report": str(html), "tuned_params": str(tuned),
            "backtest_effect": effect}


def filters_effect(settings: Settings, params: dict[str, Any]) -> list[dict[str, Any]]:
    """The params.yaml filters and the tuned ones, on the backtest split: what the tuning changes out of sample."""
    from rltrader.evaluate.backtest import continuous_split
    from rltrader.tune.objectives import FiltersObjective

    obj = FiltersObjective(settings)
    data = continuous_split(settings, settings.backtest.split)
    rows = []
    for label, p in (("params.yaml filters", {}), ("tuned filters", params)):
        m, _ = obj.backtest(data, p)
        f = obj.filters(p)
        rows.append({"filters": label, "confidence": f.confidence, "cooldown_bars": f.cooldown_bars,
                     "max_trades_per_day": f.max_trades_per_day, **{k: m[k] for k in (
                         "sharpe_daily_annualized", "total_return", "max_drawdown", "n_trades")}})
    return rows


def _log_parent(settings: Settings, study: optuna.Study, metrics: dict[str, float], files: list[Path]) -> None:
    run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if not run_id:
        return
    client, _ = _experiment_id(settings)
    for k, v in metrics.items():
        if math.isfinite(v):
            client.log_metric(run_id, k, v)
    for f in files:
        client.log_artifact(run_id, str(f), "tune")
    client.set_terminated(run_id, "FINISHED")
