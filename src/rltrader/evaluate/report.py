"""The backtest report: PNG figures, a DVC metrics file, MLflow logging, and one self-contained HTML page.

Why self-contained: a report is read weeks later, on a laptop, maybe offline, and is archived as a DVC output or an
MLflow artifact. So the HTML embeds every figure as a base64 ``data:`` URI, carries its CSS inline, and links to
nothing. PNGs (not SVG or JS charts) because DVC image plots and MLflow's artifact viewer render them offline.
Candles are drawn with plain matplotlib rectangles and lines to avoid a plotting dependency for one figure.

Inputs follow the column contract in :mod:`rltrader.evaluate.metrics`.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates
import matplotlib.pyplot as plt
import numpy as np
import polars as pl
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from rltrader.evaluate.metrics import METRIC_NAMES, SHARPE_ANNUALIZATION_NOTE, combined_equity, drawdown

MAX_LINE_POINTS = 20_000
"""Longer curves are thinned chunk-wise before plotting (last equity and worst drawdown of each chunk kept)."""
MAX_CANDLES = 300
"""Longer trade windows are merged into coarser candles so the bodies stay visible."""
_DPI = 110

METRIC_HELP: dict[str, str] = {
    "total_return": "final equity / initial cash − 1, net of costs",
    "final_balance_change_pct": "total return in percent",
    "annualized_return": "mean daily return × 365 (arithmetic)",
    "sharpe_daily_annualized": "mean/std of UTC daily returns × √365",
    "sharpe_minute_annualized": "mean/std of per-bar returns × √(bars per year)",
    "sortino": "mean / downside deviation of daily returns × √365",
    "max_drawdown": "largest fall from a running equity peak (fraction)",
    "calmar": "annualized return / max drawdown",
    "win_rate": "fraction of round trips with positive net pnl",
    "direction_accuracy": "fraction of sided decisions whose direction was right",
    "profit_days_pct": "percent of days with a positive return",
    "trades_per_day": "round trips per day",
    "avg_trade_size": "mean entry notional (quote)",
    "avg_trade_pnl": "mean net pnl per round trip (quote)",
    "exposure": "fraction of bars holding a position",
    "turnover": "traded notional (both legs) / mean equity per day",
    "fees_paid": "fees paid (quote)",
    "sharpe_ci_low": "95% circular block bootstrap over days, lower",
    "sharpe_ci_high": "95% circular block bootstrap over days, upper",
    "return_ci_low": "95% circular block bootstrap over days, lower",
    "return_ci_high": "95% circular block bootstrap over days, upper",
    "probabilistic_sharpe": "P(true Sharpe > 0), skew/kurtosis corrected",
    "deflated_sharpe": "P(true Sharpe > best of n_trials lucky trials)",
    "n_trials": "configurations tried before this one was picked",
    "bootstrap_block_days": "bootstrap block length, round(√days)",
    "spa_pvalue_vs_flat": "Hansen's SPA p-value vs flat (stationary bootstrap of daily returns; small = beats it)",
    "spa_pvalue_vs_buy_and_hold": "Hansen's SPA p-value vs buy & hold (small = beats it beyond luck)",
    "reality_check_pvalue_vs_flat": "White's reality check p-value vs flat",
    "reality_check_pvalue_vs_buy_and_hold": "White's reality check p-value vs buy & hold",
    "random_entry_pvalue": "P(same trades at random entry bars do as well); small = timing matters",
    "pbo": "probability of backtest overfitting of the tuning study (CSCV)",
    "tune_trials": "finished trials of the tuning study that chose this model's parameters",
}
SIGNIFICANCE_KEYS = ("spa_pvalue_vs_flat", "spa_pvalue_vs_buy_and_hold", "reality_check_pvalue_vs_flat",
                     "reality_check_pvalue_vs_buy_and_hold", "random_entry_pvalue", "pbo", "tune_trials")
"""Shown right after the bootstrap intervals: the other answers to "could this be luck?"."""


# ---------------------------------------------------------------------------------------------------- helpers
def _save(fig: Figure, path: Path | str) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return p


def _empty_figure(path: Path | str, message: str) -> Path:
    """A figure that says why it is empty: a missing PNG would break the DVC plot and the report's layout."""
    fig, ax = plt.subplots(figsize=(8, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=12)
    return _save(fig, path)


def _datetimes(values: Any) -> np.ndarray:
    """Naive UTC ``datetime64[us]`` from a polars Series, numpy array or sequence of datetimes (matplotlib's date
    converter takes naive datetime64 directly)."""
    if isinstance(values, pl.Series):
        s = values.dt.replace_time_zone(None) if isinstance(values.dtype, pl.Datetime) else values
        return s.cast(pl.Datetime("us")).to_numpy()
    arr = np.asarray(values)
    if arr.dtype.kind == "M":
        return arr.astype("datetime64[us]")
    out = [v.astimezone(UTC).replace(tzinfo=None) if isinstance(v, datetime) and v.tzinfo else v for v in arr]
    return np.asarray(out, dtype="datetime64[us]")


def _chunk_bounds(n: int, max_points: int) -> np.ndarray:
    k = max(1, math.ceil(n / max_points))
    return np.arange(0, n, k)


def _format_time_axis(ax: Axes) -> None:
    loc = mdates.AutoDateLocator()  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(loc)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(loc))  # type: ignore[no-untyped-call]


def _num(t: np.ndarray) -> np.ndarray:
    """Matplotlib date numbers (float days), needed where a width or span is given in days."""
    return np.asarray(mdates.date2num(t), dtype=np.float64)  # type: ignore[no-untyped-call]


# ------------------------------------------------------------------------------------------------------ plots
def plot_equity_drawdown(equity: pl.DataFrame, path: Path | str, *, initial_cash: float | None = None,
                         title: str = "Equity (net of costs) and drawdown") -> Path:
    """Combined equity curve over a drawdown panel — the first figure to look at: how much was made and how deep
    the account fell on the way. ``initial_cash`` (default: the first equity) is the starting peak."""
    curve = combined_equity(equity)
    if curve.height == 0:
        return _empty_figure(path, "no equity rows")
    eq = curve["equity"].to_numpy().astype(np.float64)
    t = _datetimes(curve["time"])
    start = float(initial_cash) if initial_cash is not None else float(eq[0])
    dd = drawdown(eq, start)
    if len(eq) > MAX_LINE_POINTS:  # keep each chunk's last equity and its worst drawdown
        b = _chunk_bounds(len(eq), MAX_LINE_POINTS)
        last = np.minimum(np.append(b[1:], len(eq)) - 1, len(eq) - 1)
        eq, t, dd = eq[last], t[last], np.maximum.reduceat(dd, b)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True, height_ratios=[3, 1.3])
    ax1.plot(t, eq, lw=1.1, color="#1f5fa8")
    ax1.axhline(start, color="grey", lw=0.8, ls="--")
    ax1.set_ylabel("equity (quote)")
    ax1.set_title(f"{title} — return {eq[-1] / start - 1:+.2%}, max drawdown {dd.max():.2%}")
    ax1.grid(alpha=0.3)
    ax2.fill_between(t, -100 * dd, 0, color="#c0392b", alpha=0.5, step="post")
    ax2.set_ylabel("drawdown %")
    ax2.grid(alpha=0.3)
    _format_time_axis(ax2)
    return _save(fig, path)


def plot_symbol_equity(equity: pl.DataFrame, path: Path | str, *, title: str = "Equity per symbol") -> Path:
    """One equity line per symbol (the ``"ALL"`` curve dashed when present): shows whether the result comes from
    one market or from all of them."""
    if equity.height == 0:
        return _empty_figure(path, "no equity rows")
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for sym in sorted(equity["symbol"].unique().to_list()):
        part = equity.filter(pl.col("symbol") == sym).sort("time")
        eq = part["equity"].cast(pl.Float64).to_numpy()
        t = _datetimes(part["time"])
        if len(eq) > MAX_LINE_POINTS:
            idx = _chunk_bounds(len(eq), MAX_LINE_POINTS)
            eq, t = eq[idx], t[idx]
        ax.plot(t, eq, lw=1.6 if sym == "ALL" else 1.0, ls="--" if sym == "ALL" else "-", label=sym)
    ax.set_ylabel("equity (quote)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=4)
    _format_time_axis(ax)
    return _save(fig, path)


def _draw_candles(ax: Axes, x: np.ndarray, o: np.ndarray, h: np.ndarray, low: np.ndarray, c: np.ndarray,
                  width: float) -> None:
    """Candles as wick lines plus body rectangles (``bar``): green up, red down."""
    up = c >= o
    colors = ["#26a269" if u else "#c01c28" for u in up]
    ax.vlines(x, low, h, colors=colors, lw=0.8, zorder=1)
    body = np.abs(c - o)
    body = np.where(body > 0, body, (h - low).max(initial=0.0) * 1e-3 + 1e-12)  # doji stays visible
    ax.bar(x, body, width=width, bottom=np.minimum(o, c), color=colors, edgecolor=colors, lw=0.5, zorder=2)


def _merge_candles(t: np.ndarray, o: np.ndarray, h: np.ndarray, low: np.ndarray, c: np.ndarray,
                   max_candles: int) -> tuple[np.ndarray, ...]:
    b = _chunk_bounds(len(t), max_candles)
    last = np.append(b[1:], len(t)) - 1
    return t[b], o[b], np.maximum.reduceat(h, b), np.minimum.reduceat(low, b), c[last]


def plot_example_trades(bars: pl.DataFrame, trades: pl.DataFrame | None, path: Path | str, n: int = 2) -> Path:
    """The ``n`` most profitable and ``n`` least profitable round trips on candlesticks, entry (▲ long / ▼ short)
    and exit (✕) marked, holding period shaded: whether entries and exits are sensible is visible at a glance in
    a way no aggregate shows (the D3QN reference design's trade figures). Each panel spans the trade plus some
    context bars."""
    if trades is None or trades.height == 0:
        return _empty_figure(path, "no trades in this backtest")
    ordered = trades.sort("pnl", descending=True)
    k = min(n, ordered.height)
    best = ordered.head(k)
    worst = ordered.tail(min(n, ordered.height - k)).reverse()
    picks = [(f"best #{i + 1}", r) for i, r in enumerate(best.iter_rows(named=True))]
    picks += [(f"worst #{i + 1}", r) for i, r in enumerate(worst.iter_rows(named=True))]
    fig, axes = plt.subplots(len(picks), 1, figsize=(10, 3.2 * len(picks)), squeeze=False)
    for ax, (label, tr) in zip(axes[:, 0], picks, strict=True):
        sym_bars = bars.filter(pl.col("symbol") == tr["symbol"]).sort("time")
        entry_t, exit_t = tr["entry_time"], tr["exit_time"]
        span = exit_t - entry_t
        step = sym_bars["time"].diff().drop_nulls().median() if sym_bars.height > 1 else None
        pad = max((step if isinstance(step, timedelta) else span / 10) * 20, span / 4)
        window = sym_bars.filter((pl.col("time") >= entry_t - pad) & (pl.col("time") <= exit_t + pad))
        side = int(np.sign(tr["side"]))
        pnl = float(tr["pnl"])
        notional = float(tr.get("notional") or abs(tr["qty"]) * tr["entry_price"])
        ax.set_title(f"{label}: {tr['symbol']} {'long' if side > 0 else 'short'}  pnl {pnl:+.4g} "
                     f"({pnl / notional:+.2%} of notional)" if notional else f"{label}: pnl {pnl:+.4g}", fontsize=10)
        if window.height:
            t = _datetimes(window["time"])
            o, h, lo, c = (window[c].cast(pl.Float64).to_numpy() for c in ("open", "high", "low", "close"))
            tm, o, h, lo, c = _merge_candles(t, o, h, lo, c, MAX_CANDLES)
            x = _num(tm)
            width = float(np.median(np.diff(x))) * 0.7 if len(x) > 1 else 1 / 1440 * 0.7
            _draw_candles(ax, x, o, h, lo, c, width)
        xe, xx = _num(_datetimes([entry_t, exit_t]))
        color = "#26a269" if pnl > 0 else "#c01c28"
        ax.axvspan(xe, xx, color=color, alpha=0.08, zorder=0)
        ax.plot([xe, xx], [tr["entry_price"], tr["exit_price"]], ls="--", lw=1, color=color, zorder=3)
        ax.scatter([xe], [tr["entry_price"]], marker="^" if side > 0 else "v", s=90, color="#1f5fa8",
                   edgecolor="black", zorder=4, label="entry")
        ax.scatter([xx], [tr["exit_price"]], marker="X", s=80, color=color, edgecolor="black", zorder=4,
                   label="exit")
        ax.xaxis_date()
        _format_time_axis(ax)
        ax.grid(alpha=0.25)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return _save(fig, path)


def plot_action_probabilities(times: Any, probs: np.ndarray, action_names: Sequence[str], price: Any | None,
                              path: Path | str, *, title: str = "Action probabilities over time") -> Path:
    """Price on top, the policy's action probabilities (T, A) stacked below (the PPO reference design's insight):
    shows whether the agent reacts to the market or sits on one action. Long series are averaged chunk-wise."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        return _empty_figure(path, "no action probabilities")
    if p.shape[1] != len(action_names):
        raise ValueError(f"probs has {p.shape[1]} actions but {len(action_names)} names were given")
    t = _datetimes(times)
    pr = None if price is None else np.asarray(price, dtype=np.float64)
    if len(t) > MAX_LINE_POINTS // 4:
        b = _chunk_bounds(len(t), MAX_LINE_POINTS // 4)
        counts = np.diff(np.append(b, len(t)))[:, None]
        p = np.add.reduceat(p, b, axis=0) / counts
        pr = None if pr is None else pr[b]
        t = t[b]
    fig, axes = plt.subplots(2 if pr is not None else 1, 1, figsize=(10, 5.5 if pr is not None else 3.2),
                             sharex=True, squeeze=False, height_ratios=[1.2, 1] if pr is not None else None)
    ax_p = axes[-1, 0]
    if pr is not None:
        axes[0, 0].plot(t, pr, lw=1, color="black")
        axes[0, 0].set_ylabel("price")
        axes[0, 0].set_title(title)
        axes[0, 0].grid(alpha=0.3)
    else:
        ax_p.set_title(title)
    ax_p.stackplot(t, p.T, labels=list(action_names), alpha=0.85)
    ax_p.set_ylim(0, 1)
    ax_p.set_ylabel("probability")
    ax_p.legend(fontsize=8, ncol=len(action_names), loc="upper left")
    _format_time_axis(ax_p)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------- metrics outputs
def finite_or_none(v: Any) -> Any:
    """JSON has no NaN/inf: undefined numbers become ``null``, in nested dicts too."""
    if isinstance(v, Mapping):
        return {k: finite_or_none(x) for k, x in v.items()}
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_metrics_json(path: Path | str, metrics: Mapping[str, Any]) -> Path:
    """DVC metrics file. NaN/inf become ``null`` — JSON has no NaN, and DVC refuses a file that Python's ``json``
    writes with ``NaN`` in it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(finite_or_none(metrics), indent=2, sort_keys=False) + "\n")
    return p


def log_to_mlflow(metrics: Mapping[str, float], images: Mapping[str, Path], *, prefix: str = "",
                  html_report: Path | None = None, artifact_dir: str = "report") -> None:
    """Log finite metrics (``prefix`` + name) and the PNGs / HTML as artifacts of the active MLflow run (MLflow
    starts one if none is active). Non-finite values are skipped: an undefined metric must not show as a 0."""
    import mlflow  # heavy import, only when logging

    mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in metrics.items()
                        if isinstance(v, int | float) and math.isfinite(float(v))})
    for img in images.values():
        if Path(img).is_file():
            mlflow.log_artifact(str(img), artifact_dir)
    if html_report is not None:
        mlflow.log_artifact(str(html_report), artifact_dir)


# ------------------------------------------------------------------------------------------------------- html
_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1120px;color:#222}
h1{font-size:1.5em;margin-bottom:0.2em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:0.86em;margin:8px 0} th,td{border:1px solid #ddd;padding:3px 8px}
th{background:#f3f3f3;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.agent td{background:#eef5ff} .bad{color:#a01010;font-weight:600} .good{color:#176b2c;font-weight:600}
.note{background:#fafae8;border-left:4px solid #d8c650;padding:6px 10px;margin:6px 0}
figure{margin:14px 0} figcaption{font-size:0.9em;color:#555} img{max-width:100%;border:1px solid #eee}
.muted{color:#777;font-size:0.85em}
"""


def _cell(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return '<td class="num">nan</td>'
        return f'<td class="num">{html.escape(f"{v:.4g}")}</td>'
    if isinstance(v, int):
        return f'<td class="num">{v}</td>'
    return f"<td>{html.escape(str(v))}</td>"


def _table(rows: Sequence[Mapping[str, Any]], *, highlight_role: bool = False) -> str:
    if not rows:
        return '<p class="muted">(empty)</p>'
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for r in rows:
        cls = ' class="agent"' if highlight_role and r.get("role") == "agent" else ""
        body.append(f"<tr{cls}>" + "".join(_cell(r.get(c, "")) for c in cols) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def write_html_report(path: Path | str, title: str, metrics: Mapping[str, float],
                      comparison_rows: Sequence[Mapping[str, Any]], verdicts: Sequence[str],
                      images: Mapping[str, Path], notes: Sequence[str], *,
                      tables: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> Path:
    """One HTML file with everything inline: verdicts first (the honest answer), then the metrics with a line on
    what each means, the agents-vs-baselines table, any extra ``tables`` (e.g. walk-forward folds), and the figures
    as base64 PNG data URIs. The Sharpe annualization is always stated. Nothing is fetched when it is opened."""
    esc = html.escape
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{esc(title)}</h1>",
             f'<p class="muted">generated {datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}</p>']
    parts.append("<h2>Verdict</h2>")
    if verdicts:
        parts.append("<ul>" + "".join(
            f'<li class="{"bad" if "NOT" in v or "no claim" in v or "cannot" in v else "good"}">{esc(v)}</li>'
            for v in verdicts) + "</ul>")
    else:
        parts.append('<p class="muted">No comparison was made.</p>')
    parts.append("<h2>How to read the numbers</h2>")
    for note in [SHARPE_ANNUALIZATION_NOTE, *notes]:
        parts.append(f'<div class="note">{esc(note)}</div>')

    parts.append("<h2>Metrics</h2>")
    order = [k for k in METRIC_NAMES if k in metrics]
    at = order.index("return_ci_high") + 1 if "return_ci_high" in order else len(order)
    order[at:at] = [k for k in SIGNIFICANCE_KEYS if k in metrics]
    order += [k for k in metrics if k not in order]
    parts.append(_table([{"metric": k, "value": float(metrics[k]) if isinstance(metrics[k], int | float)
                          else str(metrics[k]), "meaning": METRIC_HELP.get(k, "")} for k in order]))
    parts.append("<h2>Agents vs baselines (same data, net of costs)</h2>")
    parts.append(_table(comparison_rows, highlight_role=True))
    for name, rows in (tables or {}).items():
        parts.append(f"<h2>{esc(name)}</h2>")
        parts.append(_table(rows))

    if images:
        parts.append("<h2>Figures</h2>")
    for caption, img in images.items():
        p = Path(img)
        if p.is_file() and p.stat().st_size > 0:
            parts.append(f'<figure><img alt="{esc(caption)}" src="{_data_uri(p)}">'
                         f"<figcaption>{esc(caption)}</figcaption></figure>")
        else:
            parts.append(f'<p class="bad">figure missing: {esc(caption)}</p>')
    parts.append("</body></html>\n")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


def write_backtest_report(out_dir: Path | str, *, title: str, equity: pl.DataFrame, trades: pl.DataFrame | None,
                          metrics: Mapping[str, float], initial_cash: float, bars: pl.DataFrame | None = None,
                          comparison: tuple[Sequence[Mapping[str, Any]], Sequence[str]] | None = None,
                          action_probs: tuple[Any, np.ndarray, Sequence[str], Any | None] | None = None,
                          tables: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                          notes: Sequence[str] = ()) -> dict[str, Path]:
    """Every report output of one backtest into ``out_dir``: ``metrics.json`` (DVC metrics), the PNGs (DVC image
    plots / MLflow artifacts) and ``report.html``. ``action_probs`` is ``(times, probs, action_names, price)``.
    Returns name → path (``"html"``, ``"metrics"``, and one per figure) for :func:`log_to_mlflow`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images: dict[str, Path] = {
        "Equity and drawdown": plot_equity_drawdown(equity, out / "equity_drawdown.png", initial_cash=initial_cash),
        "Equity per symbol": plot_symbol_equity(equity, out / "symbol_equity.png"),
    }
    if bars is not None:
        images["Best and worst trades"] = plot_example_trades(bars, trades, out / "example_trades.png")
    if action_probs is not None:
        t, p, names, price = action_probs
        images["Action probabilities"] = plot_action_probabilities(t, p, names, price, out / "action_probs.png")
    rows, verdicts = comparison if comparison is not None else ([], [])
    html_path = write_html_report(out / "report.html", title, metrics, rows, verdicts, images, notes, tables=tables)
    return {"html": html_path, "metrics": write_metrics_json(out / "metrics.json", metrics), **images}
