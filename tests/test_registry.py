"""Backtest stage and registry promotion on tiny real training runs: reports, DVC metrics, MLflow records, gates,
aliases (champion / previous), rollback, idempotent registration, and every decision recorded."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_sessions import TINY_D3QN, make_settings, training_settings

import mlflow
from rltrader import registry
from rltrader.config import PromoteSettings, Settings
from rltrader.errors import DataError
from rltrader.evaluate.stage import run_backtest_stage, run_one_backtest
from rltrader.integrity import BACKTEST_PRODUCER, write_report
from rltrader.train import run_train


def _m(sharpe: float, ret: float, dd: float) -> dict[str, float]:
    return {"sharpe_daily_annualized": sharpe, "total_return": ret, "max_drawdown": dd}


BASES = {s: {"flat": _m(0.0, 0.0, 0.0), "buy_and_hold": _m(0.5, 0.02, 0.1)} for s in ("val", "backtest")}
CFG = PromoteSettings(margin=0.1, max_drawdown=0.25)


def test_gates_without_champion_still_need_the_baselines() -> None:
    good = {s: _m(1.0, 0.05, 0.05) for s in ("val", "backtest")}
    gates = registry.decide(good, None, BASES, CFG)
    assert all(g.passed for g in gates) and len(gates) == 6  # drawdown + 2 baselines, on 2 splits
    loses_bnh = {"val": _m(1.0, 0.05, 0.05), "backtest": _m(0.4, 0.05, 0.05)}
    failed = [g.name for g in registry.decide(loses_bnh, None, BASES, CFG) if not g.passed]
    assert failed == ["beats buy_and_hold on backtest"]
    # beating flat's Sharpe is not enough: the total return must beat it too, net of fees
    neg = {s: _m(0.1, -0.01, 0.05) for s in ("val", "backtest")}
    assert "beats flat on val" in [g.name for g in registry.decide(neg, None, BASES, CFG) if not g.passed]


def test_gates_against_champion_margin_drawdown_and_nan() -> None:
    ch = {s: _m(1.0, 0.05, 0.05) for s in ("val", "backtest")}
    champ = {"val": _m(0.85, 0.04, 0.05), "backtest": _m(0.95, 0.04, 0.05)}
    failed = [g.name for g in registry.decide(ch, champ, BASES, CFG) if not g.passed]
    assert failed == ["beats champion on backtest"]  # 1.0 < 0.95 + 0.1; val passes 1.0 ≥ 0.95
    deep = {"val": _m(1.0, 0.05, 0.3), "backtest": _m(1.0, 0.05, 0.05)}
    assert [g.name for g in registry.decide(deep, None, BASES, CFG) if not g.passed] == ["drawdown on val"]
    undefined = {s: _m(math.nan, 0.05, 0.05) for s in ("val", "backtest")}
    assert not any(g.passed for g in registry.decide(undefined, champ, BASES, CFG) if "beats" in g.name)
    missing = registry.decide(ch, None, {"val": {}, "backtest": {}}, CFG)
    assert next(g.detail for g in missing if not g.passed) == "flat was not evaluated on val"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, Path]:
    tmp = tmp_path_factory.mktemp("registry")
    ppo = {"total_steps": 512, "num_envs": 16, "rollout_steps": 16, "eval_every": 512, "eval_max_sessions": 30,
           "checkpoint_every": 512, "net": {"channels": 8, "hidden": 16, "tcn_levels": 2}}
    settings = training_settings(tmp, d3qn=TINY_D3QN, ppo=ppo,
                                 lowrider=TINY_D3QN,  # the Lowrider variant (train@lowrider), as small
                                 backtest={"models": ["d3qn", "ppo"], "bootstrap": 200})
    reports = tmp / "reports"
    for algo in ("d3qn", "ppo", "lowrider"):
        run_train(settings, algo, progress=False, metrics_path=reports / f"train_{algo}.json")
    run_backtest_stage(settings, out_dir=reports / "backtest", metrics_path=reports / "backtest.json",
                       reports_dir=reports)
    return settings, reports


@pytest.mark.slow
def test_backtest_stage_outputs(trained: tuple[Settings, Path]) -> None:
    settings, reports = trained
    metrics = json.loads((reports / "backtest.json").read_text())
    assert set(metrics) == {"val", "backtest"}
    for split in metrics:
        assert {"d3qn", "ppo", "flat", "buy_and_hold", "random", "sma_cross"} <= set(metrics[split])
        assert metrics[split]["flat"]["total_return"] == 0.0 and metrics[split]["flat"]["n_trades"] == 0
    summary = json.loads((reports / "backtest" / "summary.json").read_text())
    assert any("d3qn" in v for v in summary["verdicts"]["backtest"])
    for algo in ("d3qn", "ppo"):
        html = (reports / "backtest" / algo / "report.html").read_text()
        # self-contained: figures inline, no external URL (base64 has no ':', so a URL cannot hide in the images)
        assert "Agents vs baselines" in html and "data:image/png;base64," in html
        assert "http://" not in html.lower() and "https://" not in html.lower() and 'src="//' not in html
        assert (reports / "backtest" / algo / "action_probs.png").stat().st_size > 1000
        run = mlflow.MlflowClient(settings.train.tracking_uri).get_run(summary["train_runs"][algo])
        assert "backtest_sharpe_daily_annualized" in run.data.metrics and "val_bt_total_return" in run.data.metrics
    assert (reports / "backtest" / "comparison.png").stat().st_size > 1000
    # the Lowrider table: rule vs the trained lowrider-mode model, by regime, on both splits
    low = summary["lowrider"]
    assert set(low["tables"]) == {"val", "backtest"} and low["threshold"] == settings.backtest.regime_threshold
    for split, rows in low["tables"].items():
        assert {(r["policy"], r["regime"]) for r in rows} == {
            (p, g) for p in ("lowrider_rule", "lowrider") for g in ("up", "down", "sideways", "all")}
        assert len(low["verdicts"][split]) == 1 and low["verdicts"][split][0].startswith(f"[{split}] lowrider:")
    assert "Lowrider, backtest split" in (reports / "backtest" / "d3qn" / "report.html").read_text()
    assert json.loads((reports / "backtest" / "lowrider" / "lowrider.json").read_text())["tables"] == low["tables"]


@pytest.mark.slow
def test_backtest_report_counts_trials_and_tests_against_baselines(trained: tuple[Settings, Path]) -> None:
    """Every training run recorded is a trial of the deflated Sharpe (two here), and each agent's report shows
    the SPA / reality-check p-values against flat and buy & hold and the random-entry p-value next to its CIs."""
    _, reports = trained
    summary = json.loads((reports / "backtest" / "summary.json").read_text())
    assert summary["trials_counted"]["mlflow_runs"] == 2 and summary["trials_counted"]["n_trials"] == 2
    metrics = json.loads((reports / "backtest.json").read_text())
    for split in ("val", "backtest"):
        for algo in ("d3qn", "ppo"):
            m = metrics[split][algo]
            assert m["n_trials"] == 2
            for key in ("spa_pvalue_vs_flat", "spa_pvalue_vs_buy_and_hold", "random_entry_pvalue"):
                assert key in m and (m[key] is None or 0 < m[key] <= 1), (split, algo, key, m.get(key))
        assert "spa_pvalue_vs_flat" not in metrics[split]["flat"]  # baselines are the benchmarks, not tested
    html = (reports / "backtest" / "d3qn" / "report.html").read_text()
    ci, spa, rand = (html.index(k) for k in ("return_ci_high", "spa_pvalue_vs_flat", "random_entry_pvalue"))
    assert ci < spa < rand


@pytest.mark.slow
def test_one_policy_backtest_by_run_id_and_baseline(trained: tuple[Settings, Path]) -> None:
    settings, reports = trained
    run_id = json.loads((reports / "train_ppo.json").read_text())["run_id"]
    one = run_one_backtest(settings, run_id, out_dir=reports / "one")
    assert one["policy"] == f"runs:/{run_id}/model" and Path(one["report"]).is_file()
    base = run_one_backtest(settings, "sma_cross", out_dir=reports / "one")
    assert "sma_cross" not in [r["name"] for r in base["table"] if r["role"] == "baseline"]


def _doctored(reports: Path, name: str, **per_algo: dict[str, dict[str, float]]) -> Path:
    """The stage's real summary with chosen numbers for some models (to drive the gates both ways)."""
    summary = json.loads((reports / "backtest" / "summary.json").read_text())
    for algo, by_split in per_algo.items():
        for split, m in by_split.items():
            summary["metrics"][split][algo].update(m)
    path = reports / name
    write_report(path, summary, BACKTEST_PRODUCER)  # re-signed: an edited summary is otherwise refused
    return path


def _aliases(settings: Settings) -> dict[str, str]:
    rm = mlflow.MlflowClient(settings.train.tracking_uri).get_registered_model(settings.promote.model_name)
    return {k: str(v) for k, v in (rm.aliases or {}).items()}


@pytest.mark.slow
def test_promotion_rollback_and_records(trained: tuple[Settings, Path]) -> None:
    settings, reports = trained
    decision_file = settings.promote.decision_path
    good = {s: _m(9.0, 0.5, 0.01) for s in ("val", "backtest")}
    bad = {s: _m(-1.0, -0.1, 0.01) for s in ("val", "backtest")}

    # dry run: prints, registers nothing, writes nothing
    dry = registry.promote(settings, dry_run=True, summary_path=_doctored(reports, "s0.json", ppo=good, d3qn=bad))
    assert dry.action == "promote" and not dry.promoted and not decision_file.exists()

    # first promotion: no champion, the baseline gates decide
    first = registry.promote(settings, summary_path=_doctored(reports, "s1.json", ppo=good, d3qn=bad))
    assert first.promoted and first.challenger == "ppo" and all(g.passed for g in first.gates)
    assert _aliases(settings) == {"champion": first.challenger_version}
    record = json.loads(decision_file.read_text())
    assert record["action"] == "promote" and record["promoted"] and record["gates"]
    client = mlflow.MlflowClient(settings.train.tracking_uri)
    versions = client.search_model_versions(f"name='{settings.promote.model_name}'")
    assert len(versions) == 2  # both trained models are registered, the challenger among them
    tags = client.get_model_version(settings.promote.model_name, first.challenger_version).tags
    for key in ("data_fingerprint", "params_hash", "git_commit", "val_bt_sharpe_daily_annualized",
                "backtest_max_drawdown", "promoted_at"):
        assert key in tags, key
    assert tags["params_hash"] != "unknown"

    # same challenger again: kept, and registration is idempotent
    again = registry.promote(settings, summary_path=_doctored(reports, "s1b.json", ppo=good, d3qn=bad))
    assert again.action == "keep"
    assert len(client.search_model_versions(f"name='{settings.promote.model_name}'")) == 2

    # a challenger that fails a gate is refused and changes nothing
    deep = {s: _m(20.0, 0.9, 0.6) for s in ("val", "backtest")}
    refused = registry.promote(settings, summary_path=_doctored(reports, "s2.json", d3qn=deep, ppo=bad))
    assert refused.action == "refuse" and refused.challenger == "d3qn"
    assert {g.name for g in refused.gates if not g.passed} == {"drawdown on val", "drawdown on backtest"}
    assert _aliases(settings) == {"champion": first.challenger_version}
    assert json.loads(decision_file.read_text())["action"] == "refuse"
    assert any("re-evaluated on the same data" in n for n in refused.notes)  # the champion ran on today's data

    # a better challenger: champion moves, the old one becomes previous
    second = registry.promote(settings, summary_path=_doctored(reports, "s3.json", d3qn=good, ppo=bad))
    assert second.promoted and second.challenger == "d3qn"
    assert _aliases(settings) == {"champion": second.challenger_version, "previous": first.challenger_version}

    # rollback restores the previous champion; a second one has nowhere to go
    back = registry.rollback(settings)
    assert back.action == "rollback" and _aliases(settings) == {"champion": first.challenger_version}
    with pytest.raises(registry.PromotionError, match="nothing to roll back"):
        registry.rollback(settings)

    runs = mlflow.search_runs(experiment_names=[settings.train.experiment],
                              filter_string="attributes.run_name = 'promote'", output_format="list")
    assert sorted(r.data.tags["decision"] for r in runs) == ["keep", "promote", "promote", "refuse", "rollback"]


def test_missing_summary_names_the_file(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)  # no trained models needed: the summary is read first
    with pytest.raises(DataError, match=r"nope\.json: no backtest summary"):
        registry.promote(settings, summary_path=tmp_path / "nope.json")


def test_cli_backtest_and_promote_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from rltrader.cli import app

    monkeypatch.chdir(tmp_path)
    settings: Any = make_settings(tmp_path)
    (tmp_path / "params.yaml").write_text(json.dumps(settings.model_dump(mode="json")))
    monkeypatch.setenv("RLTRADER_PARAMS", str(tmp_path / "params.yaml"))
    res = CliRunner().invoke(app, ["promote", "--dry-run"])
    assert res.exit_code == 1 and "no backtest summary" in res.output
    res = CliRunner().invoke(app, ["backtest", "--model", "no_such_policy"])
    assert res.exit_code == 1 and "no_such_policy" in res.output


@pytest.mark.slow
def test_walk_forward_trains_each_fold_and_aggregates(trained: tuple[Settings, Path], tmp_path: Path) -> None:
    from rltrader.evaluate.walk_forward import run_walk_forward

    settings, _ = trained
    wf = settings.model_copy(update={"walk_forward": settings.walk_forward.model_copy(update={
        "start": "2024-01-01", "end": "2024-01-11", "train_days": 4, "val_days": 1, "test_days": 2,
        "step_days": 2, "algo": "d3qn"})})
    out = run_walk_forward(wf, out_dir=tmp_path / "wf")
    folds = out["folds"]
    assert [(f["train_start"], f["test_start"], f["test_end"]) for f in folds] == [
        ("2024-01-01", "2024-01-05", "2024-01-07"), ("2024-01-03", "2024-01-07", "2024-01-09"),
        ("2024-01-05", "2024-01-09", "2024-01-11")]
    assert len({f["run_id"] for f in folds}) == 3  # trained from scratch per fold, each an MLflow run
    # each fold's sessions were built for its own dates: the val split ends where its test begins
    from rltrader.dataset.split import load_split

    for k, f in enumerate(folds):
        val = load_split(tmp_path / "wf" / f"fold_{k:02d}" / "sessions", "val")
        t = val.time[val.ctx_start].min(), val.time[val.end - 1].max()
        lo = np.datetime64(f["test_start"], "us").astype(np.int64) - 86_400_000_000
        assert lo <= t[0] and t[1] < np.datetime64(f["test_start"], "us").astype(np.int64)
    agg = out["aggregate"]["d3qn"]
    assert agg["n_folds"] == 3 and "sharpe_daily_annualized_min" in agg
    assert len(out["verdicts"]) == len(out["aggregate"]) - 1
    html = (tmp_path / "wf" / "report.html").read_text()
    assert "Folds" in html and "data:image/png;base64," in html
    assert json.loads((tmp_path / "wf" / "metrics.json").read_text())["n_folds"] == 3
    flat = [f["flat_sharpe_daily_annualized"] for f in folds]
    assert flat == [0.0, 0.0, 0.0]
