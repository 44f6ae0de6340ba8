"""The ``study`` stage (``rltrader study``, DVC stage ``study``): does any horizon carry an edge net of costs?

For each horizon in ``study.horizons`` and each model in ``study.models``: fit on every ``train_stride``-th bar
of the train split (all ``study.symbols`` pooled; features are scale-free), predict every bar of the eval splits,
and measure per split, pooled and per symbol (:func:`rltrader.study.signal.evaluate_forecast`). The threshold
``k`` of the threshold strategy and the model a verdict speaks for are chosen on ``study.select_split`` (val),
then reported unchanged on the other splits (test): the test line is the honest one.

The ablation refits ``study.ablation_model`` without each feature group and reports the select split's IC change
(full − without: positive = the group helps), next to the change a different random seed alone makes, so a
"helps" smaller than that noise is read as noise. Feature defaults (``features.market``, ``features.timeframes``)
are decided from this table on val, never on test or backtest.

Outputs: ``reports/study.json`` (DVC metrics, pooled numbers), ``reports/study/summary.json`` (everything),
``reports/study/report.html`` (self-contained) with PNGs, and an MLflow run named ``study``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from rltrader.errors import DataError
from rltrader.evaluate.report import finite_or_none, write_metrics_json
from rltrader.study.data import StudyRows, load_rows
from rltrader.study.models import feature_group, make_model
from rltrader.study.signal import choose_threshold, evaluate_forecast, pearson

console = Console(stderr=True)
BPS = 1e4
ALL = "ALL"
ADDITION_GROUPS = ("market",)
"""Feature groups that ``features.market`` / ``features.timeframes`` switch (every ``tf*`` group too)."""


def _minutes(h: int, interval: str) -> str:
    from rltrader.data.schema import interval_us

    m = h * interval_us(interval) / 60e6
    return f"{m:g} min" if m < 60 else f"{m / 60:g} h"


def evaluate_split(rows: StudyRows, model: Any, h: int, split: str, cols: np.ndarray | None, study: Any
                ) -> dict[str, Any]:
    """Pooled and per-symbol measurements of a fitted model on one split."""
    k = rows.splits.index(split)
    y = rows.target(h)
    mask = (rows.split_id == k) & np.isfinite(y)
    x = rows.x[mask] if cols is None else rows.x[mask][:, cols]
    f = model.predict(x)
    scale = rows.sigma[mask] * math.sqrt(h)
    f_ret, r, yy = f * scale, rows.fwd[h][mask], y[mask]
    cost, day, sym = rows.row_cost(split)[mask], rows.day[mask], rows.symbol_id[mask]
    out = {ALL: evaluate_forecast(f, yy, f_ret, r, cost, day, ks=study.thresholds, bootstrap=study.bootstrap,
                                  seed=study.seed)}
    for i, s in enumerate(rows.symbols):
        m = sym == i
        if m.sum() >= 3:
            out[s] = evaluate_forecast(f[m], yy[m], f_ret[m], r[m], cost[m], day[m], ks=study.thresholds,
                                       bootstrap=study.bootstrap, seed=study.seed)
    return out


def _split_ic(rows: StudyRows, model: Any, h: int, split: str, cols: np.ndarray | None) -> float:
    k = rows.splits.index(split)
    y = rows.target(h)
    mask = (rows.split_id == k) & np.isfinite(y)
    x = rows.x[mask] if cols is None else rows.x[mask][:, cols]
    return pearson(model.predict(x), y[mask])


def _train_set(rows: StudyRows, h: int, train_split: str, clip: float) -> tuple[np.ndarray, np.ndarray]:
    y = rows.target(h)
    mask = (rows.split_id == rows.splits.index(train_split)) & np.isfinite(y)
    return mask, np.clip(y[mask], -clip, clip)


def _verdict(h: int, interval: str, model: str, select: str, chosen: dict[str, float] | None,
             per_split: dict[str, dict[str, Any]]) -> str:
    head = f"h={h} ({_minutes(h, interval)}), {model}"
    if chosen is None:
        return f"{head}: no threshold with enough trades on {select}: no claim of an edge"
    k = chosen["k"]
    parts = []
    for split, res in per_split.items():
        row = next(r for r in res[ALL]["thresholds"] if r["k"] == k)
        g, c, lo, hi = row["gross"], row["cost"], row["gross_lo"], row["gross_hi"]
        if math.isfinite(g) and g > c:
            word = "EXCEEDS costs" if math.isfinite(lo) and lo > c else "exceeds costs only by luck (CI reaches cost)"
        else:
            word = "does NOT exceed costs"
        parts.append(f"{split}: gross (= break-even cost) {BPS * g:+.2f} [{BPS * lo:+.2f}, {BPS * hi:+.2f}] bps/trade "
                     f"vs cost {BPS * c:.2f} bps over {row['trades']} trades, IC {res[ALL]['ic']:+.4f} "
                     f"[{res[ALL]['ic_lo']:+.4f}, {res[ALL]['ic_hi']:+.4f}] → {word}")
    return f"{head}, k={k:g}×cost chosen on {select}: " + "; ".join(parts)


def run_study_stage(settings: Any, *, features_dir: Path | None = None, out_dir: Path = Path("reports/study"),
                    metrics_path: Path | None = Path("reports/study.json"), log_mlflow: bool = True
                    ) -> dict[str, Any]:
    """Run the signal study on the ``features`` stage output; returns the summary (also ``summary.json``)."""
    st = settings.study
    interval = settings.ingest.interval
    symbols = list(st.symbols or settings.ingest.symbols)
    splits = list(dict.fromkeys([st.train_split, st.select_split, *st.eval_splits]))
    eval_splits = list(dict.fromkeys([st.select_split, *st.eval_splits]))
    t0 = time.perf_counter()
    rows = load_rows(settings, Path(features_dir or settings.data.dir / "features"), symbols, splits,
                     train_split=st.train_split, train_stride=st.train_stride, eval_stride=st.eval_stride,
                     horizons=st.horizons, vol_window=st.vol_window)
    counts = {s: int((rows.split_id == i).sum()) for i, s in enumerate(rows.splits)}
    console.print(f"study: {len(rows.x):,} rows ({counts}), {len(rows.names)} features, {len(symbols)} symbols "
                  f"in {time.perf_counter() - t0:.1f} s", soft_wrap=True)

    results: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in st.models}
    train_ic: dict[str, dict[str, float]] = {m: {} for m in st.models}
    chosen: dict[str, dict[str, Any]] = {m: {} for m in st.models}
    verdicts: list[str] = []
    fit_seconds: dict[str, float] = {}
    for h in st.horizons:
        tr, ytr = _train_set(rows, h, st.train_split, st.target_clip)
        if tr.sum() < 100:
            raise DataError(f"study: only {int(tr.sum())} train rows at horizon {h} (need ≥ 100): is there data in "
                             f"sessions.splits.{st.train_split} for {', '.join(symbols)}?")
        best: tuple[float, str] | None = None
        for name in st.models:
            t1 = time.perf_counter()
            model = make_model(name, st).fit(rows.x[tr], ytr)
            fit_seconds[f"{name}_h{h}"] = time.perf_counter() - t1
            train_ic[name][str(h)] = pearson(model.predict(rows.x[tr]), ytr)
            per = {s: evaluate_split(rows, model, h, s, None, st) for s in eval_splits}
            results[name][str(h)] = per
            ch = choose_threshold(per[st.select_split][ALL]["thresholds"], st.min_trades)
            chosen[name][str(h)] = ch
            ic_sel = per[st.select_split][ALL]["ic"]
            if best is None or (math.isfinite(ic_sel) and ic_sel > best[0]):
                best = (ic_sel if math.isfinite(ic_sel) else -math.inf, name)
            console.print(f"study h={h:>4} {name:>8}: " + "  ".join(
                f"{s} IC {per[s][ALL]['ic']:+.4f} [{per[s][ALL]['ic_lo']:+.4f},{per[s][ALL]['ic_hi']:+.4f}]"
                for s in eval_splits) + f"  (fit {fit_seconds[f'{name}_h{h}']:.1f} s)", soft_wrap=True)
        assert best is not None
        verdicts.append(_verdict(h, interval, best[1], st.select_split, chosen[best[1]][str(h)],
                                 results[best[1]][str(h)]))
        console.print(verdicts[-1], soft_wrap=True)

    ablation = _ablation(rows, st) if st.ablation else {}
    summary: dict[str, Any] = {
        "symbols": symbols, "features": list(rows.names), "horizons": st.horizons, "models": st.models,
        "splits": splits, "select_split": st.select_split, "rows": counts, "train_stride": st.train_stride,
        "round_trip_cost": rows.cost, "train_ic": train_ic, "chosen_threshold": chosen,
        "results": results, "verdicts": verdicts, "ablation": ablation,
        "fit_seconds": fit_seconds, "seconds": time.perf_counter() - t0,
    }
    from rltrader.study.report import write_study_report

    files = write_study_report(out_dir, summary, interval)
    (out_dir / "summary.json").write_text(json.dumps(finite_or_none(summary), indent=2, default=str) + "\n")
    compact = headline_metrics(summary)
    if metrics_path is not None:
        write_metrics_json(metrics_path, compact)
    if log_mlflow:
        summary["mlflow_run"] = _log(settings, compact, files)
    return summary


def _ablation(rows: StudyRows, st: Any) -> dict[str, Any]:
    """Select-split pooled IC of ``ablation_model`` with all features, with a second seed, and without each group."""
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(rows.names):
        groups.setdefault(feature_group(n), []).append(i)
    out: dict[str, Any] = {"model": st.ablation_model, "split": st.select_split, "groups": {
        g: [rows.names[i] for i in idx] for g, idx in groups.items()}, "ic": {}}
    alt = st.model_copy(update={"seed": st.seed + 1})
    # the switchable additions (features.market / features.timeframes) together, on the same rows: what turning
    # them all off would cost (a drop-one ablation understates groups that overlap each other)
    additions = [g for g in groups if g in ADDITION_GROUPS or g.startswith("tf")]
    base = np.array([i for i, n in enumerate(rows.names) if feature_group(n) not in additions])
    for h in st.horizons:
        tr, ytr = _train_set(rows, h, st.train_split, st.target_clip)
        full = _split_ic(rows, make_model(st.ablation_model, st).fit(rows.x[tr], ytr), h, st.select_split, None)
        row: dict[str, float] = {"all": full}
        if st.ablation_model == "xgboost":  # ridge is deterministic: no seed noise to measure
            row["all_other_seed"] = _split_ic(rows, make_model(st.ablation_model, alt).fit(rows.x[tr], ytr), h,
                                              st.select_split, None)
        for g, idx in groups.items():
            cols = np.array([i for i in range(len(rows.names)) if i not in set(idx)])
            if len(cols) == 0:
                continue
            m = make_model(st.ablation_model, st).fit(rows.x[tr][:, cols], ytr)
            row[f"without_{g}"] = _split_ic(rows, m, h, st.select_split, cols)
        if len(additions) > 1:  # with one addition, "without" it is already the base set
            m = make_model(st.ablation_model, st).fit(rows.x[tr][:, base], ytr)
            row["base_only"] = _split_ic(rows, m, h, st.select_split, base)
        out["ic"][str(h)] = row
        console.print(f"ablation h={h:>4}: all {full:+.4f}  " + "  ".join(
            f"{g} {full - row[f'without_{g}']:+.4f}" for g in groups if f"without_{g}" in row), soft_wrap=True)
    return out


def headline_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """``reports/study.json``: per split, model and horizon the pooled IC (with CI), rank IC, hit rate, mean
    |forecast|, round-trip cost and the threshold strategy's gross edge (= break-even cost) at the k chosen on
    the select split, in bps where a return."""
    out: dict[str, Any] = {}
    for model, per_h in summary["results"].items():
        for h, per_split in per_h.items():
            ch = summary["chosen_threshold"][model][h]
            for split, res in per_split.items():
                a = res[ALL]
                row = next((r for r in a["thresholds"] if ch is not None and r["k"] == ch["k"]), None)
                out.setdefault(split, {}).setdefault(model, {})[f"h{h}"] = {
                    "ic": a["ic"], "ic_lo": a["ic_lo"], "ic_hi": a["ic_hi"], "rank_ic": a["rank_ic"],
                    "hit_rate": a["hit_rate"], "mean_abs_forecast_bps": BPS * a["mean_abs_forecast"],
                    "cost_bps": BPS * a["cost"], "k": ch["k"] if ch else math.nan,
                    "trades": row["trades"] if row else 0,
                    "break_even_bps": BPS * row["gross"] if row else math.nan,
                    "break_even_lo_bps": BPS * row["gross_lo"] if row else math.nan,
                    "break_even_hi_bps": BPS * row["gross_hi"] if row else math.nan,
                    "net_bps": BPS * row["net"] if row else math.nan,
                }
    return out


def _log(settings: Any, compact: dict[str, Any], files: dict[str, Path]) -> str:
    from rltrader.agents.common import mlflow_run
    from rltrader.evaluate.report import log_to_mlflow

    t = settings.train
    with mlflow_run(t.tracking_uri, t.experiment, "study", t.artifact_root) as run:
        import mlflow

        mlflow.log_params({f"study.{k}": v for k, v in settings.study.model_dump(mode="json").items()})
        flat = {f"{split}_{model}_{h}_{k}": v for split, per_m in compact.items() for model, per_h in per_m.items()
                for h, m in per_h.items() for k, v in m.items()}
        log_to_mlflow(flat, {k: v for k, v in files.items() if k != "html"}, html_report=files.get("html"),
                      artifact_dir="study")
        return str(run.info.run_id)
