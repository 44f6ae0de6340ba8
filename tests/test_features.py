"""Features: equal to the `ta` package on real data, causal (property test), and restarted at every gap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest
import ta
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rltrader.config import FeatureSettings
from rltrader.data.archive import parse_klines, read_zip_member
from rltrader.data.schema import Market
from rltrader.dataset.features import compute_features, compute_indicators, feature_spec
from rltrader.testing import synthetic_klines

P = FeatureSettings()
AVAX = "futures/um/monthly/klines/AVAXUSDT/1m/AVAXUSDT-1m-2023-02.zip"


@pytest.fixture(scope="module")
def real_bars(shared_archive: Path) -> pl.DataFrame:
    data = read_zip_member(shared_archive / AVAX)
    return parse_klines(data, source=AVAX, market=Market.FUTURES_UM, symbol="AVAXUSDT", interval="1m").rows


def _ta_reference(df: pd.DataFrame, p: FeatureSettings) -> dict[str, pd.Series]:
    c, h, lo = df["close"], df["high"], df["low"]
    fast, slow, sig = p.macd
    macd = ta.trend.MACD(c, window_slow=slow, window_fast=fast, window_sign=sig)
    bb = ta.volatility.BollingerBands(c, window=p.bollinger, window_dev=p.bollinger_dev)
    ref = {
        "rsi": ta.momentum.RSIIndicator(c, window=p.rsi).rsi(),
        "macd": macd.macd(), "macd_signal": macd.macd_signal(), "macd_hist": macd.macd_diff(),
        "bb_mavg": bb.bollinger_mavg(), "bb_pband": bb.bollinger_pband(), "bb_wband": bb.bollinger_wband(),
        "atr": ta.volatility.AverageTrueRange(h, lo, c, window=p.atr).average_true_range(),
    }
    for n in p.ema:
        ref[f"ema_{n}"] = ta.trend.EMAIndicator(c, window=n).ema_indicator()
    return ref


def _assert_matches(ours: np.ndarray, ref: np.ndarray, name: str, warmup: int) -> None:
    """1e-6 relative after warm-up. Relative to the series' typical size, so that an oscillator crossing
    zero (MACD, %B) is not judged by the rounding noise of a difference of two nearly equal numbers."""
    a, b = ours[warmup:], ref[warmup:]
    assert not np.isnan(a).any(), f"{name}: NaN after warm-up"
    scale = np.maximum(np.abs(b), np.median(np.abs(b)))
    worst = float(np.max(np.abs(a - b) / scale))
    assert worst <= 1e-6, f"{name}: max relative error {worst:.2e}"


def test_indicators_match_ta_on_real_data(real_bars: pl.DataFrame) -> None:
    ind = compute_indicators(real_bars, P, "1m")
    assert ind["segment"].n_unique() == 1, "the reference month has no gaps"
    ref = _ta_reference(real_bars.to_pandas(), P)
    warmup = feature_spec(P).warmup
    for name, series in ref.items():
        _assert_matches(ind[name].to_numpy().astype(np.float64), series.to_numpy(), name, warmup)


def test_indicators_restart_after_a_gap(real_bars: pl.DataFrame) -> None:
    """A gap splits the series: each side equals `ta` run on that side alone, and warm-up is null again."""
    cut = slice(10_000, 10_030)
    bars = pl.concat([real_bars[: cut.start], real_bars[cut.stop:]])
    ind = compute_indicators(bars, P, "1m")
    assert ind["segment"].n_unique() == 2
    after = bars[cut.start:].to_pandas().reset_index(drop=True)
    ref = _ta_reference(after, P)
    ours = ind[cut.start:]
    for name, series in ref.items():
        _assert_matches(ours[name].to_numpy().astype(np.float64), series.to_numpy(), name, feature_spec(P).warmup)
    # nothing right after the gap is computed from bars before it
    feats = compute_features(bars, P, "1m")
    assert not feats["valid"][cut.start: cut.start + feature_spec(P).warmup - 1].any()
    assert feats["valid"][cut.start + feature_spec(P).warmup + 5]


def test_feature_columns_are_float32_scale_free_and_finite(real_bars: pl.DataFrame) -> None:
    feats = compute_features(real_bars, P, "1m")
    spec = feature_spec(P)
    assert tuple(c for c in feats.columns if c in spec.names) == spec.names
    valid = feats.filter(pl.col("valid"))
    assert valid.height > real_bars.height - spec.warmup - 1
    x = valid.select(spec.names).to_numpy()
    assert x.dtype == np.float32 and np.isfinite(x).all()
    # scale-free: the same bars at 1000× the price give the same features
    scaled = real_bars.with_columns([pl.col(c) * 1000 for c in ("open", "high", "low", "close")])
    y = compute_features(scaled, P, "1m").filter(pl.col("valid")).select(spec.names).to_numpy()
    np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5)


_SMALL = FeatureSettings(return_horizons=[1, 3], rsi=5, ema=[4, 8], macd=(3, 6, 3), bollinger=5, atr=4,
                         volatility=[4], zscore_window=10)
_N = 120


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), cut=st.integers(0, _N - 2), factor=st.floats(0.5, 2.0),
       how=st.sampled_from(["scale_prices", "volume", "drop_rows", "spike"]))
def test_no_look_ahead(seed: int, cut: int, factor: float, how: str) -> None:
    """Changing any bar after t never changes a feature (or its validity) at or before t."""
    bars = synthetic_klines("TEST", "2024-03-01", _N, seed=seed)
    later = pl.int_range(pl.len()) > cut
    if how == "scale_prices":
        changed = bars.with_columns([pl.when(later).then(pl.col(c) * factor).otherwise(pl.col(c))
                                     for c in ("open", "high", "low", "close")])
    elif how == "volume":
        changed = bars.with_columns(pl.when(later).then(pl.col("volume") * factor + 1).otherwise(pl.col("volume")))
    elif how == "drop_rows":
        changed = bars.filter(~later | (pl.int_range(pl.len()) % 3 != 0))
    else:
        changed = bars.with_columns(pl.when(pl.int_range(pl.len()) == cut + 1).then(pl.col("high") * 5)
                                    .otherwise(pl.col("high")).alias("high"))
    a = compute_features(bars, _SMALL, "1m")[: cut + 1]
    b = compute_features(changed, _SMALL, "1m")[: cut + 1]
    assert a.equals(b), f"features at or before row {cut} changed after perturbing later rows ({how})"
