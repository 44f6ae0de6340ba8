"""Incremental features equal the batch `features` stage on real bars, gaps included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from rltrader.config import FeatureSettings
from rltrader.data.archive import parse_klines, read_zip_member
from rltrader.data.schema import Market
from rltrader.dataset.features import compute_features
from rltrader.live.features import IncrementalFeatures

P = FeatureSettings()
NEAR = "futures/um/monthly/klines/NEARUSDT/1m/NEARUSDT-1m-2023-04.zip"


@pytest.fixture(scope="module")
def two_days(shared_archive: Path) -> pl.DataFrame:
    """A warm-up day and the replayed day (2023-04-10/11) of real NEARUSDT futures bars."""
    data = read_zip_member(shared_archive / NEAR)
    rows = parse_klines(data, source=NEAR, market=Market.FUTURES_UM, symbol="NEARUSDT", interval="1m").rows
    lo = pl.datetime(2023, 4, 10, time_zone="UTC")
    return rows.filter((pl.col("open_time") >= lo) & (pl.col("open_time") < lo + pl.duration(days=2)))


def _incremental(bars: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    inc = IncrementalFeatures(P, "1m")
    b = bars.sort("open_time")
    return inc.run(b["open_time"].dt.epoch("us").to_numpy(), *(b[c].to_numpy() for c in (
        "open", "high", "low", "close", "volume")), b["trades"].to_numpy().astype(np.float64),
        b["taker_buy_volume"].to_numpy())


def _compare(bars: pl.DataFrame) -> None:
    batch = compute_features(bars, P, "1m")
    names = IncrementalFeatures(P).names
    ref = batch.select(names).to_numpy().astype(np.float64)  # nulls → NaN
    ours, valid = _incremental(bars)
    np.testing.assert_array_equal(valid, batch["valid"].to_numpy(), err_msg="valid flags differ")
    assert np.array_equal(np.isnan(ours), np.isnan(ref)), "undefined (NaN) positions differ"
    ok = batch["valid"].to_numpy()
    assert ok.sum() > 1000
    for j, name in enumerate(names):
        a, b = ours[ok, j].astype(np.float64), ref[ok, j]
        scale = np.maximum(np.abs(b), np.median(np.abs(b)))
        worst = float(np.max(np.abs(a - b) / scale))
        assert worst <= 1e-6, f"{name}: max relative error {worst:.2e}"


def test_equal_to_batch_stage_on_a_real_replayed_day(two_days: pl.DataFrame) -> None:
    assert two_days.height == 2 * 1440
    _compare(two_days)


def test_a_gap_restarts_every_window_as_the_batch_segment_does(two_days: pl.DataFrame) -> None:
    t = two_days["open_time"]
    holed = two_days.filter((t < t[1500]) | (t > t[1507]))  # 8 missing minutes on the replayed day
    _compare(holed)
    _, valid = _incremental(holed)
    warmup = IncrementalFeatures(P).warmup
    assert not valid[1500:1500 + warmup - 1].any() and valid[1500 + warmup]  # warm-up again after the gap


def test_zero_price_bar_is_not_valid() -> None:
    inc = IncrementalFeatures(P)
    for k in range(400):
        row, ok = inc.update(k * 60_000_000, 1.0, 1.01, 0.99, 1.0 + 0.001 * (k % 7), 10.0 + k % 3, 5, 4.0)
    assert ok and np.isfinite(row).all()
    row, ok = inc.update(400 * 60_000_000, 1.0, 1.0, 0.0, 0.0, 10.0, 5, 4.0)
    assert not ok and np.isnan(row).any()


@pytest.mark.parametrize(("net_name", "encoder"), [("d3qn", "cnn"), ("d3qn", "tcn"), ("ppo", "cnn")])
def test_bound_scores_equal_the_modules_scores(net_name: str, encoder: str) -> None:
    """The trader's per-bar forward (``PolicyModule.bound_scores``: zero-copy buffers, the net traced and frozen
    when that is bit-identical) gives exactly ``scores`` on the same buffers, refilled in place bar after bar."""
    import torch

    from rltrader.agents.networks import ActorCritic, DuelingQNet, NetConfig
    from rltrader.agents.packaging import PolicyModule

    torch.manual_seed(1)
    cls = DuelingQNet if net_name == "d3qn" else ActorCritic
    net = cls(7, 12, 8, 4, NetConfig(encoder=encoder, channels=8, hidden=16)).eval()
    module = PolicyModule(net, "q_values" if net_name == "d3qn" else "logits", 12, 7, 8, 4)
    window, state = np.zeros((1, 12, 7), np.float32), np.zeros((1, 8), np.float32)
    run = module.bound_scores(window, state)
    rng = np.random.default_rng(0)
    for _ in range(20):
        window[:] = rng.standard_normal(window.shape)
        state[:] = rng.standard_normal(state.shape)
        assert np.array_equal(run(), module.scores(window, state))
