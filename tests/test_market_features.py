"""Market and multi-timeframe features: causal for every symbol (property test), the market factor equals an
independent numpy computation, and a higher bar is seen only from the first base bar after it closed."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rltrader.config import FeatureSettings
from rltrader.dataset.market_features import compute_all_features, full_feature_spec, timeframe_frame
from rltrader.errors import ConfigError
from rltrader.testing import synthetic_klines

_SMALL = FeatureSettings(return_horizons=[1, 3], rsi=5, ema=[4, 8], macd=(3, 6, 3), bollinger=5, atr=4,
                         volatility=[4], zscore_window=10, market=True, timeframes=["5m", "15m"], tf_lookback=3)
_N = 300


def _three(seed: int) -> dict[str, pl.DataFrame]:
    return {"A": synthetic_klines("A", "2024-03-01", _N, seed=seed),
            "B": synthetic_klines("B", "2024-03-01", _N, seed=seed + 1, price=7.0, missing=((40, 44),)),
            "C": synthetic_klines("C", "2024-03-01 00:30", _N - 30, seed=seed + 2, price=0.3)}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), cut=st.integers(0, _N - 2), factor=st.floats(0.5, 2.0),
       how=st.sampled_from(["scale_prices", "drop_rows", "spike", "drop_symbol_tail"]),
       victim=st.sampled_from(["A", "B", "C"]))
def test_no_look_ahead_across_symbols(seed: int, cut: int, factor: float, how: str, victim: str) -> None:
    """Changing any symbol's bars after time t never changes any symbol's feature (or validity) at or before t."""
    bars = _three(seed)
    t_cut = bars["A"]["open_time"][cut]
    later = pl.col("open_time") > t_cut
    b = bars[victim]
    if how == "scale_prices":
        changed = b.with_columns([pl.when(later).then(pl.col(c) * factor).otherwise(pl.col(c))
                                  for c in ("open", "high", "low", "close")])
    elif how == "drop_rows":
        changed = b.filter(~later | (pl.int_range(pl.len()) % 3 != 0))
    elif how == "spike":
        first_after = pl.col("open_time") == pl.col("open_time").filter(later).min()
        changed = b.with_columns(pl.when(first_after).then(pl.col("close") * 3).otherwise(pl.col("close")))
    else:
        changed = b.filter(~later)
    if changed.is_empty():
        return
    a = compute_all_features(bars, _SMALL, "1m")
    z = compute_all_features({**bars, victim: changed}, _SMALL, "1m")
    for sym in bars:
        x = a[sym].filter(pl.col("open_time") <= t_cut)
        y = z[sym].filter(pl.col("open_time") <= t_cut)
        assert x.equals(y), f"{sym}: features at or before {t_cut} changed after perturbing {victim} later ({how})"


def test_market_factor_equals_numpy() -> None:
    bars = _three(3)
    out = compute_all_features(bars, _SMALL, "1m")
    # independent: a dense minute grid, NaN where a symbol lacks the bar, mean over symbols with both bars
    t0 = min(int(b["open_time"].dt.epoch("us").min()) for b in bars.values())  # type: ignore[arg-type]
    grid = np.full((3, _N), np.nan)
    for i, b in enumerate(bars.values()):
        idx = (b["open_time"].dt.epoch("us").to_numpy() - t0) // 60_000_000
        grid[i, idx] = np.log(b["close"].to_numpy())
    r = np.diff(grid, axis=1)  # r[:, k] = return into minute k+1
    n = np.isfinite(r).sum(axis=0)
    with np.errstate(invalid="ignore"):
        m = np.where(n >= 2, np.nansum(r, axis=0) / np.maximum(n, 1), np.nan)
    a = out["A"]
    k = (a["open_time"].dt.epoch("us").to_numpy() - t0) // 60_000_000
    ours = a["mkt_ret_1"].to_numpy().astype(np.float64)
    ref = np.concatenate([[np.nan], m])[k]
    both = np.isfinite(ref)
    assert both.sum() > 200
    np.testing.assert_allclose(ours[both], ref[both], rtol=1e-5, atol=1e-7)
    # 3-bar market return: the sum of the last three market returns where all exist
    ref3 = ref[2:] + ref[1:-1] + ref[:-2]
    ok = np.isfinite(ref3) & np.isfinite(ours[2:])
    np.testing.assert_allclose(a["mkt_ret_3"].to_numpy()[2:][ok], ref3[ok], rtol=1e-4, atol=1e-7)
    resid = a["ret_3"].to_numpy() - a["mkt_ret_3"].to_numpy()
    np.testing.assert_allclose(a["resid_ret_3"].to_numpy(), resid, rtol=1e-5, atol=1e-7)
    # minutes where only one symbol has data (C starts at 00:30, B has a gap) are 2-of-3 or undefined
    assert a.filter(pl.col("open_time").dt.minute() == 0)["mkt_ret_1"].null_count() >= 1


def test_higher_bar_visible_from_first_base_bar_after_it_closes() -> None:
    bars = synthetic_klines("A", "2024-03-01", 200, seed=5)
    p = FeatureSettings(market=False, timeframes=["15m"], tf_lookback=3, rsi=5)
    feats = compute_all_features({"A": bars}, p, "1m")["A"]
    tf = timeframe_frame(bars, p, "1m", "15m")
    # the 15m bar [00:30, 00:45) has return log(close 00:44) - log(close 00:29)
    c = bars["close"].to_numpy()
    expected = np.log(c[44]) - np.log(c[29])
    key = int(bars["open_time"].dt.epoch("us")[30])
    assert tf.filter(pl.col("tf_key") == key)["tf15m_ret_1"][0] == pytest.approx(expected, rel=1e-9)
    col = feats["tf15m_ret_1"].to_numpy()
    assert col[44] != pytest.approx(expected, rel=1e-6)   # the bar that closes it: not yet
    assert col[45] == pytest.approx(expected, rel=1e-6)   # the first bar after it: visible
    assert col[59] == pytest.approx(expected, rel=1e-6)
    # an incomplete 15m bar (a missing minute) is a gap: nothing reads it
    holed = bars.filter(pl.int_range(pl.len()) != 50)
    f2 = compute_all_features({"A": holed}, p, "1m")["A"]
    seen = f2.filter((pl.col("open_time") >= bars["open_time"][60]) & (pl.col("open_time") < bars["open_time"][75]))
    assert seen["tf15m_ret_1"].null_count() == seen.height


def test_spec_and_valid_cover_every_new_column() -> None:
    bars = _three(7)
    out = compute_all_features(bars, _SMALL, "1m")
    spec = full_feature_spec(_SMALL, "1m")
    for df in out.values():
        assert tuple(c for c in df.columns if c in spec.names) == spec.names
        v = df.filter(pl.col("valid")).select(spec.names).to_numpy()
        assert v.dtype == np.float32 and np.isfinite(v).all() and len(v) > 0
    # switched off: exactly the base features
    base = FeatureSettings()
    assert full_feature_spec(base).names == full_feature_spec(base.model_copy(update={"market": False})).names
    assert not any(n.startswith(("mkt_", "tf")) for n in full_feature_spec(base).names)


def test_market_with_too_few_symbols_names_the_parameter() -> None:
    one = {"A": synthetic_klines("A", "2024-03-01", 100, seed=1)}
    with pytest.raises(ConfigError, match=r"features\.market"):
        compute_all_features(one, FeatureSettings(market=True), "1m")


def test_bad_timeframe_names_the_parameter() -> None:
    with pytest.raises(ConfigError, match=r"features\.timeframes"):
        full_feature_spec(FeatureSettings(timeframes=["90s"]), "1m")
    with pytest.raises(ConfigError, match=r"features\.timeframes"):
        full_feature_spec(FeatureSettings(timeframes=["1h"]), "1h")
