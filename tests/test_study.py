"""Signal study: targets and IC equal an independent numpy/scipy computation on real bars, costs equal the
formula, no train target reads a later split, a planted leak is found (and the verdict says it beats costs),
and the stage writes its report, DVC metrics and MLflow run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from scipy import stats

from rltrader.config import Settings
from rltrader.data.archive import parse_klines, read_zip_member
from rltrader.data.parquet_store import ParquetStore
from rltrader.data.schema import Market
from rltrader.dataset.build import run_features_stage
from rltrader.errors import ConfigError
from rltrader.study.data import load_rows, round_trip_cost
from rltrader.study.signal import bootstrap_corr_ci, bootstrap_mean_ci, pearson
from rltrader.study.stage import ALL, evaluate_split, run_study_stage

SYMBOLS = ("AVAXUSDT", "FILUSDT")
SPLITS = {"train": {"start": "2023-02-01", "end": "2023-02-15"},
          "val": {"start": "2023-02-15", "end": "2023-02-22"},
          "test": {"start": "2023-02-22", "end": "2023-03-01"}}
H = 15
TINY_STUDY = {"horizons": [1, H], "xgb_rounds": 15, "bootstrap": 50, "ablation_model": "ridge",
              "thresholds": [0.0, 1.0], "min_trades": 5}


def _settings(tmp: Path, **study: Any) -> Settings:
    return Settings.model_validate({
        "data": {"dir": str(tmp / "data")},
        "ingest": {"market": "futures-um", "symbols": list(SYMBOLS), "interval": "1m"},
        "features": {"market": True, "timeframes": ["1h"], "tf_lookback": 6},
        "sessions": {"splits": SPLITS},
        "train": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "artifact_root": str(tmp / "artifacts")},
        "study": {**TINY_STUDY, **study},
    })


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory, shared_archive: Path) -> tuple[Settings, dict[str, pl.DataFrame]]:
    """February 2023 of two real symbols, through the real features stage (market + 1h features on)."""
    tmp = tmp_path_factory.mktemp("study")
    store = ParquetStore(tmp / "data" / "store")
    bars = {}
    for sym in SYMBOLS:
        rel = f"futures/um/monthly/klines/{sym}/1m/{sym}-1m-2023-02.zip"
        bars[sym] = parse_klines(read_zip_member(shared_archive / rel), source=rel, market=Market.FUTURES_UM,
                                 symbol=sym, interval="1m").rows
        store.write_klines(bars[sym])
    settings = _settings(tmp)
    run_features_stage(settings, store)
    return settings, bars


def _rows(settings: Settings) -> Any:
    st = settings.study
    return load_rows(settings, settings.data.dir / "features", list(SYMBOLS), ["train", "val", "test"],
                     train_split="train", train_stride=st.train_stride, eval_stride=1, horizons=[1, H],
                     vol_window=st.vol_window)


class _Column:
    """A "model" whose forecast is one feature column: the IC check needs no fitting."""

    def __init__(self, j: int) -> None:
        self.j = j

    def predict(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = x[:, self.j].astype(np.float64)
        return out


def test_ic_and_targets_equal_independent_numpy(real: tuple[Settings, dict[str, pl.DataFrame]]) -> None:
    settings, bars = real
    rows = _rows(settings)
    j = rows.names.index("ret_60")
    res = evaluate_split(rows, _Column(j), H, "val", None, settings.study)

    # independent: straight from the raw bars and the features file, no study code
    lo = np.datetime64("2023-02-15", "us").astype(np.int64)
    hi = np.datetime64("2023-02-22", "us").astype(np.int64)
    fs, ys, rs = [], [], []
    for sym in SYMBOLS:
        feats = pl.read_parquet(settings.data.dir / "features" / f"{sym}.parquet")
        b = bars[sym]
        assert feats["open_time"].equals(b["open_time"]), "a real month without gaps: rows align with the bars"
        t = b["open_time"].dt.epoch("us").to_numpy()
        o, c = b["open"].to_numpy(), b["close"].to_numpy()
        r1 = np.concatenate([[np.nan], np.diff(np.log(c))])
        sig = pd_rolling_std(r1, settings.study.vol_window)
        valid = feats["valid"].to_numpy()
        for i in range(len(t) - 1 - H):
            if not (lo <= t[i] < hi and valid[i] and t[i + 1 + H] < hi and sig[i] > 0):
                continue
            r = math.log(o[i + 1 + H] / o[i + 1])
            fs.append(float(feats["ret_60"][i]))
            ys.append(r / (sig[i] * math.sqrt(H)))
            rs.append(r)
    f, y, r = np.array(fs), np.array(ys), np.array(rs)
    a = res[ALL]
    assert a["n"] == len(f) > 5000
    assert a["ic"] == pytest.approx(float(np.corrcoef(f, y)[0, 1]), abs=1e-6)
    assert a["rank_ic"] == pytest.approx(float(stats.spearmanr(f, y).statistic), abs=1e-6)
    m = (f != 0) & (r != 0)
    assert a["hit_rate"] == pytest.approx(float(np.mean(np.sign(f[m]) == np.sign(r[m]))), abs=1e-9)
    assert a["ic_lo"] <= a["ic"] <= a["ic_hi"]
    # per symbol too
    for sym in SYMBOLS:
        assert res[sym]["n"] > 2000


def pd_rolling_std(x: np.ndarray, w: int) -> np.ndarray:
    """Trailing sample std over w values, NaN if any is NaN (the pandas definition)."""
    import pandas as pd

    out: np.ndarray = pd.Series(x).rolling(w).std().to_numpy()
    return out


def test_no_train_target_reads_a_later_split(real: tuple[Settings, dict[str, pl.DataFrame]]) -> None:
    settings, _ = real
    rows = _rows(settings)
    train_end = np.datetime64("2023-02-15", "us").astype(np.int64)
    tr = rows.split_id == rows.splits.index("train")
    for h in (1, H):
        ok = tr & np.isfinite(rows.fwd[h])
        # exit bar opens 1 + h bars after the decision bar (latency 0): before the train split ends
        assert ok.sum() > 100 and (rows.time[ok] + (1 + h) * 60_000_000 < train_end).all()
        near_end = tr & (rows.time + (1 + h) * 60_000_000 >= train_end)
        assert not np.isfinite(rows.fwd[h][near_end]).any()
        assert near_end.any() or h < settings.study.train_stride  # h = 15 reaches past the last grid row
    # every train row is on the stride grid
    assert ((rows.time[tr] // 60_000_000) % settings.study.train_stride == 0).all()


def test_round_trip_cost_is_fees_plus_both_legs_slippage() -> None:
    ex = Settings().execution
    notional, price, volume = 10_000.0, 5.0, 40_000.0
    part = notional / price / volume
    expected = 2 * ex.taker_fee + 2 * (ex.half_spread_bps * 1e-4 + ex.impact * math.sqrt(part))
    assert round_trip_cost(ex, notional, price, volume) == pytest.approx(expected, rel=1e-9)


def test_bootstrap_interval_separates_signal_from_noise() -> None:
    rng = np.random.default_rng(0)
    n_days, per_day = 60, 200
    day = np.repeat(np.arange(n_days), per_day)
    f = rng.normal(size=n_days * per_day)
    y = 0.1 * f + rng.normal(size=len(f))
    lo, hi = bootstrap_corr_ci(f, y, day, 300)
    assert 0 < lo < pearson(f, y) < hi
    lo0, hi0 = bootstrap_corr_ci(rng.permutation(f), y, day, 300)
    assert lo0 < 0 < hi0
    # a strategy whose average is carried by one lucky day: the day-block interval reaches down to zero
    pnl = np.zeros(len(day))
    pnl[day == 7] = 0.01
    lo_m, hi_m = bootstrap_mean_ci(pnl, day, 300)
    assert lo_m == 0.0 < pnl.mean() < hi_m


@pytest.mark.slow
def test_stage_finds_a_planted_leak_and_writes_its_outputs(real: tuple[Settings, dict[str, pl.DataFrame]],
                                                           tmp_path: Path) -> None:
    settings, _ = real
    # plant: one feature column becomes the next H bars' fill-to-fill return (a leak no honest feature has)
    fdir = tmp_path / "features"
    fdir.mkdir()
    for sym in SYMBOLS:
        table = pq.read_table(settings.data.dir / "features" / f"{sym}.parquet")
        df = pl.from_arrow(table)
        assert isinstance(df, pl.DataFrame)
        lo = df["open"].log()
        leak = (lo.shift(-1 - H) - lo.shift(-1)).fill_null(0.0).cast(pl.Float32)
        df = df.with_columns(leak.alias("taker_buy"))
        pq.write_table(df.to_arrow().replace_schema_metadata(table.schema.metadata), fdir / f"{sym}.parquet")
    out = tmp_path / "study"
    summary = run_study_stage(settings, features_dir=fdir, out_dir=out, metrics_path=tmp_path / "study.json")
    for name in ("report.html", "ic.png", "deciles.png", "ablation.png", "summary.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    metrics = json.loads((tmp_path / "study.json").read_text())
    assert set(metrics) == {"val", "test"} and set(metrics["test"]) == {"ridge", "xgboost"}
    lead = metrics["test"]["xgboost"][f"h{H}"]
    assert lead["ic"] > 0.5 and lead["ic_lo"] > 0.3 and lead["break_even_bps"] > lead["cost_bps"]
    verdict = next(v for v in summary["verdicts"] if v.startswith(f"h={H} "))
    assert "test: gross (= break-even cost)" in verdict and verdict.endswith("EXCEEDS costs")
    # the ablation sees it: dropping the volume group (where the leak sits) costs most of the IC
    ab = summary["ablation"]["ic"][str(H)]
    assert ab["all"] - ab["without_volume"] > 0.3
    assert "market" in summary["ablation"]["groups"] and "tf1h" in summary["ablation"]["groups"]
    # MLflow: one `study` run with the headline metrics and the report
    import mlflow

    run = mlflow.get_run(summary["mlflow_run"])
    assert run.info.run_name == "study"
    assert run.data.metrics[f"test_xgboost_h{H}_ic"] == pytest.approx(lead["ic"])


def test_unknown_split_names_the_parameter(real: tuple[Settings, dict[str, pl.DataFrame]], tmp_path: Path) -> None:
    settings, _ = real
    bad = settings.model_copy(update={"study": settings.study.model_copy(update={"eval_splits": ["backtest"]})})
    with pytest.raises(ConfigError, match="backtest"):
        run_study_stage(bad, out_dir=tmp_path / "s", metrics_path=None, log_mlflow=False)
