"""Statistics that count every trial: overfitting probability (CSCV), tests against the baselines (Hansen's SPA and
White's reality check), a random-entry null, and the trial count the deflated Sharpe pays for.

Why this module exists: once many configurations have been tried, the best one's Sharpe ratio is biased upwards by
the search itself. Each function here answers one question a reader of a backtest report should ask:

* :func:`pbo_cscv` — how often does the configuration that looked best in-sample land in the bottom half
  out-of-sample? (Bailey, Borwein, López de Prado & Zhu 2017, "The probability of backtest overfitting": combinatorially
  symmetric cross-validation over the trials' return series.)
* :func:`spa_test` — is the agent's daily return better than a benchmark's (flat, buy & hold) beyond what a stationary
  bootstrap of the loss differential explains? (Hansen 2005; with ``studentize=False`` and the upper p-value it is
  White's 2000 reality check.) The bootstrap and the test are the ``arch`` package's, not re-implemented here.
* :func:`random_entry_null` — would the same number of trades, on the same sides, held as long, at the same cost,
  but entered at random bars, have done as well? A p-value over ``draws`` random-entry replays.
* :func:`trials_run` — how many configurations were actually tried (Optuna trials in every study of the tuning
  storage plus MLflow training runs made outside tuning), the ``n_trials`` of the deflated Sharpe.

Bootstraps come from ``arch.bootstrap`` (see :func:`rltrader.evaluate.metrics.block_bootstrap`, which draws its
circular blocks with ``arch.bootstrap.CircularBlockBootstrap``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

if TYPE_CHECKING:  # typing only: the settings module imports nothing from here
    from rltrader.config import Settings

_NAN = float("nan")

PBO_SPLITS = 16
"""CSCV's S (an even number of contiguous blocks of the return series); C(16, 8) = 12 870 combinations."""
MAX_COMBINATIONS = 5000
"""Above this many IS/OOS combinations an evenly spaced subset is used (deterministic); the estimate barely moves."""


# ------------------------------------------------------------------------------------------------------ PBO / CSCV
def _sharpe_cols(m: np.ndarray) -> np.ndarray:
    """Per-column mean/std (ddof 1) of a (T, N) block; 0 where a column does not vary (a flat trial is no skill)."""
    mean = m.mean(axis=0)
    sd = m.std(axis=0, ddof=1) if m.shape[0] > 1 else np.zeros(m.shape[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sd > 1e-14, mean / np.where(sd > 1e-14, sd, 1.0), 0.0)


def pbo_cscv(returns: np.ndarray, n_splits: int = PBO_SPLITS) -> dict[str, Any]:
    """Probability of backtest overfitting of choosing the best of N trials by Sharpe ratio, by CSCV.

    ``returns``: a (T, N) matrix, one column per trial, rows the same periods (e.g. the val days) for every trial.
    The rows are cut into ``n_splits`` contiguous blocks (S even; the last T mod S rows are dropped so blocks are
    equal); for every choice of S/2 blocks as in-sample (IS) the rest is out-of-sample (OOS). The trial with the
    best IS Sharpe gets its OOS relative rank ω ∈ (0, 1) among all trials, and λ = log(ω / (1 − ω)). PBO is the
    share of combinations with λ ≤ 0: the IS winner did no better than the OOS median. Also returned: the logits,
    the median OOS rank of the IS winner, and the share of combinations whose IS winner lost money OOS
    (``prob_oos_loss``).

    Needs at least two trials and ``n_splits`` rows; otherwise PBO is NaN with a ``reason``."""
    r = np.asarray(returns, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(f"returns must be a (periods, trials) matrix, got shape {r.shape}")
    t, n = r.shape
    s = n_splits - n_splits % 2
    out: dict[str, Any] = {"pbo": _NAN, "n_trials": n, "n_periods": t, "n_splits": s, "n_combinations": 0,
                           "logits": [], "median_oos_rank": _NAN, "prob_oos_loss": _NAN}
    if n < 2:
        return {**out, "reason": "fewer than two trials: nothing was selected"}
    if s < 2 or t < s:
        return {**out, "reason": f"{t} periods cannot be cut into {s} blocks"}
    if not np.all(np.isfinite(r)):
        raise ValueError("returns contain NaN or inf; give every trial a return for every period (0 when flat)")
    blocks = np.array_split(r[: t - t % s], s)
    combos = list(combinations(range(s), s // 2))
    if len(combos) > MAX_COMBINATIONS:
        combos = [combos[i] for i in np.linspace(0, len(combos) - 1, MAX_COMBINATIONS).astype(int)]
    logits, ranks, losses = [], [], []
    for is_idx in combos:
        oos_idx = [i for i in range(s) if i not in is_idx]
        is_sr = _sharpe_cols(np.concatenate([blocks[i] for i in is_idx]))
        oos_block = np.concatenate([blocks[i] for i in oos_idx])
        oos_sr = _sharpe_cols(oos_block)
        best = int(np.argmax(is_sr))
        # relative rank in (0, 1): ties count half, so a column of identical trials sits at the median
        below = float(np.sum(oos_sr < oos_sr[best])) + 0.5 * float(np.sum(oos_sr == oos_sr[best]) - 1)
        omega = (below + 1.0) / (n + 1.0)
        logits.append(math.log(omega / (1.0 - omega)))
        ranks.append(omega)
        losses.append(float(oos_block[:, best].sum()) < 0)
    lam = np.asarray(logits)
    return {**out, "pbo": float(np.mean(lam <= 0)), "n_combinations": len(combos), "logits": lam.tolist(),
            "median_oos_rank": float(np.median(ranks)), "prob_oos_loss": float(np.mean(losses))}


# ------------------------------------------------------------------------------------------------------ SPA / RC
def spa_test(model_returns: np.ndarray | Mapping[str, np.ndarray], benchmark_returns: np.ndarray, *,
             reps: int = 1000, block: int | None = None, seed: int = 0) -> dict[str, float]:
    """Hansen's SPA test (and White's reality check) that no model beats the benchmark, on per-period returns.

    ``model_returns``: one series or a name → series mapping (columns), aligned with ``benchmark_returns`` (same
    days). Losses are negative returns, as ``arch.bootstrap.SPA`` expects. The stationary bootstrap's mean block
    length is ``block`` (default round(√T), the rate the CIs use). Returns ``spa_pvalue`` (Hansen's consistent
    p-value), ``spa_pvalue_lower`` / ``spa_pvalue_upper`` and ``reality_check_pvalue`` (non-studentized, upper:
    White 2000). Small p-values reject "no model beats the benchmark". NaN when fewer than 3 periods or the loss
    differentials do not vary (nothing to test)."""
    from arch.bootstrap import SPA

    cols = ([np.asarray(v, dtype=np.float64) for v in model_returns.values()]
            if isinstance(model_returns, Mapping) else [np.asarray(model_returns, dtype=np.float64)])
    models = np.column_stack(cols)
    bench = np.asarray(benchmark_returns, dtype=np.float64)
    nan = {"spa_pvalue": _NAN, "spa_pvalue_lower": _NAN, "spa_pvalue_upper": _NAN, "reality_check_pvalue": _NAN,
           "spa_reps": float(reps)}
    if models.shape[0] != len(bench):
        raise ValueError(f"model returns have {models.shape[0]} periods, the benchmark {len(bench)}")
    diff = models - bench[:, None]
    if len(bench) < 3 or not np.any(diff.std(axis=0) > 1e-14):
        return nan
    b = block if block is not None else max(1, round(math.sqrt(len(bench))))
    spa = SPA(-bench, -models, block_size=b, reps=reps, bootstrap="stationary", studentize=True,
              seed=np.random.default_rng(seed))
    spa.compute()
    pv = spa.pvalues
    rc = SPA(-bench, -models, block_size=b, reps=reps, bootstrap="stationary", studentize=False,
             seed=np.random.default_rng(seed))
    rc.compute()
    return {"spa_pvalue": float(pv["consistent"]), "spa_pvalue_lower": float(pv["lower"]),
            "spa_pvalue_upper": float(pv["upper"]), "reality_check_pvalue": float(rc.pvalues["upper"]),
            "spa_reps": float(reps)}


# ----------------------------------------------------------------------------------------------- random entries
def _trade_marks(equity: pl.DataFrame, trades: pl.DataFrame) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each trade: the mark-price series of its (symbol, stretch) and (entry index, holding bars) in it."""
    key = ["symbol", "stretch"] if "stretch" in equity.columns and "stretch" in trades.columns else ["symbol"]
    series: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]] = {}
    per = equity.filter(pl.col("symbol") != "ALL").sort("time")
    for k, g in per.group_by(key, maintain_order=True):
        series[tuple(k)] = (g["time"].dt.epoch("us").to_numpy(), g["price"].to_numpy().astype(np.float64))
    out = []
    for row in trades.select(*key, "entry_time", "exit_time").iter_rows():
        t, p = series.get(tuple(row[: len(key)]), (np.zeros(0, np.int64), np.zeros(0)))
        if len(t) < 2:
            out.append((p, np.array([-1, 0])))
            continue
        e_us = int(row[-2].timestamp() * 1e6)
        x_us = int(row[-1].timestamp() * 1e6)
        i = min(int(np.searchsorted(t, e_us)), len(t) - 1)
        j = min(max(int(np.searchsorted(t, x_us)), i), len(t) - 1)
        out.append((p, np.array([i, j - i])))
    return out


def random_entry_null(equity: pl.DataFrame, trades: pl.DataFrame, *, draws: int = 1000,
                      seed: int = 0) -> dict[str, float]:
    """p-value of the agent's trades against random entries with the same trades, sides, holding times and costs.

    Each trade is placed on its (symbol, stretch)'s mark-price series (the backtest's ``price`` column) at the
    bar of its entry, held its own number of bars. Its cost is what the kernel charged it beyond the mark-to-mark
    move, cost = side·(p[exit]/p[entry] − 1) − pnl/notional, so the observed statistic — the mean net return per
    trade, Σ pnl/notional / n — is the kernel's own. Each of ``draws`` null replays moves every trade to a uniformly
    random entry bar of the same stretch where its holding time still fits, and charges the same cost. p-value =
    (1 + #{null ≥ observed}) / (1 + draws), one-sided: small means entry timing added something random entries do
    not. Random trades may overlap each other; only the timing is randomised, nothing is re-filled.

    NaN p-value (with ``n_trades`` 0) when there are no trades."""
    n = trades.height
    if n == 0:
        return {"random_entry_pvalue": _NAN, "random_entry_observed": _NAN, "random_entry_null_mean": _NAN,
                "random_entry_draws": float(draws), "n_trades": 0.0}
    marks = _trade_marks(equity, trades)
    side = np.sign(trades["side"].cast(pl.Float64).to_numpy())
    notional = np.abs(trades["notional"].cast(pl.Float64).to_numpy())
    with np.errstate(divide="ignore", invalid="ignore"):
        net = np.where(notional > 0, trades["pnl"].cast(pl.Float64).to_numpy() / np.where(notional > 0, notional,
                                                                                         1.0), 0.0)
    rng = np.random.default_rng(seed)
    null = np.zeros(draws)
    for k, (p, (i, h)) in enumerate(marks):
        if i < 0:  # no price series for this trade: it keeps its observed return in every draw
            null += net[k]
            continue
        gross = side[k] * (p[i + h] / p[i] - 1.0)
        cost = gross - net[k]
        starts = rng.integers(0, len(p) - h, size=draws)
        null += side[k] * (p[starts + h] / p[starts] - 1.0) - cost
    observed = float(net.mean())
    null /= n
    return {"random_entry_pvalue": float((1 + np.sum(null >= observed - 1e-15)) / (1 + draws)),
            "random_entry_observed": observed, "random_entry_null_mean": float(null.mean()),
            "random_entry_draws": float(draws), "n_trades": float(n)}


# ----------------------------------------------------------------------------------------------- trials counted
def trials_run(*, storage: str | None = None, tracking_uri: str | None = None, experiment: str | None = None,
               algos: Sequence[str] | None = None) -> dict[str, int]:
    """Configurations actually tried: finished Optuna trials (complete or pruned; a retried trial counts once) in
    every study of ``storage``, plus MLflow training runs of ``algos`` in ``experiment`` that no tuning trial made
    (tuning tags its fold runs ``rltrader.tune_trial``, so they are already counted as their trial).

    Either source may be absent (no tuning yet, no tracking store): it then counts 0. Returns the parts and
    ``total``. ``algos``: default every algorithm (``agents.ALGORITHMS``) and ``ensemble`` (each published
    ensemble is one more configuration; its members are runs of their algorithm)."""
    if algos is None:
        from rltrader.agents import ALGORITHMS

        algos = (*ALGORITHMS, "ensemble")
    optuna_trials = 0
    if storage:
        import optuna
        from optuna.trial import TrialState

        if not storage.startswith("sqlite:///") or Path(storage.removeprefix("sqlite:///")).is_file():
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
                st = optuna.load_study(study_name=summary.study_name, storage=storage)
                optuna_trials += len(st.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    mlflow_runs = 0
    if tracking_uri and experiment:
        db = tracking_uri.removeprefix("sqlite:///")
        if not tracking_uri.startswith("sqlite:///") or Path(db).is_file():
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri)
            exp = client.get_experiment_by_name(experiment)
            if exp is not None:
                for a in algos:
                    runs = client.search_runs([exp.experiment_id], f"attributes.run_name = '{a}'", max_results=50000)
                    mlflow_runs += sum(1 for r in runs if "rltrader.tune_trial" not in r.data.tags)
    return {"optuna_trials": optuna_trials, "mlflow_runs": mlflow_runs, "total": optuna_trials + mlflow_runs}


def daily_series(equity: pl.DataFrame, initial_cash: float) -> pl.DataFrame:
    """UTC-day returns of a backtest's combined curve as (day, ret), the metrics' own daily returns with their
    days: SPA and PBO align several policies' series on the day."""
    from rltrader.evaluate.metrics import combined_equity, daily_returns

    curve = combined_equity(equity)
    days = curve.select(pl.col("time").dt.date().alias("day")).unique(maintain_order=True).sort("day")
    return days.with_columns(pl.Series("ret", daily_returns(curve, initial_cash), dtype=pl.Float64))


# ------------------------------------------------------------------------------------------- the backtest stage
SIGNIFICANCE_BENCHMARKS = ("flat", "buy_and_hold")
"""The baselines an agent's SPA / reality-check p-values are computed against."""


def significance(equity: pl.DataFrame, trades: pl.DataFrame, initial_cash: float,
                 benchmarks: Mapping[str, tuple[pl.DataFrame, float]], *, reps: int, seed: int = 0
                 ) -> dict[str, float]:
    """An agent's p-values for the backtest report: SPA and reality check against each benchmark's daily returns
    (joined on the day) and the random-entry null of its trades; ``reps`` bootstrap replications / null draws."""
    a = daily_series(equity, initial_cash)
    out: dict[str, float] = {}
    for name, (b_equity, b_cash) in benchmarks.items():
        j = a.join(daily_series(b_equity, b_cash), on="day", how="inner", suffix="_b")
        spa = spa_test(j["ret"].to_numpy(), j["ret_b"].to_numpy(), reps=reps, seed=seed)
        out[f"spa_pvalue_vs_{name}"] = spa["spa_pvalue"]
        out[f"reality_check_pvalue_vs_{name}"] = spa["reality_check_pvalue"]
    out["random_entry_pvalue"] = random_entry_null(equity, trades, draws=reps, seed=seed)["random_entry_pvalue"]
    return out


def counted_trials(settings: Settings) -> dict[str, int]:
    """:func:`trials_run` for the settings' tuning storage and MLflow experiment."""
    from rltrader.tune.storage import storage_url

    url = storage_url(settings.tune.storage, settings.data.dir)
    return trials_run(storage=url, tracking_uri=settings.train.tracking_uri, experiment=settings.train.experiment)


def tuning_record(settings: Settings, name: str) -> dict[str, float]:
    """What ``rltrader tune <name>`` reported for this model (``<tune.out_dir>/<name>/summary.json``): the PBO of
    its study and how many of its trials finished; empty when the model was not tuned."""
    from rltrader.integrity import read_report, tune_producer

    path = Path(settings.tune.out_dir) / name / "summary.json"
    if not path.is_file():
        return {}
    rec = read_report(path, "tuning summary", tune_producer(name))
    pbo = (rec.get("pbo") or {}).get("pbo")
    states = rec.get("trial_states") or {}
    return {"pbo": float(pbo) if pbo is not None else _NAN,
            "tune_trials": float(states.get("complete", 0) + states.get("pruned", 0))}
