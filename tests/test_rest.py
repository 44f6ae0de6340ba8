"""REST gap repair through python-binance against the replay server: exactness, closed-only, retries, limits."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pytest
import requests
from binance.exceptions import BinanceAPIException
from conftest import SHARED_ARCHIVE, archive_rows
from polars.testing import assert_frame_equal

from rltrader.data.rest import (
    RestError,
    RestPolicy,
    fetch_agg_trades,
    fetch_agg_trades_async,
    fetch_klines,
    fetch_klines_async,
    make_async_client,
    make_client,
)
from rltrader.data.schema import AGG_TRADE_SCHEMA, KLINE_SCHEMA, Market
from rltrader.sim import RateLimit, ReplayClock, ReplayServer, run_in_thread

pytestmark = pytest.mark.usefixtures("shared_archive")  # reads the real shared data

ARCHIVE = SHARED_ARCHIVE  # missing data fails these tests (shared_archive fixture), they never skip

D0 = datetime(2020, 1, 1, tzinfo=UTC)
T0 = datetime(2026, 1, 1, tzinfo=UTC)
F0 = datetime(2022, 9, 5, tzinfo=UTC)


def replay(market: Market, start: datetime, clock_at: datetime, *, days: int = 1, **kw: Any) -> ReplayServer:
    return ReplayServer.from_archive(str(ARCHIVE), market, ["BTCUSDT"], start, start + timedelta(days=days),
                                     clock=ReplayClock(clock_at, 0, paused=True), **kw)


class Sleeps:
    """Records the waits the driver asks for; optionally really waits (for server-side windows to pass)."""

    def __init__(self, real: bool = False) -> None:
        self.calls: list[float] = []
        self.real = real

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        if self.real:
            time.sleep(seconds)


def test_fetch_klines_equals_archive_across_pages() -> None:
    expected = archive_rows(Market.SPOT, "klines", D0.date(), (D0 + timedelta(days=1)).date())
    with run_in_thread(replay(Market.SPOT, D0, D0 + timedelta(days=3))) as srv:
        client = make_client(Market.SPOT, srv.rest_base_url)
        got = fetch_klines(client, Market.SPOT, "btcusdt", "1m", D0, D0 + timedelta(days=2))
    assert got.schema == pl.Schema(KLINE_SCHEMA)
    assert got.height == 2880  # three pages of at most 1000
    assert_frame_equal(got, expected, check_exact=True)


def test_fetch_klines_futures_equals_archive() -> None:
    expected = archive_rows(Market.FUTURES_UM, "klines", F0.date(), (F0 + timedelta(days=1)).date())
    with run_in_thread(replay(Market.FUTURES_UM, F0, F0 + timedelta(days=2))) as srv:
        client = make_client(Market.FUTURES_UM, srv.rest_base_url)
        got = fetch_klines(client, "futures-um", "BTCUSDT", "1m", F0, F0 + timedelta(days=2))
    assert_frame_equal(got, expected, check_exact=True)


def test_fetch_klines_returns_only_closed_candles() -> None:
    now = D0 + timedelta(hours=10, minutes=30, seconds=30)
    expected = archive_rows(Market.SPOT, "klines", D0.date(), D0.date())
    with run_in_thread(replay(Market.SPOT, D0, now)) as srv:
        client = make_client(Market.SPOT, srv.rest_base_url)
        got = fetch_klines(client, Market.SPOT, "BTCUSDT", "1m", D0 + timedelta(hours=10))
        assert got["open_time"].to_list()[-1] == D0 + timedelta(hours=10, minutes=29)
        assert_frame_equal(got, expected.slice(600, 30), check_exact=True)
        srv.clock.advance(timedelta(seconds=30))  # the 10:30 candle closes
        got = fetch_klines(client, Market.SPOT, "BTCUSDT", "1m", D0 + timedelta(hours=10))
        assert_frame_equal(got, expected.slice(600, 31), check_exact=True)


def test_fetch_agg_trades_by_from_id_and_by_time() -> None:
    expected = archive_rows(Market.SPOT, "aggTrades", T0.date(), T0.date())
    first = int(expected["agg_trade_id"][0])
    with run_in_thread(replay(Market.SPOT, T0, T0 + timedelta(hours=2), days=0)) as srv:
        micro = make_client(Market.SPOT, srv.rest_base_url, time_unit="MICROSECOND")
        by_id = fetch_agg_trades(micro, Market.SPOT, "BTCUSDT", from_id=first)
        assert by_id.schema == pl.Schema(AGG_TRADE_SCHEMA)
        assert_frame_equal(by_id, expected, check_exact=True)  # all 5000, five pages, µs exact

        client = make_client(Market.SPOT, srv.rest_base_url)  # ms timestamps, as Binance answers by default
        start, end = T0 + timedelta(minutes=2), T0 + timedelta(minutes=7)
        by_time = fetch_agg_trades(client, Market.SPOT, "BTCUSDT", start, end)
        window = expected.with_columns(pl.col("transact_time").dt.truncate("1ms")).filter(
            pl.col("transact_time").is_between(start, end, closed="left"))
        assert by_time.height > 1000  # crosses page boundaries
        assert_frame_equal(by_time, window, check_exact=True)


def test_async_fetchers_match_sync() -> None:
    expected_k = archive_rows(Market.SPOT, "klines", D0.date(), D0.date())

    async def run(srv: ReplayServer) -> tuple[pl.DataFrame, pl.DataFrame]:
        client = await make_async_client(Market.SPOT, srv.rest_base_url, time_unit="MICROSECOND")
        try:
            k = await fetch_klines_async(client, Market.SPOT, "BTCUSDT", "1m", D0, D0 + timedelta(hours=20))
            t = await fetch_agg_trades_async(client, Market.SPOT, "BTCUSDT", T0, T0 + timedelta(minutes=3))
            return k, t
        finally:
            await client.close_connection()

    srv = ReplayServer.from_archive(str(ARCHIVE), Market.SPOT, ["BTCUSDT"], D0, D0,
                                    clock=ReplayClock(D0 + timedelta(days=1), 0, paused=True))
    async def main() -> tuple[pl.DataFrame, pl.DataFrame]:
        async with srv:
            return await run(srv)

    klines, trades = asyncio.run(main())
    assert_frame_equal(klines, expected_k.head(1200), check_exact=True)
    assert trades.is_empty()  # nothing that day in this replay

    expected_t = archive_rows(Market.SPOT, "aggTrades", T0.date(), T0.date())
    tsrv = replay(Market.SPOT, T0, T0 + timedelta(hours=1), days=0)

    async def main_t() -> pl.DataFrame:
        async with tsrv:
            client = await make_async_client(Market.SPOT, tsrv.rest_base_url, time_unit="MICROSECOND")
            try:
                return await fetch_agg_trades_async(client, Market.SPOT, "BTCUSDT",
                                                    from_id=int(expected_t["agg_trade_id"][0]))
            finally:
                await client.close_connection()

    assert_frame_equal(asyncio.run(main_t()), expected_t, check_exact=True)


def test_unknown_symbol_is_not_retried() -> None:
    sleeps = Sleeps()
    with run_in_thread(replay(Market.SPOT, D0, D0 + timedelta(hours=1))) as srv:
        client = make_client(Market.SPOT, srv.rest_base_url)
        with pytest.raises(RestError) as exc:
            fetch_klines(client, Market.SPOT, "NOPEUSDT", "1m", D0, sleep=sleeps)
    assert exc.value.code == -1121 and exc.value.status == 400
    assert "Invalid symbol" in str(exc.value) and sleeps.calls == []


def test_429_waits_retry_after_then_completes() -> None:
    expected = archive_rows(Market.SPOT, "klines", D0.date(), (D0 + timedelta(days=1)).date())
    sleeps = Sleeps(real=True)
    with run_in_thread(replay(Market.SPOT, D0, D0 + timedelta(days=3),
                              rate_limit=RateLimit(weight=6, window_s=1.0))) as srv:
        client = make_client(Market.SPOT, srv.rest_base_url)
        got = fetch_klines(client, Market.SPOT, "BTCUSDT", "1m", D0, D0 + timedelta(days=2), sleep=sleeps,
                           policy=RestPolicy(high_water=10.0))  # only the 429 path here
        assert srv.stats.rate_limited >= 1
    assert sleeps.calls and all(0 < s <= 1 for s in sleeps.calls)
    assert_frame_equal(got, expected, check_exact=True)


def test_high_used_weight_pauses_before_the_limit() -> None:
    sleeps = Sleeps()
    with run_in_thread(replay(Market.SPOT, D0, D0 + timedelta(days=3))) as srv:
        client = make_client(Market.SPOT, srv.rest_base_url)
        policy = RestPolicy(weight_limit=4, high_water=0.5, weight_window_s=1.0)
        got = fetch_klines(client, Market.SPOT, "BTCUSDT", "1m", D0, D0 + timedelta(days=2), policy=policy,
                           sleep=sleeps)
    assert got.height == 2880
    assert len(sleeps.calls) >= 3 and all(0 < s <= 1.5 for s in sleeps.calls)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connection_errors_back_off_then_raise() -> None:
    sleeps = Sleeps()
    client = make_client(Market.SPOT, f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(requests.ConnectionError):
        fetch_klines(client, Market.SPOT, "BTCUSDT", "1m", D0, sleep=sleeps,
                     policy=RestPolicy(max_retries=3, backoff_base_s=0.1))
    assert len(sleeps.calls) == 3
    assert sleeps.calls[0] <= 0.1 and sleeps.calls[2] <= 0.4 and sleeps.calls[2] > sleeps.calls[0] / 2


def test_server_errors_are_retried() -> None:
    expected = archive_rows(Market.SPOT, "klines", D0.date(), D0.date())
    sleeps = Sleeps()
    with run_in_thread(replay(Market.SPOT, D0, D0 + timedelta(days=1))) as srv:
        client = make_client(Market.SPOT, srv.rest_base_url)
        real: Callable[..., Any] = client.get_klines
        failures = [0]

        def flaky(**params: Any) -> Any:
            if failures[0] < 2:
                failures[0] += 1
                resp = requests.Response()
                resp.status_code = 503
                raise BinanceAPIException(resp, 503, '{"code":-1001,"msg":"Internal error; unable to process."}')
            return real(**params)

        client.get_klines = flaky  # type: ignore[method-assign]
        got = fetch_klines(client, Market.SPOT, "BTCUSDT", "1m", D0, D0 + timedelta(days=1), sleep=sleeps)
    assert len(sleeps.calls) == 2
    assert_frame_equal(got, expected, check_exact=True)


def test_clients_point_at_base_and_keep_secrets_out_of_logs(monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("BINANCE_API_KEY", "key-should-not-leak")
    monkeypatch.setenv("BINANCE_API_SECRET", "secret-should-not-leak")
    caplog.set_level(logging.DEBUG)
    with run_in_thread(replay(Market.SPOT, D0, D0 + timedelta(hours=1))) as srv:
        client = make_client(Market.SPOT, srv.rest_base_url)
        base = srv.rest_base_url
        urls = (client.API_URL, client.FUTURES_URL)
        assert urls == (f"{base}/api", f"{base}/fapi")
        assert client.API_KEY == "key-should-not-leak"
        fetch_klines(client, Market.SPOT, "BTCUSDT", "1m", D0)
        with pytest.raises(RestError):
            fetch_klines(client, Market.SPOT, "NOPE", "1m", D0)
    assert "should-not-leak" not in caplog.text
    monkeypatch.delenv("BINANCE_API_KEY")
    monkeypatch.delenv("BINANCE_API_SECRET")
    assert make_client(Market.SPOT).API_KEY is None
