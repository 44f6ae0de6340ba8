"""A resumed session (a crash, then a restart with the same session id) with the backtest's filters on decides
exactly as an uninterrupted one: its account and the filters' state (last fill for the cooldown, the day's trade
count, stop-loss / take-profit on the restored entry) are rebuilt from the journal alone.

The trader runs in testnet mode against the replay exchange (python-binance's real ``Client`` over HTTP, the clock
stepped a bar at a time), as ``live_crash_driver.py`` runs it; a crash is simulated by dropping the ``Trader`` (and
its broker and records connection) after a handled bar, without ending the session. A paper session resumes on new bars
only (the paper broker's in-flight order lives in the process: ``test_live_paper_resume.py``), so the exchange
is the path under test here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from conftest import NEAR_APRIL, build_near_april

from rltrader.config import Settings
from rltrader.data.archive import parse_klines, read_zip_member
from rltrader.data.parquet_store import ParquetStore
from rltrader.data.schema import Market
from rltrader.env.modes import E_HELD
from rltrader.evaluate.backtest import run_backtest
from rltrader.evaluate.backtest.decisions import FS_BLOCKED, FS_COUNT, FS_DAY, FS_LAST_FILL
from rltrader.live.gateway import Bar, BinanceBroker, PaperBroker
from rltrader.live.records import Records
from rltrader.live.risk import state_of
from rltrader.live.runner import KEY_VARS, exchange_client, start_exchange_trader
from rltrader.live.trader import SymbolBook, Trader, bars_from_frame, build_trader
from rltrader.sim import ReplayClock, ReplayData, ReplayServer, run_in_thread

SYM = "NEARUSDT"
DAY0 = datetime(2023, 4, 10, tzinfo=UTC)
DAY1 = datetime(2023, 4, 11, tzinfo=UTC)
KEY, SECRET = "resume-key", "resume-secret"
FILTERS = {"cooldown_bars": 5, "max_trades_per_day": 12, "stop_loss": 0.004, "take_profit": 0.004}
MIN_HOLD = 45


def _setup(shared_archive: Path, tmp: Path, **sections: dict[str, Any]) -> tuple[Settings, pl.DataFrame, list[Bar]]:
    settings = build_near_april(
        shared_archive, tmp,
        execution={"step_size": 1.0},  # NEARUSDT futures: whole NEAR
        risk={"stale_after_s": 0}, **sections)
    rows = parse_klines(read_zip_member(shared_archive / NEAR_APRIL), source=NEAR_APRIL, market=Market.FUTURES_UM,
                        symbol=SYM, interval="1m").rows
    day = rows.filter((pl.col("open_time") >= DAY0) & (pl.col("open_time") < DAY1 + timedelta(minutes=5)))
    store = ParquetStore(settings.data.dir / "store")
    bars = bars_from_frame(store.read_klines("futures-um", SYM, "1m"))
    store.close()
    return settings, day, bars


@pytest.fixture(scope="module")
def setup(shared_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, pl.DataFrame, list[Bar]]:
    return _setup(shared_archive, tmp_path_factory.mktemp("resume"),
                  backtest={"trade_size_quote": 5000.0, **FILTERS})  # below the 1x leverage cap


@pytest.fixture(scope="module")
def held_setup(shared_archive: Path,
               tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, pl.DataFrame, list[Bar]]:
    return _setup(shared_archive, tmp_path_factory.mktemp("resume_held"), backtest={"trade_size_quote": 5000.0},
                  env={"min_hold_bars": MIN_HOLD})


def _snapshot(book: SymbolBook) -> tuple[int | None, float, float, float, float]:
    """The filters' state with the last-fill row as its bar's open time (rows are a process's own numbering),
    and the env's count of bars the position has been open (``min_hold_bars``)."""
    fs = book.filter_state[:, 0]
    last = int(book.time[int(fs[FS_LAST_FILL])]) if fs[FS_LAST_FILL] >= 0 else None
    return last, float(fs[FS_DAY]), float(fs[FS_COUNT]), float(fs[FS_BLOCKED]), float(book.env[E_HELD, 0])


def _queue(trader: Trader) -> tuple[Any, ...]:
    """The pending queue (``latency_bars > 0``): the decision count, the committed slots and the held orders
    (due decision, the bar they were decided for, quantity, reason; client ids name the session: left out)."""
    book = trader.books[SYM]
    held = sorted((k, r.bar_time, r.qty, r.reason) for (s, k), r in trader.queued.items() if s == SYM)
    return book.k, tuple(book.pending[0].tolist()), tuple(held)


class Session:
    """One testnet session against a replay exchange of its own, started and restarted as a process would."""

    def __init__(self, settings: Settings, srv: ReplayServer, clock: ReplayClock, db: Path, bars: list[Bar]) -> None:
        self.settings, self.srv, self.clock, self.db, self.bars = settings, srv, clock, db, bars
        self.t0, self.t1 = int(DAY0.timestamp() * 1e6), int(DAY1.timestamp() * 1e6)
        self.sid: str | None = None
        self.restored: list[tuple[int, tuple[int | None, float, float, float, float]]] = []
        self.snapshots: dict[int, tuple[int | None, float, float, float, float]] = {}
        self.queues: dict[int, tuple[Any, ...]] = {}
        self.restored_queues: list[tuple[int, tuple[Any, ...]]] = []

    def start(self, rehandle: int | None) -> tuple[Trader, Records]:
        """A fresh process: records, broker, trader; a resumed one gets the bars it had handled before
        ``rehandle`` back into its window, then recovery and the journal restore."""
        records = Records(self.db, durable=False)
        broker = BinanceBroker(exchange_client("futures", self.srv.rest_base_url), "futures", np.zeros(0),
                               grace_s=0.2)
        trader = build_trader(self.settings, mode="testnet", symbols=[SYM], model="sma_cross", records=records,
                              broker=broker, until_us=self.t1, session_id=self.sid)
        self.sid = trader.session_id
        trader.warm_up(SYM, (b for b in self.bars if b.time < self.t0))
        if rehandle is not None:
            trader.warm_up_book(SYM, (b for b in self.bars if self.t0 <= b.time < rehandle))
        start_exchange_trader(self.settings, trader, broker, [SYM],
                              rehandle=None if rehandle is None else {SYM: rehandle})
        assert state_of(records)["state"] == "ACTIVE", state_of(records)
        if rehandle is not None:
            self.restored.append((rehandle, _snapshot(trader.books[SYM])))
            self.restored_queues.append((rehandle, _queue(trader)))
        return trader, records

    def run(self, trader: Trader, first: int, last: int) -> None:
        """Handle the bars first..last (open times) in lock-step with the exchange's clock."""
        for b in self.bars:
            if first <= b.time <= last:
                self.clock.advance_to(datetime.fromtimestamp((b.time + 60_000_000) / 1e6, UTC))
                trader.on_bar(SYM, b)
                trader.between_bars()
                self.snapshots[b.time] = _snapshot(trader.books[SYM])
                self.queues[b.time] = _queue(trader)

    def play(self, crashes: list[int]) -> Records:
        """The day, crashing after each bar in ``crashes`` (the process dies: nothing is closed or ended) and
        restarting at its last marked bar, as ``live_crash_driver.py`` does."""
        trader, records = self.start(None)
        first = self.t0
        for crash in crashes:
            self.run(trader, first, crash)
            records.flush()  # what a killed process leaves: every committed row (between_bars committed them)
            del trader, records
            probe = Records(self.db)
            marked = max(m["bar_time"] for m in probe.marks(self.sid))
            probe.close()
            assert marked == crash
            trader, records = self.start(marked)
            first = marked  # the last marked bar is handled again
        self.run(trader, first, self.t1 - 60_000_000)
        self.clock.advance_to(DAY1 + timedelta(minutes=2))
        records.end_session(trader.session_id, trader.summary())
        return records


@contextmanager
def _exchange(day: pl.DataFrame, settings: Settings) -> Iterator[tuple[ReplayServer, ReplayClock]]:
    clock = ReplayClock(DAY0, 0.0, paused=True)
    server = ReplayServer(ReplayData(Market.FUTURES_UM, day), clock=clock, heartbeat_s=None,
                          api_keys={KEY: SECRET}, execution=settings.execution)
    with run_in_thread(server) as srv:
        yield srv, clock


def _fills(records: Records, sid: str) -> list[tuple[Any, ...]]:
    return [(f["time"], f["kind"], f["client_order_id"], f["qty"], f["price"], f["fee"])
            for f in records.fills(sid)]


def _uninterrupted(settings: Settings, day: pl.DataFrame, bars: list[Bar], tmp: Path,
                   monkeypatch: pytest.MonkeyPatch) -> tuple[Session, Records, str]:
    """The day's session without a crash, against an exchange of its own: (session, records, session id)."""
    for var, val in zip(KEY_VARS, (KEY, SECRET), strict=True):
        monkeypatch.setenv(var, val)
    with _exchange(day, settings) as (srv, clock):
        whole = Session(settings, srv, clock, tmp / "whole.db", bars)
        ref = whole.play([])
    return whole, ref, str(whole.sid)


def _same_orders_and_decisions(ref: Records, sid: str, rec: Records, rsid: str) -> None:
    """The same orders (client ids carry the session id: compared without it), fills, prices, fees and
    decisions."""
    strip = [(t, k, str(c).split("-", 1)[1] if c else None, q, p, fee) for t, k, c, q, p, fee in _fills(ref, sid)]
    ours = [(t, k, str(c).split("-", 1)[1] if c else None, q, p, fee) for t, k, c, q, p, fee in _fills(rec, rsid)]
    assert ours == strip
    assert [(d["bar_time"], d["action"], d["target"], d["reason"]) for d in rec.decisions(rsid)] == \
        [(d["bar_time"], d["action"], d["target"], d["reason"]) for d in ref.decisions(sid)]


def _assert_backtest_parity(settings: Settings, rec: Records, rsid: str) -> Any:
    """The session's fills and equity marks equal the backtest's on these bars (a position still open at the end:
    the backtest closes it at the last close, a live order fills at the next open — that one compared for side
    and size). Returns the backtest."""
    bt = run_backtest(settings, "sma_cross", split="backtest")
    bt_fills = bt.fills.filter(pl.col("symbol") == SYM)
    live = rec.fills(rsid)
    open_at_end = bt_fills["kind"][-1] == "forced_close"
    if open_at_end:
        assert live[-1]["qty"] == pytest.approx(bt_fills["qty"][-1], rel=1e-12)
        bt_fills, live = bt_fills.head(-1), live[:-1]
    assert len(live) == bt_fills.height >= 2
    for r, o, t in zip(bt_fills.iter_rows(named=True), live, bt_fills["time"].dt.epoch("us").to_list(), strict=True):
        assert (o["time"], o["kind"]) == (t, r["kind"])
        assert o["qty"] == pytest.approx(r["qty"], rel=1e-12) and o["price"] == pytest.approx(r["price"], rel=1e-12)
        assert o["fee"] == pytest.approx(r["fee"], rel=1e-9, abs=1e-12)
    eq = bt.equity.filter(pl.col("symbol") == SYM)
    bt_eq = dict(zip((eq["time"].dt.epoch("us") - 60_000_000).to_list(), eq["equity"].to_list(), strict=True))
    marks = {m["bar_time"]: m["equity"] for m in rec.marks(rsid)}
    for t, e in bt_eq.items():
        if t != max(bt_eq) or not open_at_end:
            assert marks[t] == pytest.approx(e, rel=1e-9), t
    return bt


@pytest.mark.slow
def test_a_resumed_session_with_filters_decides_as_an_uninterrupted_one(
        setup: tuple[Settings, pl.DataFrame, list[Bar]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, day, bars = setup
    whole, ref, sid = _uninterrupted(settings, day, bars, tmp_path, monkeypatch)
    # a trader that starts on new bars after a crash (``rltrader trade``: nothing handled again) keeps the day's
    # trade count and blocked decisions (a crash loop must not reset the daily cap)
    late = build_trader(settings, mode="testnet", symbols=[SYM], model="sma_cross", records=ref,
                        broker=PaperBroker(np.zeros(0)), session_id=sid)
    assert late.restore_from_journal(SYM) > 0
    assert _snapshot(late.books[SYM])[1:] == whole.snapshots[max(whole.snapshots)][1:]
    order_fills = [f for f in ref.fills(sid) if f["kind"] == "order"]
    # restart around a fill after some trades were counted, before the day's cap is reached: the day's count, the
    # cooldown after that fill and the filled position (stop loss / take profit on its entry) must carry over
    mid = int((DAY0 + timedelta(hours=1, minutes=30)).timestamp() * 1e6)
    fill = next(f["time"] for f in order_fills if f["time"] >= mid)
    crashes = [fill - 60_000_000, fill, fill + 60_000_000, fill + 4 * 60_000_000]
    with _exchange(day, settings) as (srv, clock):
        resumed = Session(settings, srv, clock, tmp_path / "resumed.db", bars)
        rec = resumed.play(crashes)
    rsid = str(resumed.sid)

    _same_orders_and_decisions(ref, sid, rec, rsid)
    # every bar's equity mark (the re-handled bars' included)
    assert [(m["bar_time"], m["equity"], m["position"]) for m in rec.marks(rsid)] == \
        [(m["bar_time"], m["equity"], m["position"]) for m in ref.marks(sid)]
    # the restored filter state is the uninterrupted run's after the bar before the re-handled one
    assert len(resumed.restored) == len(crashes)
    for rehandle, state in resumed.restored:
        assert state == whole.snapshots[rehandle - 60_000_000], rehandle
    # the filters bound across the restarts: trades were counted before them, the cap was reached after them,
    # and a cooldown after the fill was active when the last two restarts re-handled their bars
    before = whole.snapshots[crashes[-1]]
    assert before[2] > 0 and before[0] == fill
    assert max(s[2] for s in whole.snapshots.values()) >= FILTERS["max_trades_per_day"] > before[2]
    assert any(d["reason"] == "filtered" and d["bar_time"] > crashes[-1] for d in ref.decisions(sid))

    # and both equal the backtest on these bars
    bt = _assert_backtest_parity(settings, rec, rsid)
    assert bt.totals["blocked_decisions"] > 0


@pytest.mark.slow
def test_a_resumed_session_keeps_counting_the_bars_its_position_is_held(
        held_setup: tuple[Settings, pl.DataFrame, list[Bar]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``min_hold_bars``: a position cannot be closed or flipped before it has been open that many bars. A restart
    inside that window must carry the count (rebuilt from the journal's marks), or the resumed trader would hold
    the position longer than the uninterrupted run and the backtest."""
    settings, day, bars = held_setup
    whole, ref, sid = _uninterrupted(settings, day, bars, tmp_path, monkeypatch)
    # restarts a few bars into the hold window of an early and a later position (opened or flipped at ``t``)
    opened = sorted(t for t, snap in whole.snapshots.items() if snap[4] == 1.0)
    assert len(opened) >= 4, opened
    crashes = [opened[1] + 3 * 60_000_000, opened[len(opened) // 2] + 10 * 60_000_000]
    assert crashes[0] < crashes[1] < whole.t1 - 60_000_000
    held = [whole.snapshots[c][4] for c in crashes]
    assert held == [4.0, 11.0]  # inside the window: the count decides what is allowed
    with _exchange(day, settings) as (srv, clock):
        resumed = Session(settings, srv, clock, tmp_path / "resumed.db", bars)
        rec = resumed.play(crashes)
    rsid = str(resumed.sid)
    for rehandle, state in resumed.restored:
        assert state == whole.snapshots[rehandle - 60_000_000], rehandle
    _same_orders_and_decisions(ref, sid, rec, rsid)
    # and the testnet session keeps positions as long as the backtest does (the exchange books a fill when it
    # answers, before the bar it fills in: the count must still restart at a flip)
    _assert_backtest_parity(settings, rec, rsid)


@pytest.mark.slow
@pytest.mark.parametrize("latency", [1, 2])
def test_a_resumed_session_with_latency_sends_the_orders_it_had_queued(
        setup: tuple[Settings, pl.DataFrame, list[Bar]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        latency: int) -> None:
    """``execution.latency_bars``: an order decided at bar ``r`` is held in the pending queue and sent
    ``latency`` decisions later; it is in no journal table until then. A restart while orders are held must
    rebuild the queue (and the committed position it adds to the next orders' sizing) from the journal's
    decisions, or those orders are lost and the resumed run trades differently from the uninterrupted one."""
    base, day, bars = setup
    settings = base.model_copy(update={"execution": replace(base.execution, latency_bars=latency)})
    whole, ref, sid = _uninterrupted(settings, day, bars, tmp_path, monkeypatch)
    minute = 60_000_000
    # the bars after which orders were held: ordered (queued) at the decision of bar r, for bar r + 1
    held = sorted(t for t, q in whole.queues.items() if q[2])
    ordered = [t for t in held if whole.queues[t][2][-1][1] == t + minute]
    assert len(ordered) >= 6, ordered
    first, later = ordered[len(ordered) // 3], ordered[2 * len(ordered) // 3]
    # right after the decision whose order is queued, one bar later (latency 2: still queued; 1: sent at that
    # bar's decision), right after it was sent, and right after a later order was queued
    crashes = sorted({first, first + minute, first + latency * minute, later})
    assert all(whole.queues[c][2] for c in (first, later))
    with _exchange(day, settings) as (srv, clock):
        resumed = Session(settings, srv, clock, tmp_path / "resumed.db", bars)
        rec = resumed.play(crashes)
    rsid = str(resumed.sid)
    # the restored queue is the uninterrupted run's after the bar before the re-handled one
    assert len(resumed.restored_queues) == len(crashes)
    for rehandle, queue in resumed.restored_queues:
        assert queue == whole.queues[rehandle - minute], rehandle
    _same_orders_and_decisions(ref, sid, rec, rsid)
    assert [(m["bar_time"], m["equity"], m["position"]) for m in rec.marks(rsid)] == \
        [(m["bar_time"], m["equity"], m["position"]) for m in ref.marks(sid)]
    for rehandle, state in resumed.restored:
        assert state == whole.snapshots[rehandle - minute], rehandle
    # the held orders went out: each fill is the bar after a decision ``latency`` bars before it
    targets = {d["bar_time"] for d in ref.decisions(sid) if d["target"] is not None}
    order_fills = [f for f in rec.fills(rsid) if f["kind"] == "order"]
    assert order_fills and all(f["time"] - latency * minute in targets for f in order_fills)
    _assert_backtest_parity(settings, rec, rsid)
