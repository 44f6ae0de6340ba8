"""The study's report: PNG figures and one self-contained HTML page (same conventions as the backtest report,
:mod:`rltrader.evaluate.report`: inline CSS, figures as data URIs, nothing fetched when opened)."""

from __future__ import annotations

import html
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from rltrader.evaluate.report import _CSS, _data_uri, _save, _table

BPS = 1e4
ALL = "ALL"


def best_models(summary: dict[str, Any]) -> dict[str, str]:
    """Per horizon, the model with the highest pooled IC on the select split (the one the verdict speaks for)."""
    sel = summary["select_split"]
    out = {}
    for h in map(str, summary["horizons"]):
        ics = {m: summary["results"][m][h][sel][ALL]["ic"] for m in summary["models"]}
        out[h] = max(ics, key=lambda m: ics[m] if math.isfinite(ics[m]) else -math.inf)
    return out


def plot_ic(summary: dict[str, Any], path: Path) -> Path:
    models, hs = summary["models"], summary["horizons"]
    splits = list(next(iter(summary["results"][models[0]].values())))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.8), squeeze=False, sharey=True)
    x = np.arange(len(hs))
    for ax, m in zip(axes[0], models, strict=True):
        for j, s in enumerate(splits):
            a = [summary["results"][m][str(h)][s][ALL] for h in hs]
            ic = np.array([r["ic"] for r in a])
            lo = np.array([r["ic_lo"] for r in a])
            hi = np.array([r["ic_hi"] for r in a])
            off = (j - (len(splits) - 1) / 2) * 0.15
            ax.errorbar(x + off, ic, yerr=[ic - lo, hi - ic], fmt="o", capsize=3, label=s)
        ax.axhline(0, color="#888", lw=0.8)
        ax.set_xticks(x, [str(h) for h in hs])
        ax.set_xlabel("horizon (bars)")
        ax.set_title(f"{m}: pooled IC with 95 % day-block CI")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("Pearson IC (forecast vs vol-normalised return)")
    return _save(fig, path)


def plot_deciles(summary: dict[str, Any], path: Path) -> Path:
    hs = summary["horizons"]
    best = best_models(summary)
    splits = list(next(iter(summary["results"][summary["models"][0]].values())))
    fig, axes = plt.subplots(len(splits), len(hs), figsize=(3.2 * len(hs), 2.8 * len(splits)), squeeze=False)
    for i, s in enumerate(splits):
        for j, h in enumerate(hs):
            ax = axes[i][j]
            a = summary["results"][best[str(h)]][str(h)][s][ALL]
            d = a["deciles"]
            if not d:
                ax.set_axis_off()
                continue
            ax.bar([r["decile"] for r in d], [BPS * r["realised"] for r in d], color="#4a7bd0")
            c = BPS * a["cost"]
            ax.axhline(c, color="#a01010", ls="--", lw=0.9)
            ax.axhline(-c, color="#a01010", ls="--", lw=0.9)
            ax.axhline(0, color="#888", lw=0.6)
            ax.set_title(f"{s}, h={h}, {best[str(h)]}", fontsize=9)
            ax.set_xticks(range(1, 11))
            ax.tick_params(labelsize=7)
            if j == 0:
                ax.set_ylabel("mean realised return (bps)")
            if i == len(splits) - 1:
                ax.set_xlabel("forecast decile")
    fig.suptitle("Forecast decile → realised return, entry→exit at fills (red: ± round-trip cost)", fontsize=10)
    return _save(fig, path)


def plot_ablation(summary: dict[str, Any], path: Path) -> Path:
    ab = summary["ablation"]
    hs = [str(h) for h in summary["horizons"]]
    groups = list(ab["groups"])
    keys = [f"without_{g}" for g in groups]
    if any("base_only" in ab["ic"][h] for h in hs):
        groups.append("all additions")
        keys.append("base_only")
    delta = np.array([[ab["ic"][h]["all"] - ab["ic"][h].get(k, math.nan) for h in hs] for k in keys])
    fig, ax = plt.subplots(figsize=(1.2 * len(hs) + 3, 0.45 * len(groups) + 1.5))
    lim = float(np.nanmax(np.abs(delta))) if np.isfinite(delta).any() else 1.0
    im = ax.imshow(delta, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    for i in range(len(groups)):
        for j in range(len(hs)):
            ax.text(j, i, f"{delta[i, j]:+.4f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(hs)), hs)
    ax.set_yticks(range(len(groups)), groups)
    ax.set_xlabel("horizon (bars)")
    ax.set_title(f"{ab['model']}: {ab['split']} IC(all) − IC(without group)  (> 0: the group helps)")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def _rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for m in summary["models"]:
        for h in map(str, summary["horizons"]):
            ch = summary["chosen_threshold"][m][h]
            for s, res in summary["results"][m][h].items():
                a = res[ALL]
                row = next((r for r in a["thresholds"] if ch is not None and r["k"] == ch["k"]), None)
                out.append({"split": s, "model": m, "h": int(h), "IC": a["ic"], "IC lo": a["ic_lo"],
                            "IC hi": a["ic_hi"], "rank IC": a["rank_ic"], "hit rate": a["hit_rate"],
                            "train IC": summary["train_ic"][m][h],
                            "mean |f| bps": BPS * a["mean_abs_forecast"], "cost bps": BPS * a["cost"],
                            "k (val)": ch["k"] if ch else math.nan, "trades": row["trades"] if row else 0,
                            "gross = break-even bps": BPS * row["gross"] if row else math.nan,
                            "gross lo": BPS * row["gross_lo"] if row else math.nan,
                            "gross hi": BPS * row["gross_hi"] if row else math.nan,
                            "net bps": BPS * row["net"] if row else math.nan})
    return out


def _symbol_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for m in summary["models"]:
        for h in map(str, summary["horizons"]):
            for s, res in summary["results"][m][h].items():
                for sym, a in res.items():
                    if sym == ALL:
                        continue
                    out.append({"split": s, "model": m, "h": int(h), "symbol": sym, "n": a["n"], "IC": a["ic"],
                                "IC lo": a["ic_lo"], "IC hi": a["ic_hi"], "rank IC": a["rank_ic"],
                                "hit rate": a["hit_rate"], "mean |f| bps": BPS * a["mean_abs_forecast"],
                                "cost bps": BPS * a["cost"]})
    return out


def _ablation_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    ab = summary["ablation"]
    out = []
    for h, r in ab["ic"].items():
        row: dict[str, Any] = {"h": int(h), "IC all": r["all"]}
        if "all_other_seed" in r:
            row["seed noise"] = r["all"] - r["all_other_seed"]
        for g in ab["groups"]:
            if f"without_{g}" in r:
                row[g] = r["all"] - r[f"without_{g}"]
        if "base_only" in r:
            row["all additions"] = r["all"] - r["base_only"]
        out.append(row)
    return out


def write_study_report(out_dir: Path, summary: dict[str, Any], interval: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    images = {"ic": plot_ic(summary, out_dir / "ic.png"), "deciles": plot_deciles(summary, out_dir / "deciles.png")}
    if summary.get("ablation"):
        images["ablation"] = plot_ablation(summary, out_dir / "ablation.png")
    esc = html.escape
    title = f"Signal study: {', '.join(summary['symbols'])}, {interval} bars"
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{esc(title)}</h1>",
             f'<p class="muted">generated {datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}; rows {summary["rows"]}'
             f' (train every {summary["train_stride"]}th bar); {summary["seconds"]:.0f} s</p>', "<h2>Verdict</h2><ul>"]
    parts += [f'<li class="{"good" if v.endswith("→ EXCEEDS costs") else "bad"}">{esc(v)}</li>'
              for v in summary["verdicts"]]
    parts.append("</ul><h2>How to read the numbers</h2>")
    for note in (
        "Target: log return from the fill after the decision bar (next open) to the open h bars later, divided by "
        "the trailing 1-bar volatility × √h. IC: Pearson correlation of forecast and target over all rows of the "
        "split (pooled over symbols); the interval resamples blocks of whole days.",
        "Threshold strategy: trade in the forecast's direction when |forecast| (in return units) > k × round-trip "
        "cost; k is chosen on the select split (largest total net), then applied unchanged elsewhere. Its gross "
        "mean per trade is the break-even round-trip cost: the edge exists net of costs only where it exceeds the "
        "cost column, and is called EXCEEDS only when the lower end of its 95 % day-block interval does.",
        "Costs: 2 × taker fee plus both legs' slippage (half spread + square-root impact at the split's median bar "
        "volume for a position of initial_cash × position_size × leverage), from the execution kernel's fill_price.",
        "Trades at neighbouring bars overlap (a position held h bars): gross per trade is an expectation, not a "
        "count of independent bets.",
    ):
        parts.append(f'<div class="note">{esc(note)}</div>')
    parts.append("<h2>Pooled results</h2>" + _table(_rows(summary)))
    if summary.get("ablation"):
        ab = summary["ablation"]
        parts.append(f"<h2>Ablation ({esc(ab['model'])}, {esc(ab['split'])}): IC(all) − IC(without group)</h2>")
        parts.append(_table(_ablation_rows(summary)))
        parts.append(_table([{"group": g, "features": ", ".join(n)} for g, n in ab["groups"].items()]))
    parts.append("<h2>Per symbol</h2>" + _table(_symbol_rows(summary)))
    parts.append("<h2>Round-trip cost (bps)</h2>" + _table(
        [{"split": s, **{k: BPS * v for k, v in c.items()}} for s, c in summary["round_trip_cost"].items()]))
    parts.append("<h2>Figures</h2>")
    for cap, p in images.items():
        parts.append(f'<figure><img alt="{esc(cap)}" src="{_data_uri(p)}"><figcaption>{esc(cap)}</figcaption>'
                     "</figure>")
    parts.append("</body></html>\n")
    path = out_dir / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return {"html": path, **images}
