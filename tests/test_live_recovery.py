"""Crash-only execution against the fake exchange (python-binance's real Client over HTTP): unknown outcomes
resolve to exactly one fill, recovery resolves journaled intents and reconciles positions, account settings
and the live-mode gate refuse with a message that names what is wrong."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from binance import Client
from conftest import SHARED_ARCHIVE

from rltrader.data.rest import make_client
from rltrader.data.schema import Market
from rltrader.errors import ConfigError
from rltrader.live.control import halt
from rltrader.live.gateway import BinanceBroker, OrderGateway, OrderRequest
from rltrader.live.records import Records, order_id_for
from rltrader.live.recovery import check_account_settings, recover
from rltrader.live.risk import RiskState, state_of
from rltrader.live.runner import KEY_VARS, LIVE_FLAG, live_gate
from rltrader.sim import ReplayClock, ReplayServer, default_params, run_in_thread

KEY, SECRET = "recovery-key", "recovery-secret"
F0 = datetime(2022, 9, 5, tzinfo=UTC)  # futures-um BTCUSDT 1m klines
SYM = "BTCUSDT"
BAR = int((F0 + timedelta(hours=1)).timestamp() * 1e6)


@pytest.fixture
def fx(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[ReplayServer, Client, Records]]:
    monkeypatch.setenv("BINANCE_API_KEY", KEY)
    monkeypatch.setenv("BINANCE_API_SECRET", SECRET)
    clock = ReplayClock(F0 + timedelta(hours=1, seconds=30), 0.0, paused=True)
    server = ReplayServer.from_archive(str(SHARED_ARCHIVE), Market.FUTURES_UM, [SYM], F0, F0, clock=clock,
                                       heartbeat_s=None, api_keys={KEY: SECRET})
    records = Records(tmp_path / "journal.db")
    records.start_session("s1", mode="testnet", model="m", model_version=None, symbols=[SYM], params={})
    with run_in_thread(server) as srv:
        yield srv, make_client(Market.FUTURES_UM, srv.rest_base_url), records
    records.close()


def _gateway(client: Client, records: Records, grace_s: float = 0.6) -> tuple[BinanceBroker, OrderGateway, Any]:
    import numpy as np

    xp = default_params(Market.FUTURES_UM).to_array()
    broker = BinanceBroker(client, "futures", xp, grace_s=grace_s)
    acct = np.zeros((32, 1))
    from rltrader.execution import reset_account

    reset_account(acct, 0, 10_000.0)
    return broker, OrderGateway(broker, records, "s1", xp), acct


def _position(client: Client) -> float:
    rows = {p["symbol"]: p for p in client.futures_account()["positions"]}
    return float(rows[SYM]["positionAmt"])


@pytest.mark.parametrize("fault", [
    {"drop_response": 1}, {"timeout": 1, "applied": True}, {"timeout": 1, "applied": False},
    {"server_error": 1, "applied": True}, {"server_error": 1, "applied": False}, {"rate_limited": 1},
    {"drop_response": 1, "invisible_ms": 300.0},
])
def test_unknown_outcomes_end_in_exactly_one_fill(fx: tuple[ReplayServer, Client, Records],
                                                  fault: dict[str, Any]) -> None:
    """Whatever the answer (none, 5xx, -1007, 429; with the order applied or not, visible at once or only
    after a delay), the order is resolved by its client id and filled exactly once; the journal says so."""
    srv, client, records = fx
    _broker, gw, acct = _gateway(client, records)
    srv.set_order_faults(**fault)
    req = OrderRequest(SYM, BAR, order_id_for("s1", SYM, BAR), 0.01, 20_000.0, "signal", False)
    assert gw.submit(req, acct)
    assert _position(client) == pytest.approx(0.01)  # one fill, never two
    (row,) = records.orders("s1")
    assert row["status"] == "filled" and row["client_order_id"] == req.client_order_id
    (fill,) = records.fills("s1")
    assert fill["qty"] == pytest.approx(0.01)
    assert records.journal_positions()[SYM] == pytest.approx(_position(client))


def test_grace_period_is_what_keeps_an_invisible_order_from_being_sent_twice(
        fx: tuple[ReplayServer, Client, Records]) -> None:
    """The point of the grace period: with none, a dropped answer for an order that queries cannot see yet
    reads as absent and is resent — Binance accepts the reused id of a FILLED order, and it fills twice."""
    srv, client, records = fx
    _broker, gw, acct = _gateway(client, records, grace_s=0.0)
    srv.set_order_faults(drop_response=1, invisible_ms=500.0)
    gw.submit(OrderRequest(SYM, BAR, order_id_for("s1", SYM, BAR), 0.01, 20_000.0, "signal", False), acct)
    assert _position(client) == pytest.approx(0.02)  # the duplicate the grace period prevents (test above)


def test_recovery_resolves_intents_and_halts_on_a_mismatch(fx: tuple[ReplayServer, Client, Records]) -> None:
    _srv, client, records = fx
    broker, gw, _acct = _gateway(client, records, grace_s=0.2)
    # a: intent journaled, killed before the request left → absent
    a = order_id_for("s1", SYM, BAR)
    records.record_order("s1", SYM, BAR, a, 0.01, 20_000.0, "signal")
    # b: intent journaled, the exchange filled it, killed before the answer was journaled → filled
    b = order_id_for("s1", SYM, BAR + 60_000_000)
    records.record_order("s1", SYM, BAR + 60_000_000, b, 0.02, 20_000.0, "signal")
    client.futures_create_order(symbol=SYM, side="BUY", type="MARKET", quantity="0.02", newClientOrderId=b)
    rec = recover(records, broker, gw, [SYM], tolerance=1e-9)
    assert rec.ok, rec.problems
    assert rec.resolved == {a: "absent", b: "filled"}
    assert {o["client_order_id"]: o["status"] for o in records.orders("s1")} == {a: "absent", b: "filled"}
    assert records.journal_positions()[SYM] == pytest.approx(0.02) == _position(client)
    assert state_of(records)["state"] == RiskState.ACTIVE.value
    # recovery is idempotent: a second start finds nothing open and the same positions
    assert recover(records, broker, gw, [SYM], tolerance=1e-9).resolved == {}
    # someone trades the account behind the journal's back: HALTED, one line with the symbol and both numbers
    client.futures_create_order(symbol=SYM, side="SELL", type="MARKET", quantity="0.005")
    rec = recover(records, broker, gw, [SYM], tolerance=1e-9)
    assert not rec.ok
    st = state_of(records)
    assert st["state"] == RiskState.HALTED.value
    assert "BTCUSDT: position mismatch: exchange 0.015, journal 0.02" in st["reason"]
    # a symbol the exchange does not report is never read as flat
    rec = recover(records, broker, gw, [SYM, "ETHUSDT"], tolerance=1e-9)
    assert any("ETHUSDT: no position report" in p for p in rec.problems)


def test_an_operator_halt_survives_a_passed_recovery(fx: tuple[ReplayServer, Client, Records]) -> None:
    _, client, records = fx
    broker, gw, _ = _gateway(client, records, grace_s=0.0)
    halt(records, "test")
    assert recover(records, broker, gw, [SYM], tolerance=1e-9).ok
    assert state_of(records)["state"] == "HALTED" and state_of(records)["reason"] == "operator: halt (test)"


def test_account_settings_are_checked_not_changed(fx: tuple[ReplayServer, Client, Records]) -> None:
    _, client, _ = fx
    assert client.futures_get_position_mode() == {"dualSidePosition": False}
    check_account_settings(client, "futures", [SYM], 1, "cross")
    with pytest.raises(ConfigError, match=r"BTCUSDT: leverage 1, params risk.leverage 3.*margin type cross"):
        check_account_settings(client, "futures", [SYM], 3, "isolated")
    rows = {p["symbol"]: p for p in client.futures_account()["positions"]}
    assert rows[SYM]["leverage"] == "1"  # checked only: the account is as it was


def test_live_mode_needs_the_flag_and_the_keys() -> None:
    with pytest.raises(ConfigError) as exc:
        live_gate("live", False, {})
    msg = str(exc.value)
    assert LIVE_FLAG in msg and all(v in msg for v in KEY_VARS)
    with pytest.raises(ConfigError) as exc:
        live_gate("live", True, {KEY_VARS[0]: "k"})
    assert LIVE_FLAG not in str(exc.value) and KEY_VARS[1] in str(exc.value) and "k," not in str(exc.value)
    live_gate("live", True, {KEY_VARS[0]: "k", KEY_VARS[1]: "s"})
    live_gate("testnet", False, {})  # only live needs it
