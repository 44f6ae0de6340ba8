"""The replay server as a fake exchange, driven by python-binance's real Client: signing, fills equal to the
execution kernel's on the same bar, client order ids, positions and balances, filters, faults."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import polars as pl
import pytest
import requests
from binance import Client
from binance.exceptions import BinanceAPIException
from conftest import SHARED_ARCHIVE

from rltrader.data.archive import ArchiveSource, load_file
from rltrader.data.rest import make_client
from rltrader.data.schema import Market
from rltrader.execution import AVG_ENTRY, CASH, FEES, QTY, Accounts, fill_price, market_order
from rltrader.sim import ReplayClock, ReplayServer, default_params, hmac_sha256, run_in_thread
from rltrader.sim.signing import total_params

# Binance's documented SIGNED-endpoint example (spot API docs, "SIGNED Endpoint security"); the key pair is
# published there for illustration only.
DOC_KEY = "vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A"
DOC_SECRET = "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j"
DOC_QUERY = ("symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1&recvWindow=5000"
             "&timestamp=1499827319559")

D0 = datetime(2020, 1, 1, tzinfo=UTC)  # spot BTCUSDT 1m klines
F0 = datetime(2022, 9, 5, tzinfo=UTC)  # futures-um BTCUSDT 1m klines
N0 = datetime(2025, 4, 10, tzinfo=UTC)  # futures-um NEARUSDT (monthly file only): price ≈ 2.5, step 1


def bars(market: Market, symbol: str, day: date) -> pl.DataFrame:
    """The archive's candles, read independently of the server."""
    src = ArchiveSource(str(SHARED_ARCHIVE))
    files = src.plan(market, "klines", symbol, "1m", day, day)
    rows = pl.concat([load_file(src, f).rows for f in files])
    lo = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return rows.filter((pl.col("open_time") >= lo) & (pl.col("open_time") < lo + timedelta(days=1)))


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BINANCE_API_KEY", DOC_KEY)
    monkeypatch.setenv("BINANCE_API_SECRET", DOC_SECRET)


def exchange(market: Market, start: datetime, clock_at: datetime, symbol: str = "BTCUSDT",
             **kwargs: Any) -> ReplayServer:
    clock = ReplayClock(clock_at, 0.0, paused=True)
    return ReplayServer.from_archive(str(SHARED_ARCHIVE), market, [symbol], start, start, clock=clock,
                                     heartbeat_s=None, api_keys={DOC_KEY: DOC_SECRET}, **kwargs)


@pytest.fixture
def spot(keys: None) -> Iterator[tuple[ReplayServer, Client]]:
    with run_in_thread(exchange(Market.SPOT, D0, D0 + timedelta(hours=10, seconds=30))) as srv:
        yield srv, make_client(Market.SPOT, srv.rest_base_url)


@pytest.fixture
def futures(keys: None) -> Iterator[tuple[ReplayServer, Client]]:
    with run_in_thread(exchange(Market.FUTURES_UM, F0, F0 + timedelta(hours=1, seconds=30))) as srv:
        yield srv, make_client(Market.FUTURES_UM, srv.rest_base_url)


def code_of(exc: pytest.ExceptionInfo[BinanceAPIException]) -> int:
    return int(exc.value.code)


class Kernel:
    """The execution kernel called directly: what the exchange must reproduce fill for fill."""

    def __init__(self, market: Market) -> None:
        self.xp = default_params(market).to_array()
        self.acct = Accounts(1, default_params(market).initial_cash).state

    def order(self, dq: float, bar: dict[str, Any]) -> tuple[float, float]:
        fees0 = self.acct[FEES, 0]
        filled = market_order(self.acct, 0, dq, bar["open"], bar["volume"], self.xp)
        assert filled == dq
        px = fill_price(bar["open"], 1.0 if dq > 0 else -1.0, abs(dq), bar["volume"], self.xp)
        return px, float(self.acct[FEES, 0] - fees0)


# -- signing -----------------------------------------------------------------------------------------------------
def test_signature_matches_binance_documented_examples() -> None:
    assert hmac_sha256(DOC_SECRET, DOC_QUERY) == "c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71"
    # Example 3: part in the query string, part in the body: signed concatenated, without "&" between
    payload, sig = total_params("symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC",
                                "quantity=1&price=0.1&recvWindow=5000&timestamp=1499827319559&signature=abc")
    assert sig == "abc"
    assert hmac_sha256(DOC_SECRET, payload) == "0fd168b8ddb4876a0358a8d14d0c9f3da0e9b20c5d52b2a00fcf7d1c602f9a77"


def test_bad_signature_timestamp_and_key_are_refused(spot: tuple[ReplayServer, Client]) -> None:
    srv, client = spot
    wrong = type(client)(DOC_KEY, DOC_SECRET + "x", ping=False)
    with pytest.raises(BinanceAPIException) as exc:
        wrong.get_account()
    assert code_of(exc) == -1022 and exc.value.message == "Signature for this request is not valid."
    client.REQUEST_RECVWINDOW = 5000  # python-binance sends 10000; Binance's default is 5000
    client.timestamp_offset = -6000  # older than the recvWindow
    with pytest.raises(BinanceAPIException) as exc:
        client.get_account()
    assert code_of(exc) == -1021 and "outside of the recvWindow" in exc.value.message
    client.timestamp_offset = 2000
    with pytest.raises(BinanceAPIException) as exc:
        client.get_account()
    assert code_of(exc) == -1021 and "ahead of the server's time" in exc.value.message
    client.timestamp_offset = 0
    # a raw request signed by hand, exactly as the docs describe, is accepted; an unknown key is not
    ts = int(time.time() * 1000)
    query = f"timestamp={ts}&recvWindow=5000"
    url = f"{srv.rest_base_url}/api/v3/account?{query}&signature={hmac_sha256(DOC_SECRET, query)}"
    assert requests.get(url, headers={"X-MBX-APIKEY": DOC_KEY}, timeout=10).status_code == 200
    r = requests.get(url, headers={"X-MBX-APIKEY": "other"}, timeout=10)
    assert r.status_code == 401 and r.json()["code"] == -2015
    assert requests.get(url, timeout=10).json()["code"] == -2014


# -- fills equal the kernel's ----------------------------------------------------------------------------------------
def test_spot_market_orders_fill_at_the_kernels_price_and_fee(spot: tuple[ReplayServer, Client]) -> None:
    srv, client = spot
    day = bars(Market.SPOT, "BTCUSDT", D0.date()).to_dicts()
    kernel = Kernel(Market.SPOT)
    buy = client.create_order(symbol="BTCUSDT", side="BUY", type="MARKET", quantity="0.05")
    px, fee = kernel.order(0.05, day[600])  # the clock is 30 s into bar 600: it fills at that bar's open
    assert buy["status"] == "FILLED" and float(buy["fills"][0]["price"]) == px
    assert float(buy["fills"][0]["commission"]) == fee and buy["fills"][0]["commissionAsset"] == "USDT"
    assert px > day[600]["open"]  # a buy pays the spread and the impact
    srv.clock.advance(timedelta(minutes=5))
    sell = client.create_order(symbol="BTCUSDT", side="SELL", type="MARKET", quantity="0.02",
                               newOrderRespType="RESULT")
    px2, _ = kernel.order(-0.02, day[605])
    assert float(sell["cummulativeQuoteQty"]) == pytest.approx(0.02 * px2, rel=1e-12)
    got = client.get_order(symbol="BTCUSDT", orderId=sell["orderId"])
    assert got["status"] == "FILLED" and got["executedQty"] == "0.020000"
    balances = {b["asset"]: float(b["free"]) for b in client.get_account()["balances"]}
    assert balances["USDT"] == pytest.approx(kernel.acct[CASH, 0], abs=1e-8)
    assert balances["BTC"] == pytest.approx(kernel.acct[QTY, 0], abs=1e-8)
    assert client.get_open_orders(symbol="BTCUSDT") == []


def test_futures_market_orders_positions_and_balances(futures: tuple[ReplayServer, Client]) -> None:
    srv, client = futures
    day = bars(Market.FUTURES_UM, "BTCUSDT", F0.date()).to_dicts()
    kernel = Kernel(Market.FUTURES_UM)
    o1 = client.futures_create_order(symbol="BTCUSDT", side="BUY", type="MARKET", quantity="0.010")
    px1, _ = kernel.order(0.01, day[60])
    assert o1["status"] == "FILLED" and float(o1["avgPrice"]) == px1
    srv.clock.advance(timedelta(minutes=30))
    o2 = client.futures_create_order(symbol="BTCUSDT", side="SELL", type="MARKET", quantity="0.030")
    px2, _ = kernel.order(-0.03, day[90])  # flips to a short of 0.02
    assert float(client.futures_get_order(symbol="BTCUSDT", orderId=o2["orderId"])["avgPrice"]) == px2
    (pos,) = client.futures_position_information(symbol="BTCUSDT")
    assert float(pos["positionAmt"]) == pytest.approx(-0.02) and float(pos["entryPrice"]) == kernel.acct[AVG_ENTRY, 0]
    wallet = kernel.acct[CASH, 0] + kernel.acct[QTY, 0] * kernel.acct[AVG_ENTRY, 0]
    (bal,) = client.futures_account_balance()
    assert bal["asset"] == "USDT" and float(bal["balance"]) == pytest.approx(wallet, abs=1e-9)
    account = client.futures_account()
    assert float(account["totalWalletBalance"]) == pytest.approx(wallet, abs=1e-9)
    assert float(account["totalUnrealizedProfit"]) == pytest.approx(float(pos["unRealizedProfit"]))
    # leverage: 1x (the execution default) cannot open 0.6 BTC (~12k USDT) on 10k; 3x can
    with pytest.raises(BinanceAPIException) as exc:
        client.futures_create_order(symbol="BTCUSDT", side="SELL", type="MARKET", quantity="0.600")
    assert code_of(exc) == -2019 and exc.value.message == "Margin is insufficient."
    assert client.futures_change_leverage(symbol="BTCUSDT", leverage=3)["leverage"] == 3
    assert client.futures_create_order(symbol="BTCUSDT", side="SELL", type="MARKET",
                                       quantity="0.600")["status"] == "FILLED"
    with pytest.raises(BinanceAPIException) as exc:
        client.futures_change_leverage(symbol="BTCUSDT", leverage=0)
    assert code_of(exc) == -4028


# -- client order ids ------------------------------------------------------------------------------------------
def test_futures_client_order_ids(keys: None) -> None:
    # The clock stands one minute before the data: an order waits (NEW) for the first bar's open.
    with run_in_thread(exchange(Market.FUTURES_UM, F0, F0 - timedelta(minutes=1))) as srv:
        client = make_client(Market.FUTURES_UM, srv.rest_base_url)
        first = client.futures_create_order(symbol="BTCUSDT", side="BUY", type="MARKET", quantity="0.010",
                                            newClientOrderId="a.B:c/1_x-2")
        assert first["status"] == "NEW"
        assert [o["clientOrderId"] for o in client.futures_get_open_orders(symbol="BTCUSDT")] == ["a.B:c/1_x-2"]
        with pytest.raises(BinanceAPIException) as exc:
            client.futures_create_order(symbol="BTCUSDT", side="BUY", type="MARKET", quantity="0.010",
                                        newClientOrderId="a.B:c/1_x-2")
        assert code_of(exc) == -4116
        with pytest.raises(BinanceAPIException) as exc:
            client.futures_create_order(symbol="BTCUSDT", side="BUY", type="MARKET", quantity="0.010",
                                        newClientOrderId="no spaces allowed")
        assert code_of(exc) == -4015
        srv.clock.advance_to(F0 + timedelta(seconds=1))
        got = client.futures_get_order(symbol="BTCUSDT", origClientOrderId="a.B:c/1_x-2")
        kernel = Kernel(Market.FUTURES_UM)
        px, _ = kernel.order(0.01, bars(Market.FUTURES_UM, "BTCUSDT", F0.date()).row(0, named=True))
        assert got["status"] == "FILLED" and float(got["avgPrice"]) == px and got["updateTime"] == int(
            F0.timestamp() * 1000)
        again = client.futures_create_order(symbol="BTCUSDT", side="SELL", type="MARKET", quantity="0.010",
                                            newClientOrderId="a.B:c/1_x-2")  # FILLED: the id may be reused
        assert again["status"] == "FILLED" and again["orderId"] != got["orderId"]
        assert client.futures_get_order(symbol="BTCUSDT", origClientOrderId="a.B:c/1_x-2")["orderId"] == again[
            "orderId"]
        with pytest.raises(BinanceAPIException) as exc:
            client.futures_get_order(symbol="BTCUSDT", origClientOrderId="never-sent")
        assert code_of(exc) == -2013


def test_spot_duplicate_id_and_cancel(keys: None) -> None:
    with run_in_thread(exchange(Market.SPOT, D0, D0 - timedelta(minutes=1))) as srv:
        client = make_client(Market.SPOT, srv.rest_base_url)
        client.create_order(symbol="BTCUSDT", side="BUY", type="MARKET", quantity="0.01", newClientOrderId="one")
        with pytest.raises(BinanceAPIException) as exc:
            client.create_order(symbol="BTCUSDT", side="BUY", type="MARKET", quantity="0.01",
                                newClientOrderId="one")
        assert code_of(exc) == -2010 and exc.value.message == "Duplicate order sent."
        cancelled = client.cancel_order(symbol="BTCUSDT", origClientOrderId="one")
        assert cancelled["status"] == "CANCELED" and cancelled["origClientOrderId"] == "one"
        with pytest.raises(BinanceAPIException) as exc:
            client.cancel_order(symbol="BTCUSDT", origClientOrderId="one")
        assert code_of(exc) == -2011
        srv.clock.advance_to(D0 + timedelta(minutes=1))
        balances = {b["asset"]: b["free"] for b in client.get_account()["balances"]}
        assert balances["BTC"] == "0.00000000" and balances["USDT"] == "10000.00000000"  # nothing filled


# -- exchange filters ------------------------------------------------------------------------------------------------
def test_filters_answer_binances_codes(spot: tuple[ReplayServer, Client], keys: None) -> None:
    _, client = spot
    info = client.get_symbol_info("BTCUSDT")
    assert info is not None
    step = next(f for f in info["filters"] if f["filterType"] == "LOT_SIZE")["stepSize"]
    assert float(step) == 1e-6
    for qty, msg in (("0.0000001", "Filter failure: LOT_SIZE"), ("0.0001", "Filter failure: NOTIONAL")):
        with pytest.raises(BinanceAPIException) as exc:
            client.create_order(symbol="BTCUSDT", side="BUY", type="MARKET", quantity=qty)
        assert code_of(exc) == -1013 and exc.value.message == msg
    with pytest.raises(BinanceAPIException) as exc:  # more than the 10k USDT the account holds
        client.create_order(symbol="BTCUSDT", side="BUY", type="MARKET", quantity="2")
    assert code_of(exc) == -2010 and exc.value.message == "Account has insufficient balance for requested action."
    with run_in_thread(exchange(Market.FUTURES_UM, N0, N0 + timedelta(hours=2), "NEARUSDT")) as srv:
        fut = make_client(Market.FUTURES_UM, srv.rest_base_url)
        for qty, code in (("1.5", -1111), ("0", -4003), ("1", -4164)):
            with pytest.raises(BinanceAPIException) as exc:
                fut.futures_create_order(symbol="NEARUSDT", side="BUY", type="MARKET", quantity=qty)
            assert code_of(exc) == code, qty
        assert "no smaller than 5" in exc.value.message
        fut.futures_create_order(symbol="NEARUSDT", side="BUY", type="MARKET", quantity="10")
        # a reduce-only order is exempt from the minimum notional; one that would add exposure is refused
        assert fut.futures_create_order(symbol="NEARUSDT", side="SELL", type="MARKET", quantity="1",
                                        reduceOnly="true")["status"] == "FILLED"
        with pytest.raises(BinanceAPIException) as exc:
            fut.futures_create_order(symbol="NEARUSDT", side="BUY", type="MARKET", quantity="1", reduceOnly="true")
        assert code_of(exc) == -2022
        assert float(fut.futures_position_information(symbol="NEARUSDT")[0]["positionAmt"]) == 9.0


# -- faults --------------------------------------------------------------------------------------------------------
def test_fault_dropped_answer_order_applied(futures: tuple[ReplayServer, Client]) -> None:
    srv, client = futures
    srv.set_order_faults(drop_response=1)
    with pytest.raises(requests.exceptions.ConnectionError):
        client.futures_create_order(symbol="BTCUSDT", side="BUY", type="MARKET", quantity="0.010",
                                    newClientOrderId="lost-answer")
    got = client.futures_get_order(symbol="BTCUSDT", origClientOrderId="lost-answer")
    assert got["status"] == "FILLED"  # it went in: the query tells the trader so
    assert srv.order_faults.drop_response == 0 and srv.stats.order_faults == 1


@pytest.mark.parametrize(("fault", "applied", "status", "code"), [
    ("server_error", False, 503, -1000), ("server_error", True, 503, -1000),
    ("timeout", True, 408, -1007), ("timeout", False, 408, -1007),
])
def test_fault_unknown_status(futures: tuple[ReplayServer, Client], fault: str, applied: bool, status: int,
                              code: int) -> None:
    srv, client = futures
    r = requests.post(f"{srv.rest_base_url}/_replay/order_faults", json={fault: 1, "applied": applied}, timeout=10)
    assert r.json()[fault] == 1
    with pytest.raises(BinanceAPIException) as exc:
        client.futures_create_order(symbol="BTCUSDT", side="BUY", type="MARKET", quantity="0.010",
                                    newClientOrderId="unknown-fate")
    assert exc.value.status_code == status and code_of(exc) == code
    if applied:
        assert client.futures_get_order(symbol="BTCUSDT", origClientOrderId="unknown-fate")["status"] == "FILLED"
    else:
        with pytest.raises(BinanceAPIException) as exc:
            client.futures_get_order(symbol="BTCUSDT", origClientOrderId="unknown-fate")
        assert code_of(exc) == -2013
    # the fault was used up: the next order goes through normally
    assert client.futures_create_order(symbol="BTCUSDT", side="BUY", type="MARKET",
                                       quantity="0.010")["status"] == "FILLED"


def test_fault_rate_limited_with_retry_after(spot: tuple[ReplayServer, Client]) -> None:
    srv, client = spot
    srv.set_order_faults(rate_limited=1, retry_after_s=7)
    with pytest.raises(BinanceAPIException) as exc:
        client.create_order(symbol="BTCUSDT", side="BUY", type="MARKET", quantity="0.01", newClientOrderId="rl")
    assert exc.value.status_code == 429 and code_of(exc) == -1015
    assert exc.value.response.headers["Retry-After"] == "7"
    with pytest.raises(BinanceAPIException) as exc:
        client.get_order(symbol="BTCUSDT", origClientOrderId="rl")
    assert code_of(exc) == -2013  # refused, not applied


def test_fault_order_invisible_for_a_while(spot: tuple[ReplayServer, Client]) -> None:
    srv, client = spot
    srv.set_order_faults(invisible_ms=400.0)
    placed = client.create_order(symbol="BTCUSDT", side="BUY", type="MARKET", quantity="0.01",
                                 newClientOrderId="ghost")
    assert placed["status"] == "FILLED"
    with pytest.raises(BinanceAPIException) as exc:
        client.get_order(symbol="BTCUSDT", origClientOrderId="ghost")
    assert code_of(exc) == -2013 and exc.value.message == "Order does not exist."
    deadline = time.monotonic() + 10
    while True:  # visible once the delay has passed
        try:
            assert client.get_order(symbol="BTCUSDT", origClientOrderId="ghost")["orderId"] == placed["orderId"]
            break
        except BinanceAPIException:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_kernel_state_is_untouched_by_a_refused_order(futures: tuple[ReplayServer, Client]) -> None:
    """A refused order books nothing: the account equals the kernel's after the accepted orders only."""
    srv, client = futures
    with pytest.raises(BinanceAPIException):
        client.futures_create_order(symbol="BTCUSDT", side="BUY", type="MARKET", quantity="5.000")
    acct = srv.exchange.account(DOC_KEY)
    book = acct.book("BTCUSDT")  # row CASH is scratch, set from the wallet before each fill
    assert np.all(book[[QTY, AVG_ENTRY, FEES]] == 0.0) and acct.balances == {"USDT": 10_000.0}
