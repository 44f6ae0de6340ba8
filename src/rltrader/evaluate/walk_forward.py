"""Walk-forward evaluation: rolling (or expanding) train/test windows over the data; in each fold the sessions
are rebuilt for that fold's dates, an agent is trained from scratch, and it is backtested with the baselines on the
fold's test window — which no choice of that fold has seen.

One test period can flatter or sink any model; the per-fold table and the aggregate (mean, spread, the worst fold)
show whether a result repeats. Each fold reuses the stage functions (``run_sessions_stage``, ``run_train``,
``run_backtest``): a fold is the pipeline with other dates, nothing is re-implemented here.

Fold ``k`` (``params.yaml: walk_forward``): train ``[t0, t1 - val_days)``, val ``[t1 - val_days, t1)`` (model
selection), test ``[t1, t1 + test_days)``; the sessions stage's embargo applies at both boundaries.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from rich.console import Console

from rltrader.config import Settings, SplitRange
from rltrader.dataset.build import run_sessions_stage
from rltrader.errors import ConfigError
from rltrader.evaluate.backtest import backtest_params, continuous_split
from rltrader.evaluate.metrics import aggregate_folds, comparison_table, walk_forward_folds
from rltrader.evaluate.report import write_html_report, write_metrics_json
from rltrader.evaluate.stage import SUMMARY_KEYS, baseline_names, evaluate, load_trained

console = Console(stderr=True)


def fold_settings(settings: Settings, fold: tuple[date, date, date, date], out: Path) -> Settings:
    """The settings of one fold: its split dates, and its own sessions/models/checkpoints under ``out``."""
    wf = settings.walk_forward
    train_start, train_end, test_start, test_end = fold
    val_start = train_end - timedelta(days=wf.val_days)
    if val_start <= train_start:
        raise ConfigError(f"walk_forward.val_days: {wf.val_days} days leave no training data in a "
                          f"{wf.train_days}-day window")
    splits = {"train": SplitRange(start=train_start.isoformat(), end=val_start.isoformat()),
              "val": SplitRange(start=val_start.isoformat(), end=train_end.isoformat()),
              "backtest": SplitRange(start=test_start.isoformat(), end=test_end.isoformat())}
    return settings.model_copy(update={
        "sessions": settings.sessions.model_copy(update={"splits": splits}),
        "train": settings.train.model_copy(update={"models_dir": out / "models", "checkpoint_dir": out / "ckpt"}),
        "backtest": replace(settings.backtest, split="backtest"),
    })


def _plot_folds(rows: list[dict[str, Any]], names: list[str], metric: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(10, 4))
    x = np.arange(len(rows))
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        vals = [r.get(f"{n}_{metric}") for r in rows]
        ax.bar(x + i * width, [v if v is not None and math.isfinite(v) else 0.0 for v in vals], width, label=n)
    ax.set_xticks(x + 0.4 - width / 2, [f"{r['test_start']}\n→ {r['test_end']}" for r in rows], fontsize=7)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel(metric)
    ax.set_title(f"Walk-forward: {metric} on each fold's test window (net of costs)")
    ax.legend(fontsize=8, ncol=4)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_walk_forward(settings: Settings, *, algo: str | None = None, out_dir: Path = Path("reports/walk_forward"),
                     features_dir: Path | None = None, max_folds: int | None = None,
                     progress: bool = False) -> dict[str, Any]:
    """Every fold: sessions for its dates → train ``algo`` → backtest it and the baselines on the test window.
    Writes ``metrics.json`` (aggregate), ``folds.json``, ``report.html`` and ``folds.png`` under ``out_dir``."""
    from rltrader.agents import ALGORITHMS
    from rltrader.train import run_train

    wf = settings.walk_forward
    algo = algo or wf.algo
    if algo not in ALGORITHMS:
        raise ConfigError(f"walk_forward.algo: unknown algorithm {algo!r} (one of {', '.join(ALGORITHMS)})")
    folds = walk_forward_folds(date.fromisoformat(wf.start[:10]), date.fromisoformat(wf.end[:10]), wf.train_days,
                               wf.test_days, wf.step_days, expanding=wf.expanding)
    if not folds:
        raise ConfigError(f"walk_forward: no fold fits in [{wf.start}, {wf.end}) with train_days {wf.train_days} "
                          f"and test_days {wf.test_days}")
    folds = folds[:max_folds] if max_folds else folds
    _, env_params = backtest_params(settings)
    bases = baseline_names(env_params.mode)
    metric = settings.promote.metric
    rows: list[dict[str, Any]] = []
    per_policy: dict[str, list[dict[str, float]]] = {n: [] for n in [algo, *bases]}
    for k, fold in enumerate(folds):
        fdir = out_dir / f"fold_{k:02d}"
        fs = fold_settings(settings, fold, fdir)
        console.print(f"walk-forward fold {k + 1}/{len(folds)}: train {fold[0]} → {fold[1]}, test {fold[2]} → "
                      f"{fold[3]}")
        run_sessions_stage(fs, features_dir=features_dir, out_dir=fdir / "sessions")
        trained = run_train(fs, algo, progress=progress, sessions_dir=fdir / "sessions",
                            metrics_path=fdir / f"train_{algo}.json")
        module = load_trained(fs, algo)
        data = continuous_split(fs, "backtest", sessions_dir=fdir / "sessions", features_dir=features_dir)
        results = {name: evaluate(fs, pol, data, "backtest")[1] for name, pol in [*((b, b) for b in bases),
                                                                                   (algo, module)]}
        _, verdicts = comparison_table(results, baselines=bases)
        row: dict[str, Any] = {"fold": k, "train_start": fold[0].isoformat(), "test_start": fold[2].isoformat(),
                               "test_end": fold[3].isoformat(), "run_id": trained["run_id"], "verdict": verdicts[0]}
        for name, m in results.items():
            per_policy[name].append({key: m[key] for key in SUMMARY_KEYS})
            row[f"{name}_{metric}"] = m[metric]
            row[f"{name}_total_return"] = m["total_return"]
        row[f"{algo}_max_drawdown"] = results[algo]["max_drawdown"]
        rows.append(row)
        console.print(f"  {verdicts[0]}")

    aggregate = {name: aggregate_folds(ms) for name, ms in per_policy.items()}
    def num(v: Any) -> float:
        return float(v) if v is not None and math.isfinite(v) else -math.inf  # undefined never wins

    beats = {b: sum(1 for r in rows if num(r[f"{algo}_{metric}"]) > num(r[f"{b}_{metric}"])) for b in bases}
    lines = [f"{algo} beats {b} on {metric} in {n} of {len(rows)} folds" for b, n in beats.items()]
    out_dir.mkdir(parents=True, exist_ok=True)
    fig = _plot_folds(rows, [algo, *bases], metric, out_dir / "folds.png")
    headline = {f"{name}_{k}": v for name, agg in aggregate.items() for k, v in agg.items()
                if k.split("_")[-1] in ("mean", "std", "min") and any(k.startswith(s) for s in (metric,
                                                                                                 "total_return"))}
    write_metrics_json(out_dir / "metrics.json", {"n_folds": float(len(rows)), **headline})
    (out_dir / "folds.json").write_text(json.dumps({"folds": rows, "aggregate": aggregate, "verdicts": lines},
                                                   indent=2, default=str) + "\n")
    agg_rows = [{"policy": name, **{k: v for k, v in agg.items() if k.startswith((metric, "total_return",
                                                                                  "max_drawdown"))}}
                for name, agg in aggregate.items()]
    write_html_report(out_dir / "report.html", f"Walk-forward: {algo}, {len(rows)} folds",
                      {"n_folds": float(len(rows))}, agg_rows, lines, {"Per-fold " + metric: fig},
                      [f"Each fold trains {algo} from scratch on its train window and tests on the next "
                       f"{wf.test_days} days; {'expanding' if wf.expanding else 'rolling'} windows, step "
                       f"{wf.step_days} days."], tables={"Folds": rows})
    for line in lines:
        console.print(line)
    return {"algo": algo, "folds": rows, "aggregate": aggregate, "verdicts": lines,
            "report": str(out_dir / "report.html")}
