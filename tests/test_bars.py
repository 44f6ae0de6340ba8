"""The incremental bar builder: boundaries, empty windows, out-of-order and late trades, reference equality."""

from __future__ import annotations

from datetime import UTC, date, datetime

import polars as pl
import pytest
from conftest import SHARED_ARCHIVE
from polars.testing import assert_frame_equal

from rltrader.data.bars import BarBuilder, bars_frame, build_bars
from rltrader.data.schema import AGG_TRADE_SCHEMA, BAR_SCHEMA, Market
from rltrader.data.store import trade_bars_frame

pytestmark = pytest.mark.usefixtures("shared_archive")  # reads the real shared data

ARCHIVE = SHARED_ARCHIVE  # missing data fails these tests (shared_archive fixture), they never skip
S = 1_000_000  # µs per second
T0 = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp()) * S


def trades(*rows: tuple[float, int, float, float, bool]) -> pl.DataFrame:
    """(seconds after T0, id, price, qty, is_buyer_maker) → AGG_TRADE_SCHEMA."""
    return pl.DataFrame(
        {
            "market": ["spot"] * len(rows), "symbol": ["BTCUSDT"] * len(rows),
            "agg_trade_id": [r[1] for r in rows], "price": [r[2] for r in rows], "quantity": [r[3] for r in rows],
            "first_trade_id": [r[1] for r in rows], "last_trade_id": [r[1] for r in rows],
            "transact_time": [T0 + int(r[0] * S) for r in rows], "is_buyer_maker": [r[4] for r in rows],
            "is_best_match": [True] * len(rows),
        },
        schema_overrides={"transact_time": pl.Int64},
    ).with_columns(pl.col("transact_time").cast(pl.Datetime("us", "UTC"))).cast(AGG_TRADE_SCHEMA)  # type: ignore[arg-type]


def test_matches_reference_on_real_trades() -> None:
    """In-order input: the non-empty bars are trade_bars_frame's (OHLC, counts exact; sums to float rounding)."""
    from rltrader.data.archive import ArchiveSource, load_file

    src = ArchiveSource(str(ARCHIVE))
    df = load_file(src, src.plan(Market.SPOT, "aggTrades", "BTCUSDT", None, date(2026, 1, 1), date(2026, 1, 1))[0]).rows
    for width in ("5s", "1m"):
        got, late = build_bars(df, width, allowed_lateness_us=2 * S)
        assert late == 0
        ref = trade_bars_frame(df, width)
        assert_frame_equal(got.filter(pl.col("trades") > 0), ref, rel_tol=1e-12, abs_tol=1e-12)
        exact = ["bucket", "open", "high", "low", "close", "trades"]
        assert_frame_equal(got.filter(pl.col("trades") > 0).select(exact), ref.select(exact), check_exact=True)


def test_trade_on_boundary_belongs_to_the_window_it_starts() -> None:
    df = trades((4.999999, 1, 10.0, 1.0, False), (5.0, 2, 11.0, 2.0, True), (9.999999, 3, 12.0, 1.0, True))
    got, _ = build_bars(df)
    assert got.select(pl.col("bucket").dt.epoch("us")).to_series().to_list() == [T0, T0 + 5 * S]
    assert got.get_column("trades").to_list() == [1, 2]
    second = got.row(1, named=True)
    assert (second["open"], second["high"], second["low"], second["close"]) == (11.0, 12.0, 11.0, 12.0)
    assert (second["volume"], second["quote_volume"], second["taker_buy_volume"]) == (3.0, 34.0, 0.0)
    assert_frame_equal(got, trade_bars_frame(df, "5s"))


def test_empty_windows_are_recorded_not_invented() -> None:
    got, _ = build_bars(trades((1.0, 1, 10.0, 1.0, False), (17.0, 2, 20.0, 1.0, False)))
    assert got.height == 4
    empty = got.filter(pl.col("trades") == 0)
    assert empty.height == 2
    assert empty.select(pl.col("open", "high", "low", "close").null_count()).row(0) == (2, 2, 2, 2)
    assert empty.select("volume", "quote_volume", "taker_buy_volume").sum().row(0) == (0.0, 0.0, 0.0)
    assert (got.get_column("bucket").diff().drop_nulls().dt.total_seconds() == 5).all()
    assert got.schema == pl.Schema(BAR_SCHEMA)


def test_out_of_order_within_lateness_is_merged_by_trade_id() -> None:
    """Arrival order 2, 1, 3: open/close still follow trade ids, as the reference does."""
    b = BarBuilder("spot", "BTCUSDT", "5s", allowed_lateness_us=2 * S)
    b.add(T0 + 2 * S, 2, 11.0, 1.0, True)
    b.add(T0 + 1 * S, 1, 10.0, 1.0, False)
    b.add(T0 + 6 * S, 3, 12.0, 1.0, True)
    assert b.drain() == []  # 6 s < 5 s + 2 s lateness: window 0 still open
    b.add(T0 + 4 * S, 4, 9.0, 1.0, True)  # late but within the allowance
    b.advance(T0 + 7 * S)
    (row,) = b.drain()
    assert row[2:] == (T0, 10.0, 11.0, 9.0, 9.0, 3.0, 30.0, 3, 1.0)
    assert b.late_trades == 0


def test_late_trade_after_emission_is_counted_not_merged() -> None:
    b = BarBuilder("spot", "BTCUSDT", "5s", allowed_lateness_us=1 * S)
    b.add(T0 + 1 * S, 1, 10.0, 1.0, False)
    b.advance(T0 + 6 * S)
    (row,) = b.drain()
    assert b.add(T0 + 3 * S, 2, 99.0, 5.0, False) is False
    assert b.late_trades == 1
    assert row[9] == 1 and row[4] == 10.0  # the emitted bar is untouched
    b.advance(T0 + 11 * S)
    (nxt,) = b.drain()
    assert nxt[2] == T0 + 5 * S and nxt[9] == 0  # the late trade did not leak into the next window


def test_clock_closes_windows_of_a_quiet_symbol_and_final_drain_keeps_the_open_window() -> None:
    b = BarBuilder("spot", "BTCUSDT", "5s", allowed_lateness_us=2 * S, start=T0)
    b.advance(T0 + 12 * S - 1)
    rows = b.drain()
    assert [(r[2], r[9]) for r in rows] == [(T0, 0)]  # [0,5) closed; [5,10) needs the watermark at 12 s
    b.advance(T0 + 12 * S)
    assert [r[2] for r in b.drain()] == [T0 + 5 * S]
    b.add(T0 + 13 * S, 1, 10.0, 1.0, False)
    assert [r[2] for r in b.drain(final=True)] == []  # [10,15) not ended by the watermark: never emitted partial
    b.advance(T0 + 15 * S)
    assert [(r[2], r[9]) for r in b.drain(final=True)] == [(T0 + 10 * S, 1)]


def test_start_must_be_aligned_and_frames_have_the_schema() -> None:
    with pytest.raises(ValueError, match="aligned"):
        BarBuilder("spot", "BTCUSDT", "5s", start=T0 + 1)
    assert bars_frame([]).schema == pl.Schema(BAR_SCHEMA)
