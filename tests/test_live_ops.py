"""Operating the trader: the status/control API, its live page in a real Chromium, metrics and notifications,
against a paper trader running on a replayed day of real NEARUSDT bars (lock-step replay clock)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from aiohttp import web
from conftest import build_near_april

from rltrader.config import Settings
from rltrader.data.archive import parse_klines, read_zip_member
from rltrader.data.parquet_store import ParquetStore
from rltrader.data.schema import Market
from rltrader.live import control
from rltrader.live.gateway import PaperBroker
from rltrader.live.notify import Notifier
from rltrader.live.records import Records
from rltrader.live.trader import bars_from_frame, build_trader

NEAR = "futures/um/monthly/klines/NEARUSDT/1m/NEARUSDT-1m-2023-04.zip"
DAY0 = datetime(2023, 4, 10, tzinfo=UTC)
DAY1 = datetime(2023, 4, 11, tzinfo=UTC)
TOKEN = "ops-test-token"
BOT = "123456:test-bot-token"
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BotApi:
    """A loopback server speaking the Telegram Bot API's ``sendMessage`` (or hanging on it, ``hang=True``)."""

    def __init__(self, hang: bool = False) -> None:
        self.hang, self.port = hang, _free_port()
        self.messages: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    async def _send(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != BOT:
            return web.json_response({"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401)
        if self.hang:
            await asyncio.sleep(3600)
        body = await request.json()
        self.messages.append(body)
        return web.json_response({"ok": True, "result": {"message_id": len(self.messages), "date": 0,
                                                         "chat": {"id": int(body["chat_id"]), "type": "private"},
                                                         "text": body["text"]}})

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/bot{token}/sendMessage", self._send)
        self.runner = runner = web.AppRunner(app, shutdown_timeout=0.1)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self) -> BotApi:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def shutdown() -> None:
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
            await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def built(shared_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Real NEARUSDT bars (April 2023) through the features and sessions stages; backtest split = one day."""
    return build_near_april(shared_archive, tmp_path_factory.mktemp("ops"))


def _get(url: str, token: str | None = TOKEN) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except urllib.error.URLError:
        return 0, b""  # not listening (yet)


def _post(url: str, token: str | None = TOKEN, body: dict[str, Any] | None = None) -> int:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    req = urllib.request.Request(url, data=json.dumps(body or {}).encode(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


@dataclass
class Live:
    """A running paper trader: its API, records, the replay clock stepper, the Bot API it notifies."""

    api: str
    db: Path
    bot: BotApi
    notifier: Notifier
    clock: Any
    handled: list[int] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    minute: int = 0

    def advance(self, n: int) -> None:
        """Release ``n`` more bars and wait until the trader has handled each (lock-step)."""
        for _ in range(n):
            self.minute += 1
            self.clock.advance_to(DAY0 + timedelta(minutes=self.minute))
            want = int((DAY0 + timedelta(minutes=self.minute - 1)).timestamp() * 1e6)
            with self.cond:
                assert self.cond.wait_for(lambda w=want: bool(self.handled) and self.handled[-1] >= w, 60)

    def records(self) -> Records:
        return Records(self.db)


@pytest.fixture(scope="module")
def live(built: Settings, shared_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    from rltrader.live.runner import run_trader
    from rltrader.sim import ReplayClock, ReplayData, ReplayServer, run_in_thread

    tmp = tmp_path_factory.mktemp("live")
    rows = parse_klines(read_zip_member(shared_archive / NEAR), source=NEAR, market=Market.FUTURES_UM,
                        symbol="NEARUSDT", interval="1m").rows
    store = ParquetStore(tmp / "store")
    store.write_klines(rows.filter(pl.col("open_time") < DAY0))
    store.close()
    settings = built.model_copy(update={
        "data": built.data.model_copy(update={"store_url": f"parquet://{tmp / 'store'}"}),
        "trader": built.trader.model_copy(update={"symbols": ["NEARUSDT"], "model": "sma_cross",
                                                  "history_bars": 0, "records_url": str(tmp / "t.db")})})
    day = rows.filter((pl.col("open_time") >= DAY0) & (pl.col("open_time") < DAY1 + pl.duration(minutes=5)))
    clock = ReplayClock(DAY0, 0.0, paused=True)
    server = ReplayServer(ReplayData(Market.FUTURES_UM, day), clock=clock, heartbeat_s=None)
    port = _free_port()
    old = os.environ.get("RLTRADER_API_TOKEN")
    os.environ["RLTRADER_API_TOKEN"] = TOKEN
    stop = threading.Event()
    with BotApi() as bot, run_in_thread(server) as srv:
        notifier = Notifier(telegram_token=BOT, telegram_chat="42", telegram_api=bot.url, batch_s=0.2,
                            min_interval_s=0.2)
        lv = Live(f"http://127.0.0.1:{port}", tmp / "t.db", bot, notifier, clock)

        def processed(sym: str, t: int) -> None:
            with lv.cond:
                lv.handled.append(t)
                lv.cond.notify_all()

        result: dict[str, Any] = {}
        worker = threading.Thread(target=lambda: result.update(run_trader(
            settings, mode="paper", rest_base=srv.rest_base_url, ws_base=srv.ws_base_url, max_seconds=900,
            stop_event=stop, handle_signals=False, mlflow_summary=False, on_processed=processed, api_port=port,
            notifier=notifier)))
        worker.start()
        try:
            import time

            deadline = time.monotonic() + 60
            while _get(f"{lv.api}/health")[0] != 200:
                assert worker.is_alive() and time.monotonic() < deadline, "the API did not come up"
                time.sleep(0.1)
            yield lv
        finally:
            stop.set()
            clock.advance_to(DAY0 + timedelta(minutes=lv.minute + 2))
            worker.join(60)
            if old is None:
                os.environ.pop("RLTRADER_API_TOKEN", None)
            else:
                os.environ["RLTRADER_API_TOKEN"] = old
    assert not worker.is_alive()


@pytest.mark.slow
def test_page_shows_fills_and_its_halt_button_halts_the_trader(live: Live) -> None:
    """Chromium loads /live (token asked once, kept in sessionStorage), shows the fills on the price chart and
    in the table; pressing Halt makes the trader HALTED between bars and no order is sent after that; the
    signals and closed trades reached the Bot API, batched."""
    from playwright.sync_api import sync_playwright

    rec = live.records()
    while len(rec.fills()) < 3 and live.minute < 1000:  # up to the third fill: a closed trade and a new entry
        live.advance(10)
    n_fills = len(rec.fills())
    assert n_fills >= 3
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 800})
        asked: list[str] = []

        def dialog(d: Any) -> None:
            asked.append(d.type)
            d.accept(TOKEN)

        page.on("dialog", dialog)
        page.goto(f"{live.api}/live")
        page.wait_for_function(f"Number(document.body.dataset.fills) >= {n_fills}", timeout=30_000)
        assert asked == ["prompt"]
        assert page.locator("#state").inner_text() == "ACTIVE"
        assert page.locator("#fills tr").count() - 1 == min(n_fills, 12)
        assert page.locator("#price path.fill").count() >= 2  # fill markers on the price chart
        assert page.locator("#positions td").first.inner_text() == "NEARUSDT"
        page.click("#halt")
        page.wait_for_function("document.getElementById('msg').textContent.includes('state HALTED')")
        assert asked == ["prompt"]  # the token came from sessionStorage
        page.wait_for_function("document.getElementById('state').textContent === 'HALTED'", timeout=30_000)
        halted = control.state_of(rec)
        assert halted["state"] == "HALTED" and halted["reason"] == "operator: halt (live page)"
        live.advance(300)
        page.wait_for_timeout(2500)  # one more poll: the page shows the blocked orders
        shot = page.screenshot(full_page=False)
        assert shot.startswith(b"\x89PNG") and len(shot) > 20_000
        if os.environ.get("UPDATE_DOCS_SCREENSHOTS"):  # the README's picture: docs/trader-page.png
            (REPO / "docs").mkdir(exist_ok=True)
            (REPO / "docs" / "trader-page.png").write_bytes(shot)
        browser.close()
    orders = rec.orders()
    before = {o["client_order_id"] for o in orders if o["written_at"] <= halted["updated_at"]}
    after = [o for o in orders if o["written_at"] > halted["updated_at"]]
    assert len(after) >= 1, "the trader kept deciding while halted"
    assert all(o["status"] == "blocked" and o["detail"] == "HALTED: operator: halt (live page)" for o in after)
    late = [f for f in rec.fills() if f["written_at"] > halted["updated_at"] and f["kind"] == "order"]
    assert all(f["client_order_id"] in before for f in late) and len(late) <= 1  # at most the one already sent
    assert len([d for d in rec.decisions() if d["written_at"] > halted["updated_at"]]) >= 299
    # metrics: state, orders by result, rejects by reason
    code, text = _get(f"{live.api}/metrics")
    assert code == 200
    assert 'rltrader_state{state="HALTED"} 1.0' in text.decode()
    assert f'rltrader_order_rejects_total{{reason="HALTED"}} {float(len(after))}' in text.decode()
    # notifications: signals and at least one closed trade, batched into fewer messages than events
    lines = [ln for m in live.bot.messages for ln in m["text"].splitlines()]
    assert live.bot.messages and all(m["chat_id"] == "42" for m in live.bot.messages)
    assert any("closed" in ln and "pnl" in ln for ln in lines)
    assert any(ln.startswith("NEARUSDT ") and " @ " in ln for ln in lines)
    assert len(live.bot.messages) < len(lines) and live.notifier.dropped == 0
    # resume through the API: ACTIVE again at the next bar
    assert _post(f"{live.api}/resume", body={"reason": "test"}) == 202
    live.advance(1)
    assert json.loads(_get(f"{live.api}/status")[1])["state"] == "ACTIVE"


def test_requests_without_or_with_a_wrong_token_get_401_and_change_nothing(live: Live) -> None:
    rec = live.records()
    before = (control.recent(rec, 1000), control.state_of(rec))
    for token in (None, "wrong-token"):
        for cmd in control.COMMANDS:
            assert _post(f"{live.api}/{cmd}", token, {"reason": "intruder"}) == 401
        for path in ("/status", "/orders", "/fills", "/pnl", "/equity", "/metrics"):
            assert _get(f"{live.api}{path}", token)[0] == 401, path
    assert _get(f"{live.api}/health", None)[0] == 200
    assert _get(f"{live.api}/live", None)[0] == 200  # the page itself holds no data
    live.advance(1)
    assert (control.recent(rec, 1000), control.state_of(rec)) == before


@pytest.mark.slow
def test_api_conforms_to_its_openapi_schema(live: Live) -> None:
    """schemathesis over every trader endpoint of the served OpenAPI schema, against the running paper trader:
    no 5xx, status codes, content types and bodies as documented. (Its pytest plugin's ``from_fixture`` does not
    run under pytest 9, so each operation's strategy is driven by hypothesis here.)"""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    auth = {"Authorization": f"Bearer {TOKEN}"}
    schema = schemathesis.openapi.from_url(f"{live.api}/openapi.json", headers=auth).include(tag="trader")
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in ops} >= {"/status", "/orders", "/fills", "/pnl", "/metrics", "/halt", "/flatten"}
    for op in ops:
        @given(case=op.as_strategy())
        @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: Any) -> None:
            case.call_and_validate(headers=auth)

        check()
    live.advance(1)  # the trader applies what the POSTs queued and keeps answering
    assert _get(f"{live.api}/status")[0] == 200


# -- the notifier on its own -----------------------------------------------------------------------------------
def test_notifier_posts_batched_signals_and_trades_in_the_bot_api_shape() -> None:
    from rltrader.live.gateway import Fill

    with BotApi() as bot:
        n = Notifier(telegram_token=BOT, telegram_chat="42", telegram_api=bot.url, batch_s=0.3, min_interval_s=0.0)
        for i in range(20):
            n.signal("BTCUSDT", "long", 100.0 + i, 0.75, i)
        n.on_fills([Fill("BTCUSDT", 0, "order", 2.0, 100.0, 0.08, 0.0, 0.0, 2.0, "c1"),
                    Fill("BTCUSDT", 600_000_000, "order", -2.0, 103.0, 0.0824, 0.0, 6.0, 0.0, "c2")])
        n.close(10)
    lines = [ln for m in bot.messages for ln in m["text"].splitlines()]
    assert n.sent == 21 and n.dropped == 0 and n.failed == 0
    assert 1 <= len(bot.messages) < 21  # batched
    assert lines[0] == "BTCUSDT long @ 100 conf 0.75"
    assert lines[-1] == "BTCUSDT long closed 100 -> 103: pnl +6.0000, fees 0.1624, held 10 min"
    assert {m["chat_id"] for m in bot.messages} == {"42"}


def test_a_full_queue_drops_and_counts_instead_of_blocking() -> None:
    with BotApi(hang=True) as bot:
        n = Notifier(telegram_token=BOT, telegram_chat="42", telegram_api=bot.url, maxsize=3, batch_s=0.0,
                     timeout_s=30)
        results = [n.signal("BTCUSDT", "long", 1.0, None, i) for i in range(50)]
        n.close(0.1)
    assert sum(results) <= 4 + 1 and n.dropped == 50 - sum(results) and n.sent == 0


@pytest.mark.slow
def test_a_hanging_notifier_does_not_hold_up_the_bar_loop(built: Settings, tmp_path: Path) -> None:
    """The same day driven bar by bar through the runner's per-bar step, once with a notifier whose Bot API
    never answers and once without: every bar is processed and the records are the same (counted, not timed);
    a halt issued through the CLI mid-run is applied by the next bar."""
    from typer.testing import CliRunner

    from rltrader.cli import app
    from rltrader.live.control import Controller
    from rltrader.live.runner import step

    store = ParquetStore(built.data.dir / "store")
    bars = bars_from_frame(store.read_klines("futures-um", "NEARUSDT", "1m"))
    store.close()
    t0 = int(DAY0.timestamp() * 1e6)
    day = [b for b in bars if b.time >= t0]

    def run(db: Path, notifier: Notifier | None) -> tuple[int, list[dict[str, Any]], list[dict[str, Any]]]:
        records = Records(db)
        trader = build_trader(built, mode="paper", symbols=["NEARUSDT"], model="sma_cross", records=records,
                              broker=PaperBroker(np.zeros(0)), until_us=int(DAY1.timestamp() * 1e6))
        ctl = Controller(trader)
        if notifier is not None:
            trader.gateway.fill_listeners.append(notifier.on_fills)
        trader.warm_up("NEARUSDT", (b for b in bars if b.time < t0))
        processed = 0
        for i, b in enumerate(day):
            if i == 900:
                res = CliRunner().invoke(app, ["trade", "halt", "--reason", "cli", "--records", str(db)])
                assert res.exit_code == 0, res.output
            step(trader, ctl, notifier, "NEARUSDT", b)
            processed += 1
        return processed, records.orders(), records.fills()

    with BotApi(hang=True) as bot:
        hung = Notifier(telegram_token=BOT, telegram_chat="42", telegram_api=bot.url, maxsize=5, batch_s=0.0,
                        timeout_s=60)
        n_hung, orders_hung, fills_hung = run(tmp_path / "hung.db", hung)
        assert hung.sent == 0 and hung.dropped > 0  # the sender is stuck in its first post; the queue overflowed
        hung.close(0.1)
    n_ref, orders_ref, fills_ref = run(tmp_path / "ref.db", None)
    assert n_hung == n_ref == len(day)
    assert [(o["bar_time"], o["qty"], o["status"]) for o in orders_hung] == \
        [(o["bar_time"], o["qty"], o["status"]) for o in orders_ref]
    assert [(f["time"], f["qty"], f["price"]) for f in fills_hung] == [(f["time"], f["qty"], f["price"])
                                                                       for f in fills_ref]
    res = CliRunner().invoke(app, ["trade", "status", "--records", str(tmp_path / "ref.db")], terminal_width=200)
    assert res.exit_code == 0 and "state HALTED (operator: halt (cli))" in res.output, res.output
    halted_at = day[900].time
    late = [o for o in orders_ref if o["bar_time"] > halted_at + 60_000_000]
    assert late and all(o["status"] == "blocked" for o in late)


@pytest.mark.slow
def test_stop_flatten_reconcile_reload_and_resume_between_bars(built: Settings, tmp_path: Path) -> None:
    """Driven bar by bar through the runner's step: `stop` lets only position-reducing orders out (sma_cross
    only flips, so none), `flatten`
    closes the position at the next bar and leaves REDUCING, `reconcile` finds the book and the fills agreeing,
    `reload` of a baseline reports it unchanged, `resume` trades again."""
    from rltrader.execution import QTY
    from rltrader.live.control import Controller
    from rltrader.live.runner import reload_model, step

    store = ParquetStore(built.data.dir / "store")
    bars = bars_from_frame(store.read_klines("futures-um", "NEARUSDT", "1m"))
    store.close()
    t0 = int(DAY0.timestamp() * 1e6)
    day = [b for b in bars if b.time >= t0]
    records = Records(tmp_path / "t.db")
    trader = build_trader(built, mode="paper", symbols=["NEARUSDT"], model="sma_cross", records=records,
                          broker=PaperBroker(np.zeros(0)), until_us=int(DAY1.timestamp() * 1e6))
    ctl = Controller(trader, reload=lambda: reload_model(trader, built))
    trader.warm_up("NEARUSDT", (b for b in bars if b.time < t0))
    book = trader.books["NEARUSDT"]
    marks: dict[int, float] = {}
    for i, b in enumerate(day[:1200]):
        if i == 200:
            control.stop(records, "test")
            stopped_at = control.state_of(records)["updated_at"]
        if i == 600:
            control.flatten(records, "test")
        if i == 601:
            assert book.acct[QTY, 0] == 0.0 and control.state_of(records)["state"] == "REDUCING"
            control.reconcile(records)
            control.reload(records)
        if i == 700:
            control.resume(records, "test")
            resumed_at = control.state_of(records)["updated_at"]
        step(trader, ctl, None, "NEARUSDT", b)
        marks[b.time] = float(book.acct[QTY, 0])
    orders = records.orders()
    during = [o for o in orders if stopped_at < o["written_at"] < resumed_at]
    blocked = [o for o in during if o["status"] == "blocked"]
    assert len(blocked) == len(during) > 0  # sma_cross only flips long <-> short: no order reduces, none went out
    assert {o["detail"].split(" (order")[0] for o in blocked} == {"REDUCING: operator: stop (test)",
                                                                 "REDUCING: operator: flatten"}
    held = [marks[b.time] for b in day[202:600]]  # from the fill of the order sent just before the stop
    assert held[0] != 0.0 and len(set(held)) == 1  # no new entries: the position was held until the flatten
    flat = [f for f in records.fills() if f["time"] == day[600].time]
    assert len(flat) == 1 and flat[0]["position_after"] == 0.0 and flat[0]["qty"] == -held[0]
    results = {c["command"]: c["result"] for c in control.recent(records)}
    assert results["flatten"].startswith("flattened NEARUSDT")
    assert results["reconcile"].startswith("consistent")
    assert results["reload"].startswith("reload: unchanged (sma_cross")
    assert not control.pending(records)
    after = [o for o in orders if o["written_at"] > resumed_at]
    assert any(o["status"] == "filled" for o in after)  # trading again after resume
