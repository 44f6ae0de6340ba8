"""The report: PNG figures are written, the HTML is one self-contained file, the DVC metrics file is strict JSON."""

from __future__ import annotations

import json
import re
import sys
import types
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from rltrader.evaluate.metrics import comparison_table, compute_metrics
from rltrader.evaluate.report import (
    log_to_mlflow,
    plot_action_probabilities,
    plot_equity_drawdown,
    plot_example_trades,
    plot_symbol_equity,
    write_backtest_report,
    write_html_report,
    write_metrics_json,
)

T0 = datetime(2024, 3, 1, tzinfo=UTC)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N = 3 * 1440  # three days of minute bars


def _times(n: int) -> pl.Series:
    return pl.Series([T0 + timedelta(minutes=i) for i in range(n)], dtype=pl.Datetime("us", "UTC"))


@pytest.fixture(scope="module")
def market() -> dict[str, pl.DataFrame]:
    """Two symbols of random-walk candles, per-symbol and ALL equity, and a handful of trades on them."""
    rng = np.random.default_rng(0)
    bars, equity, trades = [], [], []
    for k, sym in enumerate(("BTCUSDT", "ETHUSDT")):
        close = 100 * np.exp(np.cumsum(rng.normal(0, 1e-3, N)))
        open_ = np.concatenate([[100.0], close[:-1]])
        high = np.maximum(open_, close) * (1 + rng.uniform(0, 5e-4, N))
        low = np.minimum(open_, close) * (1 - rng.uniform(0, 5e-4, N))
        t = _times(N)
        bars.append(pl.DataFrame({"time": t, "open": open_, "high": high, "low": low, "close": close,
                                  "symbol": [sym] * N}))
        pos = np.where((np.arange(N) // 200) % 3 == 0, 1.0, 0.0)
        eq = 500 * np.cumprod(1 + rng.normal(2e-5, 5e-4, N))
        equity.append(pl.DataFrame({"time": t, "symbol": [sym] * N, "equity": eq, "position": pos,
                                    "price": close, "fees": np.linspace(0, 2, N)}))
        for j in range(4):
            i, o = 300 + 700 * j + 50 * k, 300 + 700 * j + 50 * k + 120
            side = 1 if j % 2 == 0 else -1
            pnl = side * (close[o] - close[i]) - 0.05
            trades.append({"symbol": sym, "entry_time": t[i], "exit_time": t[o], "side": side, "qty": 1.0,
                           "entry_price": float(close[i]), "exit_price": float(close[o]), "pnl": float(pnl),
                           "fees": 0.05, "notional": float(close[i])})
    eq_all = pl.concat(equity)
    comb = eq_all.group_by("time").agg(pl.col("equity").sum(), pl.col("fees").sum()).sort("time")
    all_rows = comb.with_columns(symbol=pl.lit("ALL"), position=pl.lit(0.0), price=pl.lit(0.0)).select(
        eq_all.columns)
    return {"bars": pl.concat(bars), "equity": pl.concat([eq_all, all_rows]),
            "trades": pl.DataFrame(trades).with_columns(pl.col("entry_time", "exit_time").dt.cast_time_unit("us"))}


def _is_png(p: Path) -> bool:
    return p.is_file() and p.stat().st_size > 1000 and p.read_bytes()[:8] == PNG_MAGIC


def test_plots_are_written(market: dict[str, pl.DataFrame], tmp_path: Path) -> None:
    assert _is_png(plot_equity_drawdown(market["equity"], tmp_path / "eq.png", initial_cash=1000.0))
    assert _is_png(plot_symbol_equity(market["equity"], tmp_path / "sym.png"))
    assert _is_png(plot_example_trades(market["bars"], market["trades"], tmp_path / "sub" / "trades.png", n=2))
    probs = np.random.default_rng(1).dirichlet(np.ones(3), N)
    t = market["bars"].filter(pl.col("symbol") == "BTCUSDT")["time"]
    price = market["bars"].filter(pl.col("symbol") == "BTCUSDT")["close"].to_numpy()
    assert _is_png(plot_action_probabilities(t, probs, ["flat", "long", "short"], price, tmp_path / "p.png"))
    assert _is_png(plot_action_probabilities(t.to_numpy(), probs[:, :2] / probs[:, :2].sum(1, keepdims=True),
                                             ["a", "b"], None, tmp_path / "p2.png"))
    with pytest.raises(ValueError):
        plot_action_probabilities(t, probs, ["a", "b"], None, tmp_path / "bad.png")


def test_plots_on_degenerate_input(market: dict[str, pl.DataFrame], tmp_path: Path) -> None:
    """No trades, no equity, a trade without surrounding bars: a figure that says so, never an exception."""
    assert _is_png(plot_example_trades(market["bars"], None, tmp_path / "none.png"))
    assert _is_png(plot_example_trades(market["bars"], market["trades"].head(0), tmp_path / "empty.png"))
    assert _is_png(plot_example_trades(market["bars"].head(0), market["trades"].head(1), tmp_path / "nobars.png"))
    assert _is_png(plot_equity_drawdown(market["equity"].head(0), tmp_path / "eq0.png"))
    assert _is_png(plot_symbol_equity(market["equity"].head(0), tmp_path / "sym0.png"))
    assert _is_png(plot_action_probabilities([], np.zeros((0, 3)), ["a", "b", "c"], None, tmp_path / "p0.png"))


def test_html_report_is_self_contained(market: dict[str, pl.DataFrame], tmp_path: Path) -> None:
    m = compute_metrics(market["equity"], market["trades"], initial_cash=1000.0, n_trials=5, bootstrap=200)
    results = {"d3qn": m, "buy_and_hold": {**m, "sharpe_daily_annualized": m["sharpe_daily_annualized"] + 1}}
    rows, verdicts = comparison_table(results)
    images = {"Equity <and> drawdown": plot_equity_drawdown(market["equity"], tmp_path / "eq.png"),
              "Trades": plot_example_trades(market["bars"], market["trades"], tmp_path / "tr.png")}
    folds = [{"fold": 1.0, "sharpe": 0.5}, {"fold": 2.0, "sharpe": -0.2}]
    path = write_html_report(tmp_path / "report.html", "Backtest <script>alert(1)</script>", m, rows, verdicts,
                             images, ["fees 4 bp taker"], tables={"Walk-forward folds": folds})
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", text, flags=re.IGNORECASE)
    assert not any(r.lower().startswith(("http://", "https://", "//")) for r in refs)
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower() and "<link" not in text.lower()
    imgs = re.findall(r"<img[^>]*>", text)
    assert len(imgs) == 2
    assert all(re.search(r'src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', tag) for tag in imgs)
    assert "√365" in text  # the annualization is stated
    assert "d3qn does NOT beat buy_and_hold" in text
    assert "Walk-forward folds" in text and "fees 4 bp taker" in text
    assert "sharpe_daily_annualized" in text and "deflated_sharpe" in text
    assert "&lt;and&gt;" in text


def test_missing_image_is_reported_not_linked(tmp_path: Path) -> None:
    text = write_html_report(tmp_path / "r.html", "t", {"total_return": float("nan")}, [], [],
                             {"gone": tmp_path / "nope.png"}, []).read_text()
    assert "figure missing: gone" in text and "<img" not in text
    assert "No comparison was made" in text


def test_metrics_json_is_strict(tmp_path: Path) -> None:
    p = write_metrics_json(tmp_path / "m" / "metrics.json", {"a": 1.5, "b": float("nan"), "c": float("inf"),
                                                             "n": 3})

    def reject(c: str) -> Any:
        raise AssertionError(f"non-standard JSON constant {c}")

    assert json.loads(p.read_text(), parse_constant=reject) == {"a": 1.5, "b": None, "c": None, "n": 3}


def test_backtest_report_bundle_and_mlflow(market: dict[str, pl.DataFrame], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    m = compute_metrics(market["equity"], market["trades"], initial_cash=1000.0, bootstrap=100)
    t = market["bars"].filter(pl.col("symbol") == "BTCUSDT")["time"]
    probs = np.full((N, 2), 0.5)
    out = write_backtest_report(tmp_path / "rep", title="bt", equity=market["equity"], trades=market["trades"],
                                metrics=m, initial_cash=1000.0, bars=market["bars"],
                                comparison=comparison_table({"agent": m, "flat": m}),
                                action_probs=(t, probs, ["flat", "long"], None), notes=["n"])
    assert set(out) == {"html", "metrics", "Equity and drawdown", "Equity per symbol", "Best and worst trades",
                        "Action probabilities"}
    assert all(p.is_file() and p.stat().st_size > 0 for p in out.values())
    assert out["html"].read_text().count("data:image/png;base64,") == 4

    logged: dict[str, Any] = {"artifacts": []}
    fake = types.ModuleType("mlflow")
    fake.log_metrics = lambda d: logged.update(metrics=d)  # type: ignore[attr-defined]
    fake.log_artifact = lambda p, d=None: logged["artifacts"].append((Path(p).name, d))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    images = {k: v for k, v in out.items() if k not in ("html", "metrics")}
    log_to_mlflow({**m, "undefined": float("nan")}, images, prefix="test_", html_report=out["html"])
    assert "test_total_return" in logged["metrics"] and "test_undefined" not in logged["metrics"]
    assert ("report.html", "report") in logged["artifacts"] and len(logged["artifacts"]) == 5
