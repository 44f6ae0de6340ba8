"""Statistics that count every trial: CSCV's probability of backtest overfitting, Hansen's SPA / White's reality
check (arch), the random-entry null, the trial count, and the arch block bootstrap against the old hand-written one."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

from rltrader.env.modes import EnvParams
from rltrader.env.synthetic import synthetic_sessions
from rltrader.evaluate.backtest import backtest_sessions
from rltrader.evaluate.metrics import DAYS_PER_YEAR, _ci, block_bootstrap, circular_block_indices
from rltrader.evaluate.stats import daily_series, pbo_cscv, random_entry_null, spa_test, trials_run
from rltrader.execution import ExecutionParams


def _old_block_bootstrap(daily: np.ndarray, n_samples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The hand-written circular block bootstrap metrics.block_bootstrap used before it moved to arch (verbatim
    index drawing; the statistics are computed the same way)."""
    r = np.asarray(daily, dtype=np.float64)
    n = len(r)
    b = min(max(1, round(math.sqrt(n))), n)
    n_blocks = -(-n // b)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n, size=(n_samples, n_blocks))
    idx = ((starts[:, :, None] + np.arange(b)[None, None, :]) % n).reshape(n_samples, n_blocks * b)[:, :n]
    s = r[idx]
    total = np.prod(1.0 + s, axis=1) - 1.0
    mean, sd = s.mean(axis=1), s.std(axis=1, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        sh = np.where(sd > 1e-14 + 1e-9 * np.abs(mean), mean / sd * math.sqrt(DAYS_PER_YEAR), np.nan)
    return np.where(np.all(s == 0, axis=1), 0.0, sh), total


def test_arch_block_bootstrap_draws_the_same_resamples_as_the_old_code() -> None:
    """Same resampled indices → same samples → same CI, exactly: arch's CircularBlockBootstrap, given the same numpy
    Generator, draws one vector of block starts per replicate with ``integers(n, size=n_blocks)``, and numpy's
    Generator yields the same stream whether those draws come in one (reps, n_blocks) call or rep by rep. So this is
    an equality test, not a tolerance test; odd and even lengths, blocks that do and do not divide n."""
    rng = np.random.default_rng(7)
    for n in (2, 5, 30, 31, 90, 365):
        daily = rng.normal(0.001, 0.02, n)
        for seed in (0, 3):
            new_sh, new_tot = block_bootstrap(daily, 500, seed)
            old_sh, old_tot = _old_block_bootstrap(daily, 500, seed)
            np.testing.assert_array_equal(new_tot, old_tot)
            np.testing.assert_array_equal(new_sh, old_sh)
            assert (_ci(new_sh) == _ci(old_sh) and _ci(new_tot) == _ci(old_tot)) or n == 2  # n=2: all-NaN CI
            b = max(1, round(math.sqrt(n)))
            starts = np.random.default_rng(seed).integers(0, n, size=(200, -(-n // b)))
            old_idx = ((starts[:, :, None] + np.arange(b)) % n).reshape(200, -1)[:, :n]
            np.testing.assert_array_equal(circular_block_indices(n, 200, seed), old_idx)


# ------------------------------------------------------------------------------------------------------------ PBO
def test_pbo_is_one_when_the_in_sample_winner_always_loses_out_of_sample() -> None:
    """Two trials, two blocks: each wins the block the other loses, so whichever is picked IS is last OOS."""
    a = np.r_[np.full(10, 0.01), np.full(10, -0.01)] + np.tile([0.001, -0.001], 10)
    b = -a
    res = pbo_cscv(np.column_stack([a, b]), n_splits=2)
    assert res["n_combinations"] == 2 and res["pbo"] == 1.0
    assert res["prob_oos_loss"] == 1.0


def test_pbo_near_zero_with_real_skill_and_near_half_for_noise() -> None:
    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, 0.01, (400, 20))
    res = pbo_cscv(noise, n_splits=8)
    assert res["n_combinations"] == 70
    assert 0.25 <= res["pbo"] <= 0.75, res["pbo"]  # selecting among pure noise: the IS winner is an OOS coin flip
    skilled = noise.copy()
    skilled[:, 3] += 0.004  # a persistent edge of 0.4 σ per period
    good = pbo_cscv(skilled, n_splits=8)
    assert good["pbo"] == 0.0 and good["prob_oos_loss"] == 0.0


def test_pbo_needs_two_trials_and_enough_periods() -> None:
    assert math.isnan(pbo_cscv(np.zeros((50, 1)))["pbo"])
    assert "blocks" in pbo_cscv(np.zeros((5, 3)), n_splits=16)["reason"]


# ------------------------------------------------------------------------------------------------------------ SPA
def test_spa_rejects_for_a_real_edge_and_not_for_noise() -> None:
    rng = np.random.default_rng(1)
    flat = np.zeros(250)
    edge = rng.normal(0.004, 0.01, 250)
    strong = spa_test({"agent": edge}, flat, reps=500, seed=0)
    assert strong["spa_pvalue"] < 0.01 and strong["reality_check_pvalue"] < 0.01
    noise = rng.normal(-0.0005, 0.01, 250)
    weak = spa_test({"agent": noise, "other": rng.normal(-0.0005, 0.01, 250)}, flat, reps=500, seed=0)
    assert weak["spa_pvalue"] > 0.2 and weak["reality_check_pvalue"] > 0.2
    assert weak["spa_pvalue_lower"] <= weak["spa_pvalue"] <= weak["spa_pvalue_upper"]
    assert math.isnan(spa_test(flat, flat)["spa_pvalue"])  # identical to the benchmark: nothing to test


# -------------------------------------------------------------------------------------------------- random entry
def _frames(prices: np.ndarray, entries: list[int], hold: int, side: int = 1, fee: float = 0.001
            ) -> tuple[pl.DataFrame, pl.DataFrame]:
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    times = [t0 + timedelta(minutes=i) for i in range(len(prices))]
    equity = pl.DataFrame({"time": times, "symbol": "X", "equity": 1.0, "position": 0.0, "price": prices,
                           "fees": 0.0, "stretch": 0})
    notional = 1000.0
    rows = [{"symbol": "X", "stretch": 0, "entry_time": times[e], "exit_time": times[e + hold], "side": side,
             "notional": notional,
             "pnl": notional * (side * (prices[e + hold] / prices[e] - 1) - fee)} for e in entries]
    return equity, pl.DataFrame(rows)


def test_random_entry_null_rewards_timing_and_not_luck() -> None:
    i = np.arange(2000)
    prices = 100 + 5 * np.sin(2 * np.pi * i / 100)
    troughs = [75 + 100 * k for k in range(19)]  # long at each trough, out at the next crest
    eq, tr = _frames(prices, troughs, hold=50)
    res = random_entry_null(eq, tr, draws=1000, seed=0)
    assert res["random_entry_observed"] == float(np.mean(tr["pnl"].to_numpy() / 1000.0))
    assert res["random_entry_pvalue"] == 1 / 1001  # no random placement beats trough-to-crest
    assert abs(res["random_entry_null_mean"]) < res["random_entry_observed"] / 50  # random timing: ~no edge
    pvals = []
    for seed in range(20):  # entries that are themselves random: the p-value is not small on average
        entries = np.random.default_rng(100 + seed).integers(0, 1950, 15).tolist()
        eq, tr = _frames(prices, entries, hold=50)
        pvals.append(random_entry_null(eq, tr, draws=300, seed=seed)["random_entry_pvalue"])
    assert 0.3 < float(np.mean(pvals)) < 0.7, pvals


def test_random_entry_null_on_a_kernel_backtest() -> None:
    data = synthetic_sessions(n_symbols=2, bars_per_symbol=1500)
    res = backtest_sessions(data, "random", ExecutionParams(), EnvParams(), chain=True)
    out = random_entry_null(res.equity, res.trades, draws=200, seed=0)
    net = res.trades["pnl"].to_numpy() / res.trades["notional"].to_numpy()
    assert out["n_trades"] == res.trades.height > 0
    assert math.isclose(out["random_entry_observed"], float(net.mean()), rel_tol=1e-12)
    assert 0 < out["random_entry_pvalue"] <= 1
    empty = random_entry_null(res.equity, res.trades.head(0))
    assert math.isnan(empty["random_entry_pvalue"]) and empty["n_trades"] == 0
    days = daily_series(res.equity, res.initial_cash)
    assert days.columns == ["day", "ret"] and days.height >= 1


# ---------------------------------------------------------------------------------------------- trials counted
def test_trials_run_counts_optuna_trials_and_untuned_mlflow_runs(tmp_path: Path) -> None:
    import optuna

    import mlflow

    storage = f"sqlite:///{tmp_path}/optuna.db"
    assert trials_run(storage=storage)["total"] == 0  # no tuning yet
    for name, n in (("a", 3), ("b", 2)):
        study = optuna.create_study(study_name=name, storage=storage)
        for k in range(n):
            t = study.ask()
            study.tell(t, float(k))
    pruned = optuna.load_study(study_name="b", storage=storage)
    pruned.tell(pruned.ask(), state=optuna.trial.TrialState.PRUNED)
    pruned.tell(pruned.ask(), state=optuna.trial.TrialState.FAIL)  # a failed trial is retried, not counted twice

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("x", artifact_location=(tmp_path / "art").as_uri())
    for tags in ({}, {}, {"rltrader.tune_trial": "a/0"}):
        with mlflow.start_run(experiment_id=exp, run_name="d3qn", tags=tags):
            pass
    with mlflow.start_run(experiment_id=exp, run_name="backtest-d3qn"):
        pass
    got = trials_run(storage=storage, tracking_uri=uri, experiment="x")
    assert got == {"optuna_trials": 6, "mlflow_runs": 2, "total": 8}


def test_tuning_record_reads_the_study_summary(tmp_path: Path) -> None:
    """A tuned model's backtest report carries its study's PBO and trial count (from `rltrader tune`'s summary)."""
    from rltrader.config import Settings
    from rltrader.evaluate.stats import tuning_record
    from rltrader.integrity import write_report

    s = Settings.model_validate({"tune": {"out_dir": str(tmp_path)}})
    assert tuning_record(s, "d3qn") == {}  # not tuned: nothing to show
    write_report(tmp_path / "d3qn" / "summary.json",
                 {"pbo": {"pbo": 0.25}, "trial_states": {"complete": 7, "pruned": 3, "fail": 1}}, "`rltrader tune`")
    assert tuning_record(s, "d3qn") == {"pbo": 0.25, "tune_trials": 10.0}
