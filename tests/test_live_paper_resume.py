"""A killed paper trader (``rltrader trade``, the default mode) resumes its session at the next start: same
session id, the account from the journal (position, cash, fees, fill count), trading on where it stopped — not
a fresh account that forgets the position. The order in flight at the kill is dropped (it lived in the
process) and journaled as such.

The trader runs the real loop (``run_trader``: the websocket ingester, REST repair, the journal) against the
replay exchange on a replayed day of real NEARUSDT bars, in lock-step with the replay clock; the kill is an
exception out of the per-bar hook, so the run dies without ending its session, as a killed process leaves it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import NEAR_APRIL, build_near_april

from rltrader.data.archive import parse_klines, read_zip_member
from rltrader.data.parquet_store import ParquetStore
from rltrader.data.schema import Market
from rltrader.live.records import Records, order_id_for
from rltrader.live.runner import run_trader
from rltrader.sim import ReplayClock, ReplayData, ReplayServer, run_in_thread

SYM = "NEARUSDT"
DAY0 = datetime(2023, 4, 10, tzinfo=UTC)
DAY1 = datetime(2023, 4, 11, tzinfo=UTC)


class Killed(RuntimeError):
    """The simulated kill."""


@pytest.mark.slow
@pytest.mark.parametrize("latency", [0, 1])
def test_a_killed_paper_trader_resumes_its_session_and_account(shared_archive: Path, tmp_path: Path,
                                                               latency: int) -> None:
    built = build_near_april(shared_archive, tmp_path / "built", execution={"latency_bars": latency})
    rows = parse_klines(read_zip_member(shared_archive / NEAR_APRIL), source=NEAR_APRIL, market=Market.FUTURES_UM,
                        symbol=SYM, interval="1m").rows
    store = ParquetStore(tmp_path / "store")
    store.write_klines(rows.filter(pl.col("open_time") < DAY0))
    store.close()
    db = tmp_path / "t.db"
    settings = built.model_copy(update={
        "data": built.data.model_copy(update={"store_url": f"parquet://{tmp_path / 'store'}"}),
        "trader": built.trader.model_copy(update={"symbols": [SYM], "model": "sma_cross", "history_bars": 0,
                                                  "records_url": str(db)})})
    day = rows.filter((pl.col("open_time") >= DAY0) & (pl.col("open_time") < DAY1))
    clock = ReplayClock(DAY0, 0.0, paused=True)
    handled: list[int] = []
    cond = threading.Condition()
    minute = 0

    def run(srv: Any, on_bar: Callable[[int], None], stop: threading.Event) -> dict[str, Any]:
        out: dict[str, Any] = {}

        def processed(sym: str, t: int) -> None:
            with cond:
                handled.append(t)
                cond.notify_all()
            on_bar(t)

        def target() -> None:
            try:
                out["summary"] = run_trader(settings, mode="paper", rest_base=srv.rest_base_url,
                                            ws_base=srv.ws_base_url, max_seconds=600, stop_event=stop,
                                            handle_signals=False, mlflow_summary=False, on_processed=processed)
            except Exception as exc:  # the kill (or a failure, which the asserts below then show)
                out["error"] = exc

        worker = threading.Thread(target=target)
        worker.start()
        out["worker"] = worker
        return out

    def advance(n: int, out: dict[str, Any]) -> None:
        """Release ``n`` more bars; wait until each was handled (or the run died)."""
        nonlocal minute
        for _ in range(n):
            minute += 1
            clock.advance_to(DAY0 + timedelta(minutes=minute))
            want = int((DAY0 + timedelta(minutes=minute - 1)).timestamp() * 1e6)
            with cond:
                done = cond.wait_for(lambda w=want: (bool(handled) and handled[-1] >= w)
                                     or not out["worker"].is_alive(), 60)
            assert done, f"bar {want} was not handled"
            if not out["worker"].is_alive():
                return

    kill_after = int((DAY0 + timedelta(minutes=240)).timestamp() * 1e6)

    def queued_at(t: int) -> bool:
        """The decision of bar ``t`` ordered: with latency its order is held, in no journal table yet."""
        probe = Records(db)
        try:
            return any(d["bar_time"] == t + 60_000_000 and d["target"] is not None for d in probe.decisions())
        finally:
            probe.close()

    def kill(t: int) -> None:
        if t >= kill_after and (not latency or queued_at(t)):
            raise Killed(f"killed after bar {t}")

    server = ReplayServer(ReplayData(Market.FUTURES_UM, day), clock=clock, heartbeat_s=None)
    with run_in_thread(server) as srv:
        first = run(srv, kill, threading.Event())
        advance(600, first)  # until killed
        first["worker"].join(60)
        assert not first["worker"].is_alive()
        assert isinstance(first.get("error"), Killed), first.get("error")

        rec = Records(db)
        (session,) = rec.sessions()
        sid = session["session_id"]
        assert session["ended_at"] is None  # killed: the session never ended
        fills_before = [f for f in rec.fills(sid) if f["kind"] == "order"]
        position = sum(f["qty"] for f in rec.fills(sid))
        assert len(fills_before) >= 2 and position != 0.0  # a position open at the kill: it must survive
        in_flight = [o["client_order_id"] for o in rec.open_orders(("paper",))]
        rec.close()

        stop = threading.Event()
        second = run(srv, lambda t: None, stop)
        advance(200, second)
        stop.set()
        clock.advance_to(DAY0 + timedelta(minutes=minute + 2))
        second["worker"].join(120)
        assert not second["worker"].is_alive()
        assert "error" not in second, second.get("error")

    summary = second["summary"]
    assert summary["session_id"] == sid  # the same session, resumed
    rec = Records(db)
    assert len(rec.sessions()) == 1
    fills = [f for f in rec.fills(sid) if f["kind"] == "order"]
    # the account went on from the journal: the summary's fill count includes the first run's fills, and the
    # position is the sum of every fill of the session (one account across the kill)
    assert summary["symbols"][SYM]["fills"] == len(fills) > len(fills_before)
    assert summary["symbols"][SYM]["position"] == pytest.approx(sum(f["qty"] for f in rec.fills(sid)), abs=1e-9)
    # the resumed trader's first order is relative to the restored position (target − position): it never
    # sizes as if flat — each fill's position_after is the running sum of the session's fills
    running = 0.0
    for f in rec.fills(sid):
        running += f["qty"]
        assert f["position_after"] == pytest.approx(running, abs=1e-9), f
    # the order in flight at the kill was dropped and says so; nothing is left open
    for cid in in_flight:
        order = rec.order(cid)
        assert order is not None and order["status"] == "cancelled" and "killed" in order["detail"]
    assert rec.open_orders(("paper",)) == []
    # latency: no decided order lost across the kill — the orders held in the queue at the kill are restored
    # from the journal and go out once the queue moves again; every decision that moved the queue with a target
    # has its order journaled, but the last ``latency`` ones (still held at the stop)
    ordered = {o["client_order_id"] for o in rec.orders(sid)}
    moved = [d for d in rec.decisions(sid) if not str(d["reason"]).startswith("no new risk")]
    decided = [d["bar_time"] for d in moved[:len(moved) - latency] if d["target"] is not None]
    assert len(decided) >= 2 and [t for t in decided if order_id_for(sid, SYM, t) not in ordered] == []
    # marks continue the first run's equity (no reset to the initial cash at the restart)
    marks = rec.marks(sid)
    assert max(m["bar_time"] for m in marks) > kill_after
    rec.close()
