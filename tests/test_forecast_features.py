"""``features.forecast``: the forecast columns are causal (a value at ``t`` never changes when bars after ``t``
change, inside the train split where the model is refitted walk-forward and after it where it is frozen), the
model is fitted on train rows only, and the sessions stage carries the columns to the agents."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from test_sessions import fill_store, make_settings

from rltrader.config import Settings
from rltrader.data.parquet_store import ParquetStore
from rltrader.dataset.build import read_features, run_features_stage, run_sessions_stage
from rltrader.dataset.forecast_features import refit_dates
from rltrader.dataset.split import load_split

SYMS = ("AAAUSDT", "BBBUSDT")


def _settings(tmp: Path) -> Settings:
    d = make_settings(tmp).model_dump(mode="json")
    d["features"].update(forecast=[5], forecast_refit_days=1)
    d["study"] = {"train_stride": 3, "vol_window": 4, "xgb_rounds": 10}
    return Settings.model_validate(d)


def _build(tmp: Path, mutate_after: int | None = None, factor: float = 1.5) -> dict[str, pl.DataFrame]:
    """The features stage over the test bars; ``mutate_after``: bars opening at/after it get prices × factor
    (and the volumes ÷ factor), in every symbol."""
    settings = _settings(tmp)
    store = fill_store(tmp / "original")  # the store keeps stored rows on conflicts: mutate into a fresh one
    mutated = ParquetStore(tmp / "data" / "store")
    for sym in SYMS:
        bars = store.read_klines("futures-um", sym, "1m")
        if mutate_after is not None:
            late = pl.col("open_time").dt.epoch("us") >= mutate_after
            bars = bars.with_columns(*(pl.when(late).then(pl.col(c) * factor).otherwise(pl.col(c)).alias(c)
                                       for c in ("open", "high", "low", "close")),
                                     pl.when(late).then(pl.col("volume") / factor).otherwise(pl.col("volume"))
                                     .alias("volume"))
        mutated.write_klines(bars)
    run_features_stage(settings, mutated)
    return {s: read_features(settings.data.dir / "features", s)[0] for s in SYMS}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pl.DataFrame]:
    return _build(tmp_path_factory.mktemp("fc_ref"))


@pytest.mark.slow
@pytest.mark.parametrize("cut_day", ["2024-01-03T07:13", "2024-01-05T23:59", "2024-01-07T12:00"])
def test_forecast_columns_do_not_look_ahead(reference: dict[str, pl.DataFrame], tmp_path: Path,
                                            cut_day: str) -> None:
    """Cuts inside the train split (walk-forward refits after it must not reach back), at its last bar, and in
    val (the frozen model): every value before the cut is bit-identical; after it something changed (the test
    can fail)."""
    cut = int(np.datetime64(cut_day, "us").astype(np.int64))
    mutated = _build(tmp_path, mutate_after=cut)
    changed_after = False
    for s in SYMS:
        a, b = reference[s], mutated[s]
        t = a["open_time"].dt.epoch("us").to_numpy()
        assert np.array_equal(t, b["open_time"].dt.epoch("us").to_numpy())
        before = t < cut
        assert np.array_equal(a["fc_5"].to_numpy()[before], b["fc_5"].to_numpy()[before]), s
        changed_after |= not np.array_equal(a["fc_5"].to_numpy()[~before], b["fc_5"].to_numpy()[~before])
    assert changed_after


@pytest.mark.slow
def test_forecast_is_walk_forward_inside_train_and_frozen_after(reference: dict[str, pl.DataFrame],
                                                                 tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    dates = refit_dates(settings)
    assert len(dates) == 6  # train 2024-01-01..06: refits each day, then the train end
    fc = reference["AAAUSDT"]
    t = fc["open_time"].dt.epoch("us").to_numpy()
    v = fc["fc_5"].to_numpy()
    assert (v[t < dates[1]] == 0).all()  # no model before one day of train rows has its targets
    assert np.abs(v[(t >= dates[1]) & (t < dates[-1])]).max() > 0
    assert np.abs(v[t >= dates[-1]]).max() > 0  # val / test / backtest: the frozen train model


@pytest.mark.slow
def test_sessions_carry_the_forecast_columns(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    run_features_stage(settings, fill_store(tmp_path))
    run_sessions_stage(settings)
    train = load_split(settings.data.dir / "sessions", "train")
    assert train.feature_names[-1] == "fc_5"
    assert np.isfinite(train.features[:, -1]).all()
