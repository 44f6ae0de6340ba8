"""The replay server against python-binance's real clients: REST shapes, websockets, the clock, faults."""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pytest
import requests
from binance import AsyncClient
from binance.exceptions import BinanceAPIException, ReadLoopClosed
from conftest import SHARED_ARCHIVE, archive_rows
from polars.testing import assert_frame_equal

from rltrader.data.rest import make_async_client, make_client, make_socket_manager
from rltrader.data.schema import Market
from rltrader.sim import Faults, RateLimit, ReplayClock, ReplayServer, run_in_thread

pytestmark = pytest.mark.usefixtures("shared_archive")  # reads the real shared data

ARCHIVE = SHARED_ARCHIVE  # missing data fails these tests (shared_archive fixture), they never skip

D0 = datetime(2020, 1, 1, tzinfo=UTC)  # spot BTCUSDT 1m klines, no trades
T0 = datetime(2026, 1, 1, tzinfo=UTC)  # spot BTCUSDT aggTrades 00:00-00:12, no klines
F0 = datetime(2022, 9, 5, tzinfo=UTC)  # futures-um BTCUSDT 1m klines
KLINE_KEYS = {"t", "T", "s", "i", "f", "L", "o", "c", "h", "l", "v", "n", "x", "q", "V", "Q", "B"}


def server(market: Market, start: datetime, *, days: int = 1, clock_at: datetime | None = None,
           speed: float = 0.0, **kwargs: Any) -> ReplayServer:
    clock = ReplayClock(clock_at or start, speed, paused=clock_at is not None)
    return ReplayServer.from_archive(str(ARCHIVE), market, ["BTCUSDT"], start, start + timedelta(days=days),
                                     clock=clock, heartbeat_s=None, **kwargs)


def ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


# -- REST -----------------------------------------------------------------------------------------------------
def test_rest_klines_shape_paging_and_exact_values() -> None:
    """Raw /api/v3/klines pages (1000 max) reproduce the archive rows, in Binance's array-of-strings shape."""
    expected = archive_rows(Market.SPOT, "klines", D0.date(), (D0 + timedelta(days=1)).date())
    with run_in_thread(server(Market.SPOT, D0, clock_at=D0 + timedelta(days=2))) as srv:
        client = make_client(Market.SPOT, srv.rest_base_url)
        rows: list[list[Any]] = []
        cursor = ms(D0)
        while True:
            page = client.get_klines(symbol="BTCUSDT", interval="1m", startTime=cursor, limit=5000)
            assert len(page) <= 1000  # limit above the max is capped, as on Binance
            rows += page
            if len(page) < 1000:
                break
            cursor = page[-1][0] + 60_000
        assert int(client.response.headers["X-MBX-USED-WEIGHT-1m"]) == 2 * 3
    assert len(rows) == expected.height == 2880
    first = rows[0]
    assert isinstance(first[0], int) and isinstance(first[6], int) and isinstance(first[8], int)
    assert all(isinstance(first[i], str) for i in (1, 2, 3, 4, 5, 7, 9, 10, 11))
    assert first[1].count(".") == 1 and len(first[1].split(".")[1]) == 8  # spot prints 8 decimals
    got = pl.DataFrame({
        "open_time": [r[0] * 1000 for r in rows], "open": [float(r[1]) for r in rows],
        "high": [float(r[2]) for r in rows], "low": [float(r[3]) for r in rows],
        "close": [float(r[4]) for r in rows], "volume": [float(r[5]) for r in rows],
        "close_time": [r[6] * 1000 for r in rows], "quote_volume": [float(r[7]) for r in rows],
        "trades": [r[8] for r in rows], "taker_buy_volume": [float(r[9]) for r in rows],
        "taker_buy_quote_volume": [float(r[10]) for r in rows],
    })
    want = expected.select(
        pl.col("open_time").dt.epoch("us"), "open", "high", "low", "close", "volume",
        pl.col("close_time").dt.epoch("us"), "quote_volume", "trades", "taker_buy_volume", "taker_buy_quote_volume",
    )
    assert_frame_equal(got, want, check_exact=True)


def test_rest_without_start_returns_most_recent_and_in_progress_candle() -> None:
    now = D0 + timedelta(hours=10, minutes=30, seconds=50)
    with run_in_thread(server(Market.SPOT, D0, clock_at=now)) as srv:
        client = make_client(Market.SPOT, srv.rest_base_url)
        assert client.get_server_time() == {"serverTime": ms(now)}
        page = client.get_klines(symbol="BTCUSDT", interval="1m", limit=3)
        assert [r[0] for r in page] == [ms(now.replace(second=0)) - 120_000 + i * 60_000 for i in range(3)]
        # the last candle is still open: the archive's final values are not revealed yet
        final = archive_rows(Market.SPOT, "klines", D0.date(), D0.date()).row(10 * 60 + 30, named=True)
        assert page[-1][6] > ms(now)
        assert float(page[-1][5]) < final["volume"]
        assert float(page[-1][2]) <= final["high"] and float(page[-1][3]) >= final["low"]
        assert float(page[-1][1]) == final["open"]
        srv.clock.advance(timedelta(seconds=10))  # 10:31:00 - the 10:30 candle closed
        closed = client.get_klines(symbol="BTCUSDT", interval="1m", startTime=page[-1][0], limit=1)[0]
        assert float(closed[5]) == final["volume"] and float(closed[2]) == final["high"]
        later = client.get_klines(symbol="BTCUSDT", interval="1m", startTime=ms(now) + 3_600_000)
        assert later == []  # the future is hidden


def test_rest_agg_trades_paging_and_shape() -> None:
    expected = archive_rows(Market.SPOT, "aggTrades", T0.date(), T0.date())
    with run_in_thread(server(Market.SPOT, T0, days=0, clock_at=T0 + timedelta(hours=1))) as srv:
        client = make_client(Market.SPOT, srv.rest_base_url, time_unit="MICROSECOND")
        first_id = int(expected["agg_trade_id"][0])
        got: list[dict[str, Any]] = []
        from_id = first_id
        while page := client.get_aggregate_trades(symbol="BTCUSDT", fromId=from_id, limit=1000):
            got += page
            from_id = page[-1]["a"] + 1
        assert set(got[0]) == {"a", "p", "q", "f", "l", "T", "m", "M"}
        assert [t["a"] for t in got] == expected["agg_trade_id"].to_list()
        assert [t["T"] for t in got] == expected.select(pl.col("transact_time").dt.epoch("us")).to_series().to_list()
        assert [float(t["p"]) for t in got] == expected["price"].to_list()
        assert [float(t["q"]) for t in got] == expected["quantity"].to_list()
        assert [t["m"] for t in got] == expected["is_buyer_maker"].to_list()
        # time window: inclusive bounds, in ms for a default client
        ms_client = make_client(Market.SPOT, srv.rest_base_url)
        window = ms_client.get_aggregate_trades(symbol="BTCUSDT", startTime=ms(T0) + 60_000,
                                                endTime=ms(T0) + 119_999, limit=1000)
        t_ms = expected.select(pl.col("transact_time").dt.epoch("ms")).to_series()
        assert len(window) == int(((t_ms >= ms(T0) + 60_000) & (t_ms <= ms(T0) + 119_999)).sum())
        assert all(ms(T0) + 60_000 <= t["T"] < ms(T0) + 120_000 for t in window)
        with pytest.raises(BinanceAPIException) as exc:
            ms_client.get_aggregate_trades(symbol="BTCUSDT", startTime=ms(T0), endTime=ms(T0) + 3_600_000)
        assert exc.value.code == -1127


def test_rest_clock_hides_trades_not_yet_made() -> None:
    with run_in_thread(server(Market.SPOT, T0, days=0, clock_at=T0 + timedelta(minutes=1))) as srv:
        client = make_client(Market.SPOT, srv.rest_base_url)
        recent = client.get_aggregate_trades(symbol="BTCUSDT", limit=1000)
        assert recent and all(t["T"] <= ms(T0) + 60_000 for t in recent)
        srv.clock.advance(timedelta(minutes=1))
        newer = client.get_aggregate_trades(symbol="BTCUSDT", limit=1000)
        assert newer[-1]["a"] > recent[-1]["a"]


def test_rest_errors_are_binance_errors() -> None:
    with run_in_thread(server(Market.SPOT, D0, clock_at=D0 + timedelta(hours=1))) as srv:
        client = make_client(Market.SPOT, srv.rest_base_url)
        cases: list[tuple[dict[str, Any], int, str | None]] = [
            ({"symbol": "NOPEUSDT", "interval": "1m"}, -1121, "Invalid symbol."),
            ({"interval": "1m"}, -1102, None),
            ({"symbol": "BTCUSDT", "interval": "7m"}, -1120, "Invalid interval."),
            ({"symbol": "BTCUSDT", "interval": "1m", "limit": "abc"}, -1100, None),
            ({"symbol": "BTCUSDT", "interval": "1m", "startTime": 2, "endTime": 1}, -1023, None),
        ]
        for params, code, msg in cases:
            with pytest.raises(BinanceAPIException) as exc:
                client.get_klines(**params)
            assert exc.value.status_code == 400 and exc.value.code == code
            if msg:
                assert exc.value.message == msg
        resp = requests.get(f"{srv.rest_base_url}/api/v3/aggTrades", params={"symbol": "ETHBTC"}, timeout=5)
        assert resp.status_code == 400 and resp.json() == {"code": -1121, "msg": "Invalid symbol."}


def test_rate_limit_answers_429_with_retry_after() -> None:
    with run_in_thread(server(Market.SPOT, D0, clock_at=D0 + timedelta(hours=1),
                              rate_limit=RateLimit(weight=6, window_s=2))) as srv:
        client = make_client(Market.SPOT, srv.rest_base_url)
        for _ in range(3):
            client.get_klines(symbol="BTCUSDT", interval="1m", limit=1)  # weight 2 each
        with pytest.raises(BinanceAPIException) as exc:
            client.get_klines(symbol="BTCUSDT", interval="1m", limit=1)
        assert exc.value.status_code == 429 and exc.value.code == -1003
        assert 1 <= int(exc.value.response.headers["Retry-After"]) <= 2
        assert int(exc.value.response.headers["X-MBX-USED-WEIGHT-1m"]) == 8
        assert srv.stats.rate_limited == 1


def test_exchange_info_symbols_and_filters() -> None:
    with run_in_thread(server(Market.FUTURES_UM, F0, days=0, clock_at=F0 + timedelta(hours=1))) as srv:
        client = make_client(Market.FUTURES_UM, srv.rest_base_url)
        info = client.futures_exchange_info()
        (sym,) = info["symbols"]
        assert sym["symbol"] == "BTCUSDT" and sym["baseAsset"] == "BTC" and sym["quoteAsset"] == "USDT"
        assert sym["status"] == "TRADING" and sym["contractType"] == "PERPETUAL"
        filters = {f["filterType"]: f for f in sym["filters"]}
        assert {"PRICE_FILTER", "LOT_SIZE", "MIN_NOTIONAL"} <= set(filters)
        tick = float(filters["PRICE_FILTER"]["tickSize"])
        assert tick == 10.0 ** -sym["pricePrecision"]
        closes = archive_rows(Market.FUTURES_UM, "klines", F0.date(), F0.date())["close"]
        off_grid = float(((closes / tick).round(0) * tick - closes).abs().max())  # type: ignore[arg-type]
        assert off_grid < tick / 1000  # prices sit on the tick grid
        assert client.futures_time()["serverTime"] == ms(F0 + timedelta(hours=1))
    with run_in_thread(server(Market.SPOT, D0, clock_at=D0)) as srv:
        spot = make_client(Market.SPOT, srv.rest_base_url).get_exchange_info()
        filters = {f["filterType"]: f for f in spot["symbols"][0]["filters"]}
        assert filters["PRICE_FILTER"]["tickSize"] == "0.01000000"
        assert {"LOT_SIZE", "NOTIONAL"} <= set(filters)


# -- websockets ---------------------------------------------------------------------------------------------
async def _collect(sock: Any, n: int, *, until: Any = None, timeout: float = 20.0) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        try:
            msg = await asyncio.wait_for(sock.recv(), timeout=max(0.1, deadline - time.monotonic()))
        except ReadLoopClosed as exc:
            out.append({"e": "error", "type": "ReadLoopClosed", "m": str(exc)})
            break
        out.append(msg)
        if until is not None and until(msg):
            break
    return out


def test_ws_spot_multiplex_klines_final_equal_archive() -> None:
    expected = archive_rows(Market.SPOT, "klines", D0.date(), D0.date())

    async def run() -> list[dict[str, Any]]:
        async with server(Market.SPOT, D0, speed=0) as srv:
            client = await make_async_client(Market.SPOT, srv.rest_base_url)
            try:
                bm = make_socket_manager(client, srv.ws_base_url)
                async with bm.multiplex_socket(["btcusdt@kline_1m"]) as sock:
                    return await _collect(sock, 3 * 30)
            finally:
                await client.close_connection()

    msgs = asyncio.run(run())
    assert all(m["stream"] == "btcusdt@kline_1m" for m in msgs)
    data = [m["data"] for m in msgs]
    assert all(d["e"] == "kline" and d["s"] == "BTCUSDT" and set(d["k"]) == KLINE_KEYS for d in data)
    assert [d["E"] for d in data] == sorted(d["E"] for d in data)
    finals = [d["k"] for d in data if d["k"]["x"]]
    partials = [d for d in data if not d["k"]["x"]]
    assert len(finals) == 30 and len(partials) == 60  # two in-progress updates per candle without trades
    for k in finals:
        row = expected.row(int((k["t"] - ms(D0)) // 60_000), named=True)
        assert k["t"] * 1000 == row["open_time"].timestamp() * 1_000_000
        assert (float(k["o"]), float(k["h"]), float(k["l"]), float(k["c"])) == (
            row["open"], row["high"], row["low"], row["close"])
        assert (float(k["v"]), float(k["q"]), k["n"], float(k["V"]), float(k["Q"])) == (
            row["volume"], row["quote_volume"], row["trades"], row["taker_buy_volume"],
            row["taker_buy_quote_volume"])
    for d in partials:  # in-progress candles are consistent with their final
        k = d["k"]
        row = expected.row(int((k["t"] - ms(D0)) // 60_000), named=True)
        assert float(k["h"]) <= row["high"] and float(k["l"]) >= row["low"]
        assert float(k["h"]) >= max(float(k["o"]), float(k["c"])) and float(k["v"]) <= row["volume"]
        assert k["t"] <= d["E"] <= k["T"]


def test_ws_agg_trades_and_klines_built_from_trades() -> None:
    trades = archive_rows(Market.SPOT, "aggTrades", T0.date(), T0.date())

    async def run() -> list[dict[str, Any]]:
        async with server(Market.SPOT, T0, days=0, speed=0) as srv:
            client = await make_async_client(Market.SPOT, srv.rest_base_url)
            try:
                bm = make_socket_manager(client, srv.ws_base_url)
                async with bm.multiplex_socket(["btcusdt@aggTrade", "btcusdt@kline_1m"]) as sock:
                    return await _collect(sock, 100_000, until=lambda m: m["data"]["k"]["t"] >= ms(T0) + 120_000
                                          if m["data"]["e"] == "kline" and m["data"]["k"]["x"] else False)
            finally:
                await client.close_connection()

    msgs = asyncio.run(run())
    events = [m["data"]["E"] for m in msgs]
    assert events == sorted(events)  # one time line across streams
    agg = [m["data"] for m in msgs if m["stream"] == "btcusdt@aggTrade"]
    assert set(agg[0]) == {"e", "E", "s", "a", "p", "q", "f", "l", "T", "m", "M"}
    n = len(agg)
    head = trades.head(n)
    assert [t["a"] for t in agg] == head["agg_trade_id"].to_list()
    assert [float(t["p"]) for t in agg] == head["price"].to_list()
    assert [t["T"] for t in agg] == head.select(pl.col("transact_time").dt.epoch("ms")).to_series().to_list()
    finals = [m["data"]["k"] for m in msgs if m["stream"] == "btcusdt@kline_1m" and m["data"]["k"]["x"]]
    assert [k["t"] for k in finals] == [ms(T0), ms(T0) + 60_000, ms(T0) + 120_000]
    for k in finals:
        inside = trades.filter(pl.col("transact_time").dt.epoch("ms").is_between(k["t"], k["T"]))
        assert float(k["o"]) == inside["price"][0] and float(k["c"]) == inside["price"][-1]
        assert float(k["h"]) == inside["price"].max() and float(k["l"]) == inside["price"].min()
        assert float(k["v"]) == pytest.approx(inside["quantity"].sum(), abs=1e-8)
        assert k["f"] == inside["first_trade_id"][0] and k["L"] == inside["last_trade_id"][-1]
        assert k["n"] == int((inside["last_trade_id"] - inside["first_trade_id"] + 1).sum())
    partial = [m["data"] for m in msgs if m["stream"] == "btcusdt@kline_1m" and not m["data"]["k"]["x"]]
    assert len(partial) > 10  # updates every 2 s from the trades inside the candle
    assert all(p["E"] - p["k"]["t"] <= 60_000 and (p["E"] - p["k"]["t"]) % 2000 == 0 for p in partial)


def test_ws_futures_multiplex_and_raw_stream() -> None:
    expected = archive_rows(Market.FUTURES_UM, "klines", F0.date(), F0.date())

    async def run() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        async with server(Market.FUTURES_UM, F0, days=0, speed=0) as srv:
            client = await make_async_client(Market.FUTURES_UM, srv.rest_base_url)
            try:
                bm = make_socket_manager(client, srv.ws_base_url)
                async with bm.futures_multiplex_socket(["btcusdt@kline_1m"]) as sock:
                    combined = await _collect(sock, 30)
            finally:
                await client.close_connection()
        # a fresh replay: in fast mode the first connection may have pushed the clock to the end of the data
        async with server(Market.FUTURES_UM, F0, days=0, speed=0) as srv:
            client = await make_async_client(Market.FUTURES_UM, srv.rest_base_url)
            try:
                bm = make_socket_manager(client, srv.ws_base_url)
                async with bm.kline_futures_socket("btcusdt") as raw_sock:  # /market/ws/<stream>: unwrapped
                    raw = await _collect(raw_sock, 3)
            finally:
                await client.close_connection()
        return combined, raw

    combined, raw = asyncio.run(run())
    assert all(m["stream"] == "btcusdt@kline_1m" for m in combined)
    finals = [m["data"]["k"] for m in combined if m["data"]["k"]["x"]]
    assert len(finals) == 10
    for k in finals:
        row = expected.row(int((k["t"] - ms(F0)) // 60_000), named=True)
        assert (float(k["o"]), float(k["c"]), float(k["v"]), k["n"]) == (
            row["open"], row["close"], row["volume"], row["trades"])
    assert all(m["e"] == "continuous_kline" and m["ps"] == "BTCUSDT" and m["ct"] == "PERPETUAL" for m in raw)
    assert all(set(m["k"]) == KLINE_KEYS - {"s"} for m in raw)


# -- faults ---------------------------------------------------------------------------------------------------
def test_fault_drop_then_reconnect_resumes_from_clock() -> None:
    """A dropped client reconnects (python-binance does it itself) and gets data from the clock's position:
    what happened meanwhile is lost, as on the real exchange.

    The clock is stepped so that the client has read all 20 messages before the 21st comes due, which is when
    the connection breaks: had the break followed the 20th write at once, python-binance would have discarded
    whatever it had not yet read, a number that depends on how loaded the machine is."""
    trades = archive_rows(Market.SPOT, "aggTrades", T0.date(), T0.date())
    t_ms = trades.select(pl.col("transact_time").dt.epoch("ms")).to_series().to_list()
    assert ms(T0) <= t_ms[0] and t_ms[19] < t_ms[20]  # the 21st trade comes due strictly after the 20th

    async def run() -> tuple[list[dict[str, Any]], ReplayServer]:
        first_trade = datetime.fromtimestamp(t_ms[0] / 1000, tz=UTC)
        srv = server(Market.SPOT, T0, days=0, clock_at=first_trade, speed=60.0, faults=Faults(drop_after=20))
        async with srv:
            client = await make_async_client(Market.SPOT, srv.rest_base_url)
            try:
                bm = make_socket_manager(client, srv.ws_base_url)
                async with bm.multiplex_socket(["btcusdt@aggTrade"]) as sock:
                    first = await _collect(sock, 1)  # the sender has started at the (paused) clock
                    srv.clock.advance_to(t_ms[19])  # exactly 20 trades are due
                    first += await _collect(sock, 19)
                    srv.clock.resume()  # market time runs on: the 21st trade comes due, the connection breaks
                    first += await _collect(sock, 1)
                    srv.set_faults(Faults())
                    rest = await _collect(sock, 5, timeout=15)
                    return first + rest, srv
            finally:
                await client.close_connection()

    msgs, srv = asyncio.run(run())
    data = [m for m in msgs if m.get("e") != "error"]
    errors = [m for m in msgs if m.get("e") == "error"]
    assert len(data[:20]) == 20 and msgs[20]["e"] == "error"  # the drop is reported right after message 20
    assert errors and all(e["type"] in ("ConnectionClosedError", "ConnectionClosedOK", "BinanceWebsocketClosed")
                          for e in errors)
    ids = [m["data"]["a"] for m in data]
    assert ids[:20] == list(range(ids[0], ids[0] + 20))
    assert ids[20] > ids[19] + 1  # trades made while disconnected never arrive
    assert srv.stats.drops == 1 and srv.stats.connections == 2


def test_fault_stall_keeps_socket_open_but_silent() -> None:
    async def run() -> list[tuple[float, dict[str, Any]]]:
        async with server(Market.SPOT, T0, days=0, speed=0,
                          faults=Faults(stall_after=3, stall_seconds=1.5)) as srv:
            client = await make_async_client(Market.SPOT, srv.rest_base_url)
            try:
                bm = make_socket_manager(client, srv.ws_base_url)
                async with bm.multiplex_socket(["btcusdt@aggTrade"]) as sock:
                    out = []
                    for _ in range(6):
                        msg = await sock.recv()
                        out.append((time.monotonic(), msg))
                    assert srv.stats.stalls == 1 and srv.stats.connections == 1
                    return out
            finally:
                await client.close_connection()

    got = asyncio.run(run())
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(got)]
    assert gaps[2] >= 1.4 and max(gaps[:2] + gaps[3:]) < 1.0  # margins for a loaded 2-core machine
    assert all(m["data"]["e"] == "aggTrade" for _, m in got)  # no error: the connection stayed up


@pytest.mark.parametrize("kind", ["not_json", "bad_shape"])
def test_fault_malformed_frames(kind: str) -> None:
    async def run() -> list[dict[str, Any]]:
        async with server(Market.SPOT, D0, speed=0,
                          faults=Faults(malformed_every=4, malformed_kind=kind)) as srv:  # type: ignore[arg-type]
            client = await make_async_client(Market.SPOT, srv.rest_base_url)
            try:
                bm = make_socket_manager(client, srv.ws_base_url)
                async with bm.multiplex_socket(["btcusdt@kline_1m"]) as sock:
                    return await _collect(sock, 5, timeout=5)
            finally:
                await client.close_connection()

    msgs = asyncio.run(run())
    if kind == "not_json":
        assert all(m["data"]["e"] == "kline" for m in msgs[:-1]) and len(msgs) <= 5
        # python-binance ends its read loop on an undecodable frame: the consumer gets the error event or,
        # when the loop has already gone, ReadLoopClosed (turned into a marker by _collect)
        assert msgs[-1]["e"] == "error"
        assert "JSONDecodeError" in msgs[-1]["type"] or msgs[-1]["type"] == "ReadLoopClosed"
    else:
        assert all(m["data"]["e"] == "kline" and isinstance(m["data"]["k"], dict) for m in msgs[:4])
        assert msgs[4]["stream"] == "btcusdt@kline_1m" and msgs[4]["data"]["k"] == "?"


def test_faults_and_clock_via_admin_endpoints() -> None:
    with run_in_thread(server(Market.SPOT, D0, clock_at=D0)) as srv:
        base = srv.rest_base_url
        resp = requests.post(f"{base}/_replay/faults", json={"drop_after": 7, "stall_seconds": 0.5}, timeout=5)
        assert resp.status_code == 200 and srv.faults == Faults(drop_after=7, stall_seconds=0.5)
        assert requests.post(f"{base}/_replay/faults", json={"drop_after": -1}, timeout=5).status_code == 400
        assert requests.post(f"{base}/_replay/faults", json={"bogus": 1}, timeout=5).status_code == 400
        requests.post(f"{base}/_replay/faults", json={"reset": True}, timeout=5)
        assert srv.faults == Faults()
        status = requests.post(f"{base}/_replay/clock", json={"advance_s": 90}, timeout=5).json()
        assert status["now"] == ms(D0) + 90_000 and status["paused"] is True
        assert make_client(Market.SPOT, base).get_server_time()["serverTime"] == ms(D0) + 90_000


# -- clock ----------------------------------------------------------------------------------------------------
def test_clock_scaled_paused_and_monotonic() -> None:
    fake = [100.0]
    clock = ReplayClock(D0, 60.0, monotonic=lambda: fake[0])
    fake[0] += 2.0
    assert clock.now_ms() == ms(D0) + 120_000
    clock.pause()
    fake[0] += 10.0
    assert clock.now_ms() == ms(D0) + 120_000
    clock.advance_to(D0)  # never backwards
    assert clock.now_ms() == ms(D0) + 120_000
    clock.resume()
    clock.set_speed(600.0)
    fake[0] += 1.0
    assert clock.now_ms() == ms(D0) + 720_000
    fast = ReplayClock(D0, 0)
    asyncio.run(fast.wait_until(ms(D0) + 5_000))  # fast mode: waiting moves the clock
    assert fast.now_ms() == ms(D0) + 5_000 and fast.fast
    with pytest.raises(ValueError):
        ReplayClock(D0, -1)


def test_async_client_create_pings_the_replay() -> None:
    async def run() -> int:
        async with server(Market.SPOT, D0, speed=0) as srv:
            client: AsyncClient = await make_async_client(Market.SPOT, srv.rest_base_url)
            try:
                return int(srv.stats.requests)
            finally:
                await client.close_connection()

    assert asyncio.run(run()) >= 2  # ping + time
