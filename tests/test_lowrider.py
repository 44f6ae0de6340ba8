"""The Lowrider table (issue 14, part 4) on a small real slice: cycles read from the kernel's event log agree with
the backtest's own round trips and equity, the budget cap holds, the regimes are the months' buy & hold returns,
and the stage's Lowrider section writes its table, verdicts and report for the rule and a lowrider-mode model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import build_near_april
from test_backtest import TinyNet

from rltrader.agents.packaging import PolicyModule
from rltrader.config import Settings
from rltrader.env.core import N_STATE
from rltrader.evaluate.backtest import continuous_split, run_backtest
from rltrader.evaluate.lowrider import (
    REGIMES,
    lowrider_cycles,
    lowrider_table,
    month_regimes,
    run_lowrider_tables,
)
from rltrader.train import variant_settings


@pytest.fixture(scope="module")
def built(shared_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """NEARUSDT, April 2023 (real bars); a Lowrider that cycles often: 0.3 % profit target, 200-quote lots."""
    return build_near_april(shared_archive, tmp_path_factory.mktemp("lowrider"),
                            env={"base_lot": 200.0, "profit_target": 0.003, "rule_drop_step": 0.004})


def lowrider_model(settings: Settings, n_features: int, seed: int = 0) -> PolicyModule:
    torch.manual_seed(seed)
    ctx, n_act = settings.sessions.context, variant_settings(settings, "lowrider").env.n_actions
    net = TinyNet(ctx * n_features + N_STATE, n_act)
    return PolicyModule(net, "q_values", ctx, n_features, N_STATE, n_act, {"algo": "d3qn", "mode": "lowrider"})


def test_cycles_from_events_match_the_round_trips_and_equity(built: Settings) -> None:
    lr = variant_settings(built, "lowrider")
    assert (lr.env.mode, lr.execution.market, lr.execution.leverage) == ("lowrider", "spot", 1.0)
    for split in ("test", "backtest"):
        data = continuous_split(lr, split)
        for policy in ("lowrider_rule", lowrider_model(built, data.n_features)):
            res = run_backtest(lr, policy, split=split, data=data)
            cyc = lowrider_cycles(res, data)
            assert cyc.height >= 3, (split, cyc.height)
            # a cycle is a flat-to-flat round trip: the backtest's own trade list, built separately from the events
            trades = res.trades.sort("entry_time")
            assert cyc.height == trades.height
            np.testing.assert_allclose(np.sort(cyc["pnl"].to_numpy()), np.sort(trades["pnl"].to_numpy()),
                                       rtol=1e-9, atol=1e-9)
            np.testing.assert_array_equal(np.sort(cyc["bars"].to_numpy()), np.sort(trades["bars"].to_numpy()))
            # the cycles account for the whole PnL (spot: no funding), and completed = closed by an order
            eq = res.for_symbol("NEARUSDT")["equity"].to_numpy()
            assert cyc["pnl"].sum() == pytest.approx(eq[-1] - lr.execution.initial_cash, abs=1e-6)
            n_order_exits = trades.filter(pl.col("exit_reason") != "end_of_data").height
            assert int(cyc["completed"].sum()) == n_order_exits
            # the budget cap: a cycle never commits more than initial cash / reluctance (plus the last lot's fee)
            cap = lr.execution.initial_cash / lr.env.reluctance * (1 + lr.execution.taker_fee)
            assert cyc["max_cost"].max() <= cap + 1e-9  # type: ignore[operator]
            # worst unrealised, brute force from the fills and the marked curve (position × close − cost so far)
            fills = res.fills.sort("time")
            curve = res.for_symbol("NEARUSDT")
            bar_open = curve["time"].dt.epoch("us").to_numpy() - 60_000_000
            ft = fills["time"].dt.epoch("us").to_numpy()
            cost_after = np.zeros(len(ft))
            c = 0.0
            for i, (q, px, fee) in enumerate(zip(fills["qty"], fills["price"], fills["fee"], strict=True)):
                c = c + q * px + fee if q > 0 else 0.0
                cost_after[i] = c
            j = np.searchsorted(ft, bar_open, side="right") - 1
            cost = np.where(j >= 0, cost_after[np.maximum(j, 0)], 0.0)
            unreal = np.where(curve["position"].to_numpy() > 0,
                              curve["position"].to_numpy() * curve["price"].to_numpy() - cost, 0.0)
            assert cyc["worst"].min() == pytest.approx(min(unreal.min(), 0.0), rel=1e-9, abs=1e-9)


def test_month_regimes_are_buy_and_hold_months(built: Settings) -> None:
    data = continuous_split(built, "test")
    rows = np.concatenate([np.arange(a, b) for a, b in zip(data.start, data.end, strict=True)])
    bh = data.close[rows[-1]] / data.open[rows[0]] - 1.0  # one symbol, one month (April 2023)
    for thr, want in ((abs(bh) / 2, "up" if bh > 0 else "down"), (abs(bh) * 2, "sideways")):
        reg = month_regimes(data, thr)
        assert reg.height == 1 and reg["buy_hold"][0] == pytest.approx(bh, rel=1e-12)
        assert reg["regime"][0] == want


def test_lowrider_table_and_stage_section(built: Settings, tmp_path: Path) -> None:
    lr = variant_settings(built, "lowrider")
    splits = ["test", "backtest"]
    datas = {s: continuous_split(lr, s) for s in splits}
    model = lowrider_model(built, datas["test"].n_features, seed=1)
    res = {"lowrider_rule": run_backtest(lr, "lowrider_rule", split="test", data=datas["test"]),
           "rl": run_backtest(lr, model, split="test", data=datas["test"])}
    rows = lowrider_table(res, datas["test"], 0.05)
    assert [(r["policy"], r["regime"]) for r in rows] == [(p, g) for p in res for g in (*REGIMES, "all")]
    for p in res:
        mine = [r for r in rows if r["policy"] == p]
        assert sum(r["cycles_completed"] for r in mine[:3]) == mine[3]["cycles_completed"] > 0
        assert sum(r["months"] for r in mine[:3]) == mine[3]["months"] == 1
        assert mine[3]["max_capital_committed"] > 0 and mine[3]["worst_unrealised"] <= 0
    out = run_lowrider_tables(built, splits, ["rl"], lambda name: model, datas, tmp_path / "lowrider")
    saved = json.loads((tmp_path / "lowrider" / "lowrider.json").read_text())
    assert set(saved["tables"]) == set(splits) and saved["threshold"] == built.backtest.regime_threshold
    assert len(out["verdicts"]["backtest"]) == 1 and "rl:" in out["verdicts"]["backtest"][0]
    assert "±" not in out["note"] and "sideways" in out["note"]
    html = (tmp_path / "lowrider" / "report.html").read_text()
    assert "Lowrider" in html and "backtest split: by regime" in html
