"""Trader records: decisions/orders/fills/marks round-trip, idempotent per bar, daily PnL; SQLite and PostgreSQL."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from rltrader.errors import ConfigError
from rltrader.live.records import Records, order_id_for

DAY = 86_400_000_000
T0 = 1_681_084_800_000_000  # 2023-04-10T00:00Z


def _fill_session(r: Records) -> None:
    r.start_session("s1", mode="paper", model="sma_cross", model_version=None, symbols=["AAA", "BBB"],
                    params={"initial_cash": 1000.0})
    assert r.record_decision("s1", "AAA", T0, 1, "long", [0.1, 0.9, 0.0, 0.0], 2.0, 0.0, "signal")
    assert not r.record_decision("s1", "AAA", T0, 2, "short", None, -2.0, 0.0, "signal")  # bar already decided
    oid = order_id_for("s1", "AAA", T0)
    assert r.record_order("s1", "AAA", T0, oid, 2.0, 100.0, "signal")
    assert not r.record_order("s1", "AAA", T0, oid, 2.0, 100.0, "signal")  # a recomputed bar sends nothing new
    with r.transaction():
        r.record_fill("s1", "AAA", oid, T0 + 60_000_000, "order", 2.0, 100.1, 0.1, 0.2, 0.0, 2.0)
        r.update_order(oid, "filled", exchange_order_id="42")
    for k, eq in enumerate((1000.0, 1010.0, 1005.0)):
        r.record_mark("s1", "AAA", T0 + k * 3_600_000_000, eq, 2.0, 100.0)
    r.record_mark("s1", "AAA", T0 + DAY, 990.0, 0.0, 99.0)
    r.record_mark("s1", "BBB", T0, 1000.0, 0.0, 5.0)


def _check(r: Records) -> None:
    d = r.decisions()
    assert [x["action_name"] for x in d] == ["long"] and d[0]["scores"] == [0.1, 0.9, 0.0, 0.0]
    (o,) = r.orders()
    assert o["status"] == "filled" and o["exchange_order_id"] == "42" and o["qty"] == 2.0
    (f,) = r.fills()
    assert f["client_order_id"] == o["client_order_id"] and f["price"] == 100.1
    daily = r.daily_pnl()
    assert [(x["symbol"], x["day"], x["pnl"]) for x in daily] == [
        ("AAA", "2023-04-10", 5.0), ("AAA", "2023-04-11", -15.0), ("BBB", "2023-04-10", 0.0)]
    assert daily[0]["fills"] == 1 and daily[0]["fees"] == 0.1
    st = r.status()
    assert st["symbols"]["AAA"]["equity"] == 990.0 and st["symbols"]["AAA"]["fills"] == 1
    assert st["session"]["params"] == {"initial_cash": 1000.0}


def test_sqlite_round_trip_wal_and_idempotent_bars(tmp_path: Path) -> None:
    r = Records(tmp_path / "t.db")
    _fill_session(r)
    _check(r)
    r.close()
    with sqlite3.connect(tmp_path / "t.db") as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = Records(tmp_path / "t.db")  # reopen: schema exists, rows persist
    _check(again)


def test_failed_transaction_writes_nothing(tmp_path: Path) -> None:
    r = Records(tmp_path / "t.db")
    r.start_session("s1", mode="paper", model="flat", model_version=None, symbols=["AAA"], params={})
    with pytest.raises(RuntimeError), r.transaction():
        r.record_fill("s1", "AAA", None, T0, "order", 1.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        raise RuntimeError("crash between the fill and the order update")
    assert r.fills() == []


def _journal_contract(r: Records) -> None:
    """What recovery and the risk engine read and write: open intents per mode, positions, the persisted
    state and events, the operator's commands, nested transactions."""
    from rltrader.live import control
    from rltrader.live.risk import RiskState, set_state, state_of

    r.start_session("x1", mode="testnet", model="m", model_version=None, symbols=["AAA"], params={})
    r.start_session("x1", mode="testnet", model="m", model_version=None, symbols=["AAA"], params={})  # resumed
    r.start_session("p1", mode="paper", model="m", model_version=None, symbols=["AAA"], params={})
    assert r.unfinished_session("testnet", ["AAA"]) == "x1" and r.unfinished_session("testnet", ["BBB"]) is None
    for sid, cid, status in (("x1", "a", "new"), ("x1", "b", "sent"), ("x1", "c", "filled"), ("p1", "d", "new")):
        r.record_order(sid, "AAA", T0, cid, 1.0, 10.0, "signal", status=status)
    assert [o["client_order_id"] for o in r.open_orders()] == ["a", "b"]  # paper sessions are not the exchange's
    with r.transaction():
        r.record_fill("x1", "AAA", "c", T0, "order", 3.0, 10.0, 0.0, 0.0, 0.0, 3.0)
        with r.transaction():  # nested: joins the outer one
            r.record_fill("x1", "AAA", None, T0, "seed", 5.0, 10.0, 0.0, 0.0, 0.0, 5.0)
    r.record_fill("p1", "AAA", "d", T0, "order", 7.0, 10.0, 0.0, 0.0, 0.0, 7.0)
    assert r.journal_positions() == {"AAA": 3.0}  # exchange fills only: not paper, not the seed
    r.update_order("a", "new", detail="reduced: x", qty=0.5)
    assert r.order("a")["qty"] == 0.5 and r.order("a")["detail"] == "reduced: x"  # type: ignore[index]
    assert state_of(r)["state"] == "ACTIVE"
    assert set_state(r, RiskState.REDUCING, "max_drawdown", drawdown=0.1)
    assert not set_state(r, RiskState.REDUCING, "max_drawdown")  # no change, nothing recorded
    control.halt(r, "t")  # the operator's commands (live.control) share the tables
    assert state_of(r)["state"] == "HALTED" and state_of(r)["reason"] == "operator: halt (t)"
    cid = int(control.flatten(r)["id"])
    control.resume(r)
    assert [(e["state_to"], e["reason"]) for e in r.risk_events()] == [
        ("REDUCING", "max_drawdown"), ("HALTED", "operator: halt (t)"), ("ACTIVE", "operator: resume")]
    assert r.risk_events()[0]["numbers"] == {"drawdown": 0.1}
    assert [int(c["id"]) for c in control.pending(r)] == [cid]


def test_journal_contract_sqlite(tmp_path: Path) -> None:
    r = Records(tmp_path / "t.db")
    _journal_contract(r)
    assert r.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: each commit fsynced (the default)
    assert Records(tmp_path / "t.db", durable=False).conn.execute("PRAGMA synchronous").fetchone()[0] == 1


@pytest.mark.postgres
def test_journal_contract_postgres(pg_url: str) -> None:
    _journal_contract(Records(pg_url))


def test_empty_database_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no trading session"):
        Records(tmp_path / "t.db").status()


@pytest.mark.postgres
def test_postgres_same_contract(pg_url: str) -> None:
    r = Records(pg_url)
    _fill_session(r)
    _check(r)
    r.close()


def test_cli_status_orders_pnl_json(tmp_path: Path) -> None:
    """`rltrader trade status|orders|pnl --json` read the records the trader wrote."""
    import json

    from typer.testing import CliRunner

    from rltrader.cli import app

    r = Records(tmp_path / "t.db")
    _fill_session(r)
    r.close()
    runner = CliRunner()
    db = str(tmp_path / "t.db")
    res = runner.invoke(app, ["trade", "orders", "--json", "--records", db])
    assert res.exit_code == 0, res.output
    (o,) = json.loads(res.output)
    assert o["status"] == "filled" and o["client_order_id"] == order_id_for("s1", "AAA", T0)
    res = runner.invoke(app, ["trade", "status", "--json", "--records", db])
    assert res.exit_code == 0 and json.loads(res.output)["symbols"]["AAA"]["fills"] == 1
    res = runner.invoke(app, ["trade", "pnl", "--json", "--records", db])
    assert res.exit_code == 0 and [x["pnl"] for x in json.loads(res.output)] == [5.0, -15.0, 0.0]
    res = runner.invoke(app, ["trade", "status", "--records", str(tmp_path / "empty.db")])
    assert res.exit_code == 1 and "no trading session" in res.output


def test_testnet_needs_keys_from_the_environment() -> None:
    from rltrader.live.runner import KEY_VARS, exchange_client

    with pytest.raises(ConfigError, match="RLTRADER_BINANCE_API_SECRET") as exc:
        exchange_client("futures", None, env={KEY_VARS[0]: "k"})
    assert "RLTRADER_BINANCE_API_KEY" not in str(exc.value)  # only the missing one is named
    client = exchange_client("futures", "http://127.0.0.1:9", env={KEY_VARS[0]: "k", KEY_VARS[1]: "s"})
    assert client.API_URL == "http://127.0.0.1:9/api"


def test_trade_paper_deployment_is_supervised() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from flows.deploy import deployments

    dep = {d.name: d for d in deployments()}["trade-paper"]
    assert dep.concurrency_limit == 1 and dep.schedules and dep.parameters == {"mode": "paper"}


def test_deferred_rows_are_committed_with_the_next_order_intent_before_it(tmp_path: Path) -> None:
    """The trader defers decision and mark rows off the per-bar critical path; they reach the disk at the next
    ``flush`` (between bars) or in the same commit as the next immediate write — an order's intent — so the
    journal's order on disk stays the order of the calls. Another connection sees nothing before that."""
    import sqlite3

    rec = Records(tmp_path / "t.db")
    other = sqlite3.connect(tmp_path / "t.db")
    count = lambda table: other.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]  # noqa: E731
    rec.start_session("s1", mode="paper", model="m", model_version=None, symbols=["X"], params={})
    rec.record_decision("s1", "X", 60_000_000, 1, "long", [0.1, 0.2], 1.0, 0.0, "signal", deferred=True)
    rec.record_mark("s1", "X", 0, 100.0, 0.0, 10.0, deferred=True)
    assert (count("decisions"), count("marks")) == (0, 0)
    assert rec.record_order("s1", "X", 60_000_000, "cid-1", 1.0, 10.0, "signal")
    assert (count("decisions"), count("marks"), count("orders")) == (1, 1, 1)
    ids = other.execute("SELECT MAX(written_at) FROM decisions").fetchone()[0]
    assert ids <= other.execute("SELECT written_at FROM orders").fetchone()[0]
    rec.record_decision("s1", "X", 120_000_000, 0, "hold", None, None, 1.0, "signal", deferred=True)
    rec.flush()
    assert count("decisions") == 2
    rec.record_decision("s1", "X", 180_000_000, 0, "hold", None, None, 1.0, "signal", deferred=True)
    assert len(rec.decisions("s1")) == 3  # this connection's reads see its deferred rows
    rec.close()


def test_order_ids_of_sessions_started_in_the_same_hour_differ() -> None:
    """Session ids begin with their start time; two sessions started within the hour on one account must not derive
    the same client order id for the same bar (the exchange would refuse one as a duplicate)."""
    a, b = "20261201165400a1b2c3", "20261201165912d4e5f6"
    assert order_id_for(a, "BTCUSDT", T0) != order_id_for(b, "BTCUSDT", T0)
    assert order_id_for(a, "BTCUSDT", T0) == order_id_for(a, "BTCUSDT", T0)  # deterministic: recovery relies on it
    oid = order_id_for(a, "1000SHIBUSDT", T0 + 10 ** 15, seq=1)
    assert len(oid) <= 36 and re.fullmatch(r"[.A-Z:/a-z0-9_-]{1,36}", oid)
