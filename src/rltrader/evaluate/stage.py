"""The ``backtest`` stage: every trained model and every rule baseline, run continuously over the val and
backtest splits through the same execution model, judged on the same data, net of costs.

Why val as well as backtest: promotion (``rltrader.registry``) asks a challenger to beat the champion on both, and
val is where models were selected, backtest is data no choice has looked at. Both use the continuous run
(``run_backtest``), not sessions, so the numbers are the ones a trader running the model all day would see.

Outputs, for people and for DVC:

- ``reports/backtest.json`` (DVC metrics): per split and policy the headline metrics (``SUMMARY_KEYS``);
- ``reports/backtest/<model>/``: each agent's report (``report.html`` self-contained, PNGs, ``metrics.json``);
- ``reports/backtest/comparison.png``: every policy's equity on the backtest split in one figure;
- ``reports/backtest/summary.json``: every metric of every policy, the tables and the plain verdicts;
- MLflow: each agent's backtest metrics (``backtest_*``, ``val_bt_*``) and report go into the run that trained it,
  so a registered version carries them; baselines go to one ``backtest-baselines`` run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from rich.console import Console

from rltrader.agents.baselines import rule_baselines
from rltrader.config import Settings
from rltrader.dataset.split import SessionSet
from rltrader.errors import ConfigError, DataError
from rltrader.evaluate.backtest import (
    BacktestResult,
    backtest_params,
    continuous_split,
    masked_softmax,
    run_backtest,
)
from rltrader.evaluate.lowrider import run_lowrider_tables
from rltrader.evaluate.metrics import comparison_table, compute_metrics
from rltrader.evaluate.report import (
    SIGNIFICANCE_KEYS,
    finite_or_none,
    log_to_mlflow,
    plot_symbol_equity,
    write_backtest_report,
    write_metrics_json,
)
from rltrader.evaluate.stats import SIGNIFICANCE_BENCHMARKS, counted_trials, significance, tuning_record
from rltrader.integrity import BACKTEST_PRODUCER, read_report, train_producer, write_report

console = Console(stderr=True)

SUMMARY_KEYS: tuple[str, ...] = (
    "total_return", "sharpe_daily_annualized", "sharpe_ci_low", "sharpe_ci_high", "deflated_sharpe", "sortino",
    "max_drawdown", "calmar", "win_rate", "profit_days_pct", "trades_per_day", "exposure", "fees_paid", "n_days",
    "n_trades", "n_trials",
)
"""What ``reports/backtest.json`` keeps per policy (``dvc metrics show`` stays readable); all keys are in
``summary.json`` and MLflow."""

PROB_BARS = 1440
"""Bars of the action-probability figure (one day of minutes)."""


def baseline_names(mode: str) -> list[str]:
    return [str(getattr(p, "name", type(p).__name__)) for p in rule_baselines(mode)]


def load_trained(settings: Settings, name: str, models_dir: Path | None = None) -> Any:
    """A model the train stage wrote (``<train.models_dir>/<name>.pt``): our own file, so full unpickling is safe."""
    from rltrader.agents.packaging import load_policy_file

    path = Path(models_dir or settings.train.models_dir) / f"{name}.pt"
    if not path.is_file():
        raise DataError(f"{path}: no trained model {name!r} (run `rltrader train {name}`, or remove it from "
                        "backtest.models)")
    return load_policy_file(path, {"dvc_stage": f"train@{name}"})


def train_record(name: str, reports_dir: Path = Path("reports")) -> dict[str, Any] | None:
    """What ``rltrader train <name>`` wrote to ``reports/train_<name>.json`` (run id, model URI, val summary)."""
    path = reports_dir / f"train_{name}.json"
    if not path.is_file():
        return None
    return read_report(path, "training record", train_producer(name))


def evaluate(settings: Settings, policy: Any, data: SessionSet, split: str, *, n_trials: int = 1
             ) -> tuple[BacktestResult, dict[str, float]]:
    """One policy continuously over one split's data, and all its metrics."""
    res = run_backtest(settings, policy, split=split, data=data)
    metrics = compute_metrics(res.equity, res.trades, initial_cash=res.initial_cash, n_trials=n_trials,
                              bootstrap=settings.backtest.bootstrap, seed=settings.backtest.seed)
    metrics["bars_per_second"] = float(res.totals.get("bars", 0)) / max(res.meta.get("run_seconds", 0.0), 1e-9)
    return res, metrics


def bars_frame(data: SessionSet) -> pl.DataFrame:
    """Candles of a continuous split (open times), for the example-trades figure."""
    return pl.DataFrame({
        "time": pl.from_epoch(pl.Series(data.time), time_unit="us").dt.replace_time_zone("UTC"),
        "open": data.open, "high": data.high, "low": data.low, "close": data.close,
        "symbol": np.asarray(data.symbols, dtype=object)[data.symbol_id.astype(np.int64)].astype(str),
    })


def action_probabilities(module: Any, data: SessionSet, settings: Settings, n_bars: int = PROB_BARS
                         ) -> tuple[Any, np.ndarray, Sequence[str], np.ndarray]:
    """Softmax of the model's scores over valid actions, bar by bar, on the first day of the split's longest
    stretch, while the model trades it (no filters): what it wanted to do, next to the price (the PPO reference design's
    insight figure)."""
    from rltrader.env.batch import BatchSessionEnv

    execution, env_params = backtest_params(settings)
    sid = int(np.argmax(data.end - data.start))
    env = BatchSessionEnv(data, execution, env_params, num_envs=1, session_schedule=np.array([[sid]]))
    window, state, mask = env.reset(seed=0)
    steps = int(min(n_bars, data.end[sid] - data.start[sid]))
    probs = np.zeros((steps, env_params.n_actions))
    for i in range(steps):
        p, greedy = masked_softmax(module.scores(window, state), mask)
        probs[i] = p[0]
        step = env.step(greedy)
        window, state, mask = step.window, step.state, step.mask
    rows = slice(int(data.start[sid]), int(data.start[sid]) + steps)
    times = pl.from_epoch(pl.Series(data.time[rows]), time_unit="us").dt.replace_time_zone("UTC")
    return times, probs, list(env_params.action_names), data.close[rows]


def _log_agent_run(settings: Settings, run_id: str | None, name: str, per_split: Mapping[str, Mapping[str, float]],
                   files: Mapping[str, Path], primary: str) -> str | None:
    """Backtest metrics and report into the run that trained the model (or a new ``backtest-<name>`` run when
    that run is not in this tracking store)."""
    import mlflow
    from rltrader.agents.common import mlflow_run

    t = settings.train
    if run_id is not None:
        try:
            mlflow.set_tracking_uri(t.tracking_uri)
            mlflow.get_run(run_id)
        except Exception:  # the record points at a run of another store: log beside it instead
            run_id = None
    with mlflow_run(t.tracking_uri, t.experiment, f"backtest-{name}", t.artifact_root, run_id=run_id) as run:
        for split, m in per_split.items():
            prefix = "backtest_" if split == primary else f"{split}_bt_"
            log_to_mlflow(m, {}, prefix=prefix)
        images = {k: v for k, v in files.items() if k not in ("html", "metrics")}
        log_to_mlflow({}, images, html_report=files.get("html"), artifact_dir="backtest")
        return str(run.info.run_id)


def run_backtest_stage(settings: Settings, *, models: Sequence[str] | None = None, models_dir: Path | None = None,
                       out_dir: Path = Path("reports/backtest"), metrics_path: Path | None = Path(
                           "reports/backtest.json"), reports_dir: Path = Path("reports"),
                       sessions_dir: Path | None = None, features_dir: Path | None = None,
                       log_mlflow: bool = True) -> dict[str, Any]:
    """Judge every trained model (``backtest.models``) against every rule baseline on each ``backtest.eval_splits``
    split; write the DVC metrics, reports and MLflow records. Returns the summary (also ``summary.json``)."""
    bt = settings.backtest
    names = list(models if models is not None else bt.models)
    primary = bt.split
    splits = list(dict.fromkeys([*bt.eval_splits, primary]))
    for split in splits:
        if split not in settings.sessions.splits:
            raise ConfigError(f"backtest.eval_splits: {split!r} is not one of sessions.splits "
                              f"({', '.join(settings.sessions.splits)})")
    _, env_params = backtest_params(settings)
    bases = baseline_names(env_params.mode)
    clash = sorted(set(names) & set(bases))
    if clash:
        raise ConfigError(f"backtest.models: {', '.join(clash)} is a baseline name; models are trained model names")
    agents = {n: load_trained(settings, n, models_dir) for n in names}
    records = {n: train_record(n, reports_dir) for n in names}
    tuned = {n: tuning_record(settings, n) for n in names}  # read (and checked) before hours of backtesting
    # every configuration tried is a trial: the models compared here, and every Optuna trial and training run
    # recorded (evaluate.stats.trials_run) — the deflated Sharpe discounts picking the best of all of them
    counted = counted_trials(settings)
    n_trials = max(1, len(agents), counted["total"])

    metrics: dict[str, dict[str, dict[str, float]]] = {}
    tables: dict[str, tuple[list[dict[str, Any]], list[str]]] = {}
    kept: dict[str, BacktestResult] = {}
    primary_data: SessionSet | None = None
    datas: dict[str, SessionSet] = {}
    for split in splits:
        data = datas[split] = continuous_split(settings, split, sessions_dir=sessions_dir, features_dir=features_dir)
        if split == primary:
            primary_data = data
        metrics[split] = {}
        bench: dict[str, tuple[pl.DataFrame, float]] = {}
        for name, policy in [*((b, b) for b in bases), *agents.items()]:
            res, m = evaluate(settings, policy, data, split, n_trials=n_trials if name in agents else 1)
            metrics[split][name] = m
            if name in SIGNIFICANCE_BENCHMARKS:
                bench[name] = (res.equity, res.initial_cash)
            if name in agents and bt.bootstrap > 0:  # SPA / reality check / random entries next to the CIs
                m.update(significance(res.equity, res.trades, res.initial_cash, bench, reps=bt.bootstrap,
                                      seed=bt.seed))
                m.update(tuned[name])
            if split == primary:
                kept[name] = res
            console.print(f"backtest {split:>8} {name:>13}: return {100 * m['total_return']:+.3f} %  "
                          f"Sharpe {m['sharpe_daily_annualized']:+.3f}  max DD {100 * m['max_drawdown']:.2f} %  "
                          f"trades {int(m['n_trades'])}  ({m['bars_per_second']:,.0f} bars/s)")
        tables[split] = comparison_table(metrics[split], baselines=bases)
        for line in tables[split][1]:
            console.print(f"[{split}] {line}")
    assert primary_data is not None
    # the Lowrider question (issue 14): rule vs RL lot sizing, by market regime, on every split
    lowrider = run_lowrider_tables(settings, splits, bt.lowrider_models,
                                   lambda n: load_trained(settings, n, models_dir), datas, out_dir / "lowrider")
    for split in splits:
        for line in lowrider["verdicts"][split]:
            console.print(line)

    out_dir.mkdir(parents=True, exist_ok=True)
    curves = pl.concat([kept[n].combined().select("time", "equity").with_columns(pl.lit(n).alias("symbol"))
                        for n in kept])
    plot_symbol_equity(curves, out_dir / "comparison.png",
                       title=f"{primary} split: equity of every policy (net of costs, all symbols together)")
    bars = bars_frame(primary_data)
    mlflow_runs: dict[str, str | None] = {}
    for name, module in agents.items():
        res = kept[name]
        other = {f"{s} split: agents vs baselines": tables[s][0] for s in splits if s != primary}
        other.update({f"Lowrider, {s} split: rule vs RL lot sizing by regime": lowrider["tables"][s] for s in splits})
        files = write_backtest_report(
            out_dir / name, title=f"{name}: continuous backtest over {primary} {res.meta.get('range')}",
            equity=res.equity, trades=res.trades, metrics=metrics[primary][name], initial_cash=res.initial_cash,
            bars=bars, comparison=tables[primary], action_probs=action_probabilities(module, primary_data, settings),
            tables=other, notes=[
                f"Each symbol trades its own account of {res.initial_cash / max(1, len(primary_data.symbols)):g} "
                f"quote; a position is closed at every data gap. Filters: {res.meta.get('filters')}.",
                f"Deflated Sharpe counts {n_trials} trials: {counted['optuna_trials']} Optuna trial(s), "
                f"{counted['mlflow_runs']} training run(s) outside tuning, at least the {len(agents)} model(s) "
                "compared here. SPA / reality check: p-values that the agent does not beat flat / buy & hold "
                "(stationary bootstrap of daily returns); random entry: the same trades at random entry bars.",
                "Action probabilities: the unfiltered policy on the first day of the split's longest stretch."])
        if log_mlflow:
            rec = records[name] or {}
            mlflow_runs[name] = _log_agent_run(settings, rec.get("run_id"), name,
                                               {s: metrics[s][name] for s in splits}, files, primary)
    if log_mlflow:
        from rltrader.agents.common import mlflow_run

        t = settings.train
        with mlflow_run(t.tracking_uri, t.experiment, "backtest-baselines", t.artifact_root) as run:
            for split in splits:
                for b in bases:
                    log_to_mlflow(metrics[split][b], {}, prefix=f"{split}_{b}_")
            log_to_mlflow({}, {"comparison": out_dir / "comparison.png"}, artifact_dir="backtest")
            mlflow_runs["baselines"] = str(run.info.run_id)

    summary: dict[str, Any] = {
        "trials_counted": {**counted, "n_trials": n_trials},
        "primary_split": primary, "splits": splits, "baselines": bases, "models": names,
        "metrics": finite_or_none(metrics),
        "tables": {s: tables[s][0] for s in splits}, "verdicts": {s: tables[s][1] for s in splits},
        "train_runs": {n: (records[n] or {}).get("run_id") for n in names},
        "model_uris": {n: (records[n] or {}).get("model_uri") for n in names},
        "mlflow_runs": mlflow_runs,
        "lowrider": lowrider,
    }
    write_report(out_dir / "summary.json", summary, BACKTEST_PRODUCER)
    if metrics_path is not None:
        write_metrics_json(metrics_path, {s: {n: {k: m.get(k, math.nan) for k in (*SUMMARY_KEYS, *(
                                                  k for k in SIGNIFICANCE_KEYS if k in m))}
                                              for n, m in metrics[s].items()} for s in splits})
    return summary


def resolve_model_spec(spec: str) -> str:
    """A bare MLflow run id means that run's logged model (``runs:/<id>/model``); anything else is passed on
    (baseline name, ``.pt`` file, ``models:/name@alias``, ``runs:/…``)."""
    s = spec.strip()
    if len(s) == 32 and all(ch in "0123456789abcdef" for ch in s) and not Path(s).exists():
        return f"runs:/{s}/model"
    return s


def run_one_backtest(settings: Settings, spec: str, *, split: str | None = None,
                     out_dir: Path = Path("reports/backtest"), sessions_dir: Path | None = None,
                     features_dir: Path | None = None) -> dict[str, Any]:
    """``rltrader backtest --model SPEC``: one policy (model URI, run id, ``.pt`` file or baseline name) and every
    baseline on the same split, with a report under ``out_dir/<label>/``."""
    from rltrader.evaluate.backtest import load_policy

    split = split or settings.backtest.split
    _, env_params = backtest_params(settings)
    bases = baseline_names(env_params.mode)
    target = resolve_model_spec(spec)
    policy = load_policy(target, env_params.mode, settings.backtest.seed)
    label = target if target in bases else "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in target)[-60:]
    data = continuous_split(settings, split, sessions_dir=sessions_dir, features_dir=features_dir)
    metrics, results = {}, {}
    for name, pol in [*((b, b) for b in bases if b != target), (label, policy)]:
        results[name], metrics[name] = evaluate(settings, pol, data, split)
    rows, verdicts = comparison_table(metrics, baselines=[b for b in bases if b != target])
    res = results[label]
    is_model = hasattr(policy, "scores")
    files = write_backtest_report(
        out_dir / label, title=f"{spec}: continuous backtest over {split} {res.meta.get('range')}",
        equity=res.equity, trades=res.trades, metrics=metrics[label], initial_cash=res.initial_cash,
        bars=bars_frame(data), comparison=(rows, verdicts),
        action_probs=action_probabilities(policy, data, settings) if is_model else None,
        notes=[f"Policy: {target}. Filters: {res.meta.get('filters')}."])
    for line in verdicts:
        console.print(line)
    return {"policy": target, "split": split, "metrics": finite_or_none(metrics[label]), "table": rows,
            "verdicts": verdicts, "report": str(files["html"])}
