"""``rltrader trade``: the trader wired to the market-data stream, the records, a broker and MLflow.

Market data is the websocket ingester (:mod:`rltrader.data.stream`) with its REST hole repair, storing every
closed kline as ``rltrader data stream`` does; its ``on_kline`` hook hands each accepted closed kline (live or
repaired, exactly once, in order) to ``Trader.on_bar``. Before streaming, the last ``trader.history_bars`` stored
bars warm the incremental features up.

Keys (testnet) come only from ``RLTRADER_BINANCE_API_KEY`` / ``RLTRADER_BINANCE_API_SECRET``; they are passed to
python-binance's ``Client`` and nowhere else (not logged, not recorded, not sent to MLflow). Testnet URLs are
python-binance's own (``Client(testnet=True)``); ``trader.rest_base`` points the order path at a
Binance-compatible server instead.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np

from rltrader.data.schema import Market
from rltrader.data.store import open_store
from rltrader.errors import ConfigError
from rltrader.live.gateway import Bar, BinanceBroker, PaperBroker
from rltrader.live.records import open_records
from rltrader.live.risk import RiskState, set_state
from rltrader.live.trader import Trader, _event, bars_from_frame, build_trader

log = logging.getLogger(__name__)
KEY_VARS = ("RLTRADER_BINANCE_API_KEY", "RLTRADER_BINANCE_API_SECRET")


LIVE_FLAG = "--i-understand-this-trades-real-money"


def live_gate(mode: str, confirmed: bool, env: dict[str, str] | None = None) -> None:
    """``--mode live`` needs both the explicit flag and the keys; one message naming everything missing."""
    if mode != "live":
        return
    env = dict(os.environ if env is None else env)
    missing = ([] if confirmed else [LIVE_FLAG]) + [f"${v}" for v in KEY_VARS if not env.get(v)]
    if missing:
        raise ConfigError(f"trade --mode live trades real money and needs: {', '.join(missing)} (missing). "
                          "Try --mode paper, then --mode testnet, first.")


def exchange_client(market: str, rest_base: str | None, env: dict[str, str] | None = None, *,
                    mode: str = "testnet") -> Any:
    """python-binance ``Client`` with the trading keys: testnet, live (Binance itself), or ``rest_base`` (a
    Binance-compatible server)."""
    env = dict(os.environ if env is None else env)
    missing = [v for v in KEY_VARS if not env.get(v)]
    if missing:
        raise ConfigError(f"trade --mode {mode}: set {' and '.join(missing)} (the exchange API keys; they are read "
                          "from the environment only)")
    from binance.client import Client

    from rltrader.data.rest import _with_base

    key, secret = env[KEY_VARS[0]], env[KEY_VARS[1]]
    if rest_base is not None:
        return _with_base(Client, rest_base)(key, secret, ping=False)
    return Client(key, secret, testnet=mode != "live", ping=False)


def _broker(mode: str, market: str, rest_base: str | None, grace_s: float = 2.0) -> Any:
    xp = np.zeros(0)  # set by the trader from the execution params
    if mode == "paper":
        return PaperBroker(xp)
    return BinanceBroker(exchange_client(market, rest_base, mode=mode), market, xp, grace_s=grace_s)


def start_exchange_trader(settings: Any, trader: Trader, broker: BinanceBroker, symbols: Sequence[str],
                          mode: str = "testnet", rehandle: dict[str, int] | None = None) -> Any:
    """testnet/live start: account settings checked (refused otherwise), then recovery; the trader starts
    from the exchange's positions and stays HALTED unless recovery passed (see ``live.recovery``). A resumed
    session restores its account and filter state from the journal (``Trader.restore_from_journal``;
    ``rehandle``: per symbol, the bar it handles again first)."""
    from rltrader.live.recovery import check_account_settings, recover

    risk = settings.risk
    check_account_settings(broker.client, broker.market, symbols, risk.leverage, risk.margin_type)
    for sym in symbols:
        broker.accounts[sym] = trader.books[sym].acct
    # the journal's positions of this mode's sessions only: testnet and live are different accounts
    rec = recover(trader.records, broker, trader.gateway, symbols, tolerance=risk.position_tolerance,
                  journal_modes=(mode,))
    for sym, (q, entry) in rec.positions.items():
        if sym not in trader.books:
            continue
        if not trader.restore_from_journal(sym, (rehandle or {}).get(sym)):  # a new session: start from the
            trader.seed_position(sym, q, entry)  # exchange's position
        mine = trader.session_position(sym)
        if abs(mine - q) > risk.position_tolerance:
            set_state(trader.records, RiskState.HALTED,
                      f"{sym}: session account {mine:g} differs from the exchange position {q:g}")
    return rec


def resume_paper_trader(trader: Trader, symbols: Sequence[str]) -> dict[str, int]:
    """A killed paper session goes on where its journal ends: account, filters' and env state restored per
    symbol (``Trader.restore_from_journal``), on new bars. There is no exchange to reconcile with — the
    journal is the account. The one thing lost is the order in flight at the kill (decided, not yet filled):
    the paper broker held it in the process, so it is dropped and the next decision re-targets from the
    restored position (orders are target − position). Returns the journaled fills restored per symbol."""
    restored = {sym: trader.restore_from_journal(sym) for sym in symbols}
    dropped = [o["client_order_id"] for o in trader.records.open_orders(("paper",))
               if o["session_id"] == trader.session_id]
    for cid in dropped:
        trader.records.update_order(cid, "cancelled", detail="paper: in flight when the trader was killed; dropped")
    _event("paper_session_restored", session_id=trader.session_id, fills=restored, dropped_orders=dropped,
           positions={sym: trader.session_position(sym) for sym in symbols})
    return restored


def log_summary(settings: Any, summary: dict[str, Any], mode: str) -> str:
    """A run named ``trade`` in the MLflow experiment, tagged with the model version (no keys, no URLs)."""
    import mlflow
    from rltrader.agents.common import mlflow_run

    t = settings.train
    with mlflow_run(t.tracking_uri, t.experiment, "trade", t.artifact_root) as run:
        mlflow.set_tags({"mode": mode, "model": summary["model"], "model_version": summary["model_version"] or "",
                         "session_id": summary["session_id"]})
        metrics = {"equity": summary["equity"], "decisions": summary["decisions"]}
        for k in ("latency_ms_p50", "latency_ms_p99"):
            if summary[k] is not None:
                metrics[k] = summary[k]
        for sym, v in summary["symbols"].items():
            metrics.update({f"{sym}.equity": v["equity"], f"{sym}.fills": v["fills"], f"{sym}.fees": v["fees"]})
        mlflow.log_metrics(metrics)
        mlflow.log_dict(summary, "trade_summary.json")
        return str(run.info.run_id)


def run_trader(settings: Any, *, mode: str | None = None, symbols: Sequence[str] | None = None,
               model: str | None = None, rest_base: str | None = None, ws_base: str | None = None,
               until: datetime | None = None, max_seconds: float | None = None,
               stop_event: threading.Event | None = None, handle_signals: bool = True,
               mlflow_summary: bool = True, on_processed: Any = None, api_port: int | None = None,
               api_host: str = "127.0.0.1", notifier: Any = None, confirm_live: bool = False,
               grace_s: float = 2.0) -> dict[str, Any]:
    """Run the trader until stopped (signal, ``stop_event``, ``max_seconds``) or every symbol reached ``until``.
    ``on_processed(symbol, bar_time)``: called once a closed bar is fully handled (lock-step replays, tests).
    ``api_port``: serve the control/status API and the live page in a thread beside the loop (``rltrader trade
    --api-port``). ``notifier``: a :class:`rltrader.live.notify.Notifier` (default: from the environment, if set)."""
    from rltrader.data.stream import stream
    from rltrader.live.control import Controller
    from rltrader.live.notify import Notifier
    from rltrader.live.policy import alias_moved, resolve

    cfg = settings.trader
    mode = mode or cfg.mode
    symbols = [s.strip().upper() for s in (symbols or cfg.symbols)]
    model = model or cfg.model
    rest_base = rest_base if rest_base is not None else cfg.rest_base
    ws_base = ws_base if ws_base is not None else cfg.ws_base
    market = Market(cfg.market)
    want = "spot" if market is Market.SPOT else "futures"
    if settings.execution.market != want:
        raise ConfigError(f"trader.market {market.value} trades execution.market {want!r}; params say "
                          f"{settings.execution.market!r}")
    live_gate(mode, confirm_live)
    broker = _broker(mode, want, rest_base, grace_s)
    records = open_records(cfg.records_url, settings.data.dir, durable=mode != "paper",
                           bounds=settings.postgres.bounds())
    until_us = None if until is None else int(until.timestamp() * 1_000_000)
    resume_id = records.unfinished_session(mode, symbols)
    trader = build_trader(settings, mode=mode, symbols=symbols, model=model, records=records, broker=broker,
                          until_us=until_us, session_id=resume_id)
    if resume_id is not None:
        _event("session_resumed", session_id=resume_id)
    if trader.module is not None:
        import torch

        torch.set_num_threads(1)  # one row per bar: intra-op threads only add wake-ups to the latency
    controller = Controller(trader, reload=lambda: reload_model(trader, settings))
    if isinstance(broker, BinanceBroker):
        start_exchange_trader(settings, trader, broker, symbols, mode)
    elif resume_id is not None:
        resume_paper_trader(trader, symbols)
    notifier = notifier if notifier is not None else Notifier.from_env()
    if notifier is not None:
        trader.gateway.fill_listeners.append(notifier.on_fills)
    api = None
    if api_port is not None:
        from rltrader.api.app import serve_in_thread

        api = serve_in_thread(host=api_host, port=api_port, records_url=records.url)
    store = open_store(settings.data.store_url, settings.data.dir, settings.postgres.bounds())
    stop = stop_event or threading.Event()
    try:
        for sym in symbols:
            hist = store.read_klines(market.value, sym, settings.ingest.interval)
            if cfg.history_bars and hist.height > cfg.history_bars:
                hist = hist.sort("open_time").tail(cfg.history_bars)
            n = trader.warm_up(sym, bars_from_frame(hist))
            _event("trader_warm_up", symbol=sym, bars=n)
        last_bar: dict[str, Bar] = {}
        state = {"minute": 0}

        def on_kline(row: tuple[Any, ...]) -> None:
            sym = row[1]
            if sym not in trader.books:
                return
            bar = Bar(int(row[3]), float(row[4]), float(row[5]), float(row[6]), float(row[7]), float(row[8]),
                      float(row[11]), float(row[12]))
            last_bar[sym] = bar
            # a bar that arrives long after its close is a REST repair catching up: decided, but no new risk
            # (on Binance's clock only; a replay's bars are old by construction)
            stale_s = settings.risk.stale_after_s
            if rest_base is None and stale_s > 0 and time.time() - (bar.time / 1e6 + 60.0) > stale_s:
                trader.catching_up.add(sym)
            else:
                trader.catching_up.discard(sym)
            step(trader, controller, notifier, sym, bar)
            if cfg.follow_champion and bar.time // 60_000_000 != state["minute"]:
                state["minute"] = bar.time // 60_000_000
                _maybe_reload(trader, settings, alias_moved, resolve)
            if until_us is not None and trader.finished >= set(symbols):
                stop.set()
            if on_processed is not None:
                on_processed(sym, bar.time)

        stream_cfg = settings.stream.model_copy(update={"market": market, "symbols": symbols,
                                                        "rest_base": rest_base, "ws_base": ws_base})
        stream(stream_cfg, store, stop_event=stop, max_seconds=max_seconds, handle_signals=handle_signals,
               on_kline=on_kline)
        if cfg.flatten_on_stop:  # the one order a stop sends, when params ask for it
            for sym, bar in last_bar.items():
                if sym not in trader.finished:
                    trader._flatten(sym, bar, "stop")
        trader.stopping = True  # SIGTERM / stop: no new orders from here on (every journal write is committed)
    finally:
        store.close()
        if notifier is not None:
            notifier.close()
        if api is not None:
            api.stop()
    summary = trader.summary()
    summary.update(mode=mode, symbols_traded=symbols)
    records.end_session(trader.session_id, summary)
    if mlflow_summary:
        summary["mlflow_run_id"] = log_summary(settings, summary, mode)
    records.close()
    return summary


def step(trader: Trader, controller: Any, notifier: Any, symbol: str, bar: Bar) -> Any:
    """One closed bar: the trader's decision, its signal to the notifier (a queue put, never a wait), then the
    operator commands queued since the last bar. The runner's per-bar body; tests drive it directly."""
    from rltrader.live.notify import confidence

    decision = trader.on_bar(symbol, bar)
    if notifier is not None and decision is not None and decision.target is not None:
        notifier.signal(symbol, trader.action_names[decision.action], bar.close,
                        confidence(decision.scores, decision.action), decision.bar_time)
    if controller is not None:
        controller.on_bar(symbol, bar)
    trader.between_bars()  # the order is out: commit the decision rows, checkpoint, gc
    return decision


def reload_model(trader: Trader, settings: Any) -> str:
    """``reload`` command: re-resolve the model spec (the ``champion`` alias) now, between bars."""
    from rltrader.live.policy import resolve

    current = trader.resolved
    if current is None:
        return "reload: no resolved model (a bare policy)"
    new = resolve(settings, current.spec, trader.env_params.mode)
    if new.version == current.version and new.uri == current.uri:
        return f"reload: unchanged ({current.uri} version {current.version})"
    _switch(trader, current, new)
    return f"reload: {current.version} -> {new.version}"


def _switch(trader: Trader, current: Any, new: Any) -> None:
    trader.policy, trader.model_version, trader.policy_name = new.policy, new.version, new.uri
    trader.module = new.policy if getattr(new.policy, "kind", None) is not None else None
    trader.resolved = new
    trader.records.set_model_version(trader.session_id, new.version, new.uri)
    _event("model_reloaded", model=new.uri, version=new.version, previous=current.version)


def _maybe_reload(trader: Trader, settings: Any, alias_moved: Any, resolve: Any) -> None:
    """``trader.follow_champion``: between bars, load the alias's new version and record the switch."""
    current = trader.resolved
    version = alias_moved(settings, current)
    if version is None:
        return
    new = resolve(settings, current.spec, trader.env_params.mode)
    _switch(trader, current, new)

