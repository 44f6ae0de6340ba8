"""The execution model: accounting invariants over random order sequences, costs, filters, liquidation, funding."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rltrader.errors import ConfigError
from rltrader.execution import (
    AVG_ENTRY,
    CASH,
    EQUITY,
    FEES,
    FUNDING,
    FUNDING_PERIOD_US,
    INSURANCE,
    N_FILLS,
    N_LIQUIDATIONS,
    QTY,
    REALIZED,
    Accounts,
    ExecutionParams,
    close_position,
    fill_price,
    market_order,
    process_bar,
    round_qty,
)

FREE = {"taker_fee": 0.0, "maker_fee": 0.0, "half_spread_bps": 0.0, "impact": 0.0}


def run_orders(p: ExecutionParams, orders: list[float], closes: list[float], volume: float = 1e4,
               check: bool = True) -> Accounts:
    """Process one bar per order (open = previous close) for one account, checking invariants after each bar."""
    acc = Accounts(1, p.initial_cash)
    xp = p.to_array()
    prev_fees, prev = acc.fees_paid[0], closes[0]
    for i, (dq, c) in enumerate(zip(orders, closes, strict=True)):
        o = prev
        process_bar(acc.state, 0, dq, i * 60_000_000 + 60_000_000, o, max(o, c) * 1.001, min(o, c) * 0.999, c,
                    volume, xp)
        prev = c
        if check:
            s = acc.state[:, 0]
            assert s[EQUITY] == pytest.approx(s[CASH] + s[QTY] * c, rel=1e-12, abs=1e-9)
            assert s[FEES] >= prev_fees >= 0.0
            prev_fees = s[FEES]
            # average-cost bookkeeping reconciles with the equity change
            pnl = s[REALIZED] + s[QTY] * (c - s[AVG_ENTRY]) - s[FEES] - s[FUNDING] + s[INSURANCE]
            assert s[EQUITY] - p.initial_cash == pytest.approx(pnl, rel=1e-9, abs=1e-6)
            if p.market == "spot":
                assert s[QTY] >= 0.0 and s[CASH] >= -1e-9
    return acc


orders_st = st.lists(st.tuples(st.floats(-200, 200, allow_nan=False), st.floats(-0.05, 0.05)), min_size=1,
                     max_size=40)


@settings(max_examples=150, deadline=None)
@given(orders_st, st.sampled_from(["spot", "futures"]), st.sampled_from([1.0, 3.0]), st.booleans())
def test_invariants_over_random_orders(seq: list[tuple[float, float]], market: str, leverage: float,
                                       filters: bool) -> None:
    lev = 1.0 if market == "spot" else leverage
    extra = {"tick_size": 0.01, "step_size": 0.001, "min_notional": 5.0} if filters else {}
    p = ExecutionParams(market=market, leverage=lev, taker_fee=0.001, half_spread_bps=2.0, impact=0.002,  # type: ignore[arg-type]
                        **extra)
    closes = list(100.0 * np.exp(np.cumsum([r for _, r in seq])))
    acc = run_orders(p, [q for q, _ in seq], closes)
    if filters:
        assert acc.qty[0] == pytest.approx(round(acc.qty[0] / 0.001) * 0.001, abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(st.floats(0.001, 80.0), st.floats(1.0, 1e4), st.sampled_from(["spot", "futures"]), st.booleans())
def test_zero_fee_round_trip_at_unchanged_price_keeps_equity(q: float, price: float, market: str, short: bool) -> None:
    p = ExecutionParams(market=market, initial_cash=1e6, **FREE)  # type: ignore[arg-type]
    side = -1.0 if short and market == "futures" else 1.0
    acc = run_orders(p, [side * q, -side * q], [price, price])
    assert acc.equity[0] == pytest.approx(1e6, rel=1e-13) and acc.qty[0] == 0.0 and acc.fees_paid[0] == 0.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-0.2, 0.2), min_size=1, max_size=30), st.sampled_from(["spot", "futures"]))
def test_flat_account_equity_never_changes(returns: list[float], market: str) -> None:
    p = ExecutionParams(market=market, funding_rate_8h=0.001)  # type: ignore[arg-type]
    closes = list(50.0 * np.exp(np.cumsum(returns)))
    acc = run_orders(p, [0.0] * len(closes), closes)
    assert acc.equity[0] == p.initial_cash and acc.cash[0] == p.initial_cash


def test_costs_fees_and_slippage() -> None:
    p = ExecutionParams(half_spread_bps=5.0, impact=0.01, taker_fee=0.0005)
    xp = p.to_array()
    small, big = fill_price(100.0, 1.0, 1.0, 10_000.0, xp), fill_price(100.0, 1.0, 100.0, 10_000.0, xp)
    assert small == pytest.approx(100.0 * (1 + 5e-4 + 0.01 * 0.01))
    assert big > small > 100.0 > fill_price(100.0, -1.0, 1.0, 10_000.0, xp)
    acc = Accounts(1, 10_000.0)
    market_order(acc.state, 0, 10.0, 100.0, 10_000.0, xp)
    px = fill_price(100.0, 1.0, 10.0, 10_000.0, xp)
    assert acc.avg_entry[0] == px and acc.fees_paid[0] == pytest.approx(10 * px * 0.0005)
    assert acc.cash[0] == pytest.approx(10_000.0 - 10 * px * 1.0005)


def test_exchange_filters_round_or_reject_like_binance() -> None:
    p = ExecutionParams(tick_size=0.1, step_size=0.01, min_notional=100.0, half_spread_bps=3.0, impact=0.0)
    xp = p.to_array()
    assert round_qty(1.2345, 0.01) == pytest.approx(1.23) and round_qty(-1.2399, 0.01) == pytest.approx(-1.23)
    # buys round the slipped price up to the tick, sells down
    assert fill_price(100.0, 1.0, 1.0, 1e4, xp) == pytest.approx(100.1)
    assert fill_price(100.0, -1.0, 1.0, 1e4, xp) == pytest.approx(99.9)
    acc = Accounts(1, 10_000.0)
    assert market_order(acc.state, 0, 0.5, 100.0, 1e4, xp) == 0.0  # 50 quote < min notional: rejected
    assert acc.state[N_FILLS, 0] == 0 and acc.cash[0] == 10_000.0
    assert market_order(acc.state, 0, 1.23456, 100.0, 1e4, xp) == pytest.approx(1.23)
    # reducing to a remainder below min notional is rejected, closing to flat is exempt (reduce-only)
    assert market_order(acc.state, 0, -0.5, 100.0, 1e4, xp) == 0.0
    assert market_order(acc.state, 0, -1.23, 100.0, 1e4, xp) == pytest.approx(-1.23)
    assert acc.qty[0] == 0.0


def test_spot_is_long_only_and_cash_limited() -> None:
    p = ExecutionParams(market="spot", taker_fee=0.001, maker_fee=0.001)
    xp = p.to_array()
    acc = Accounts(1, 1_000.0)
    assert market_order(acc.state, 0, -1.0, 100.0, 1e4, xp) == 0.0  # no short
    filled = market_order(acc.state, 0, 50.0, 100.0, 1e4, xp)  # wants 5000, has 1000
    assert 0 < filled < 10.0 and 0.0 <= acc.cash[0] < 1.0  # all in, the price for the larger order was assumed
    assert market_order(acc.state, 0, -100.0, 100.0, 1e4, xp) == pytest.approx(-filled)  # sell clipped to holdings


def test_futures_leverage_cap_and_flip() -> None:
    p = ExecutionParams(leverage=2.0, **FREE)
    xp = p.to_array()
    acc = Accounts(1, 1_000.0)
    assert market_order(acc.state, 0, 100.0, 100.0, 1e4, xp) == pytest.approx(20.0)  # 2x of 1000 at 100
    assert market_order(acc.state, 0, 5.0, 100.0, 1e4, xp) == 0.0  # at the cap
    assert market_order(acc.state, 0, -40.0, 110.0, 1e4, xp) == pytest.approx(-40.0)  # flip: realize, re-enter
    assert acc.qty[0] == pytest.approx(-20.0) and acc.state[REALIZED, 0] == pytest.approx(200.0)
    assert acc.avg_entry[0] == 110.0


def test_liquidation_at_the_maintenance_margin_price() -> None:
    p = ExecutionParams(leverage=10.0, maintenance_margin=0.01, **FREE)
    xp = p.to_array()
    acc = Accounts(1, 1_000.0)
    process_bar(acc.state, 0, 100.0, 60_000_000, 100.0, 100.5, 99.5, 100.0, 1e4, xp)
    assert acc.qty[0] == pytest.approx(100.0)
    cash = acc.cash[0]
    process_bar(acc.state, 0, 0.0, 120_000_000, 100.0, 100.0, 85.0, 88.0, 1e4, xp)  # low 85: under ~90.9
    p_liq = -cash / (100.0 * (1 - 0.01))
    assert acc.state[N_LIQUIDATIONS, 0] == 1 and acc.qty[0] == 0.0
    assert acc.equity[0] == pytest.approx(0.01 * 100.0 * p_liq)
    # a short gapped through its bankruptcy price: the insurance fund covers the rest, equity floors at 0
    acc = Accounts(1, 1_000.0)
    process_bar(acc.state, 0, -100.0, 60_000_000, 100.0, 100.5, 99.5, 100.0, 1e4, xp)
    process_bar(acc.state, 0, 0.0, 120_000_000, 130.0, 131.0, 129.0, 130.0, 1e4, xp)
    assert acc.qty[0] == 0.0 and acc.equity[0] == 0.0 and acc.state[INSURANCE, 0] > 0.0


def test_funding_every_8h_longs_pay() -> None:
    p = ExecutionParams(funding_rate_8h=0.0001, **FREE)
    xp = p.to_array()
    acc = Accounts(2, 10_000.0)
    for b, q in enumerate((10.0, -10.0)):
        process_bar(acc.state, b, q, FUNDING_PERIOD_US - 60_000_000, 100.0, 100.0, 100.0, 100.0, 1e4, xp)
        process_bar(acc.state, b, 0.0, FUNDING_PERIOD_US, 100.0, 100.0, 100.0, 100.0, 1e4, xp)
    assert acc.state[FUNDING].tolist() == pytest.approx([0.1, -0.1])
    assert acc.equity.tolist() == pytest.approx([9999.9, 10000.1])


def test_accounts_are_independent_and_forced_close_flattens() -> None:
    p = ExecutionParams(half_spread_bps=2.0, impact=0.01)
    xp = p.to_array()
    rng = np.random.default_rng(0)
    o, c = rng.normal(100, 1, 8), rng.normal(100, 1, 8)
    bars = np.stack([o, np.maximum(o, c), np.minimum(o, c), c, np.full(8, 1e3)])
    orders = rng.normal(0, 5, 8)
    batch = Accounts(8, 10_000.0)
    for b in range(8):
        process_bar(batch.state, b, orders[b], b + 1, *bars[:, b], xp)
    for b in range(8):  # account b alone gives the same state: a kernel call touches its own account only
        single = Accounts(1, 10_000.0)
        process_bar(single.state, 0, orders[b], b + 1, *bars[:, b], xp)
        np.testing.assert_array_equal(batch.state[:, b], single.state[:, 0])
    before = batch.fees_paid.copy()
    for b in range(8):
        close_position(batch.state, b, bars[3, b], bars[4, b], xp)
    assert np.all(batch.qty == 0.0) and np.all(batch.fees_paid > before)


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"market": "perp"}, "execution.market"), ({"leverage": 0.0}, "execution.leverage"),
    ({"leverage": -1.0}, "execution.leverage"), ({"market": "spot", "leverage": 2.0}, "execution.leverage"),
    ({"taker_fee": -0.001}, "execution.taker_fee"), ({"maintenance_margin": 1.0}, "execution.maintenance_margin"),
    ({"latency_bars": -1}, "execution.latency_bars"), ({"step_size": -1.0}, "execution.step_size"),
    ({"initial_cash": 0.0}, "execution.initial_cash"), ({"funding_rate_8h": math.nan}, "execution.funding_rate_8h"),
])
def test_bad_execution_params_name_the_parameter(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        ExecutionParams(**kwargs)  # type: ignore[arg-type]
