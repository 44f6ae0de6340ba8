"""Signal and trade notifications to a webhook and/or Telegram, off the trading thread.

Why a background thread with a bounded queue: a notification is a network call to somebody else's server, which
can be slow, fail or hang; the trader's bar loop only does ``queue.put_nowait`` (O(1), never blocks). When the
queue is full the message is dropped and counted (``dropped``), never waited for. The sender thread batches what
is queued (one message per ``batch_s`` window at most, several lines joined) and keeps at least
``min_interval_s`` between posts (Telegram allows about one message per second per chat), so a burst of signals
becomes a few messages instead of a ban.

Sinks (either or both):

- a webhook: ``POST <url>`` with JSON ``{"text": "...", "events": [...]}`` (Slack/Mattermost-compatible ``text``);
- the Telegram Bot API: ``POST <api>/bot<token>/sendMessage`` with ``chat_id`` and ``text`` (its documented shape).

Configuration from the environment only (the bot token is a secret: never logged, never recorded):
``RLTRADER_NOTIFY_WEBHOOK``, ``RLTRADER_TELEGRAM_BOT_TOKEN``, ``RLTRADER_TELEGRAM_CHAT_ID`` and
``RLTRADER_TELEGRAM_API`` (default ``https://api.telegram.org``; a test points it at a loopback server).
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)
ENV_WEBHOOK = "RLTRADER_NOTIFY_WEBHOOK"
ENV_TG_TOKEN = "RLTRADER_TELEGRAM_BOT_TOKEN"
ENV_TG_CHAT = "RLTRADER_TELEGRAM_CHAT_ID"
ENV_TG_API = "RLTRADER_TELEGRAM_API"


def confidence(scores: Sequence[float] | Any, action: int) -> float | None:
    """The chosen action's softmax probability over the policy's scores (None for a rule baseline)."""
    if scores is None or not len(scores):
        return None
    m = max(scores)
    ex = [math.exp(float(s) - m) for s in scores if math.isfinite(float(s))]
    total = sum(ex)
    return math.exp(float(scores[action]) - m) / total if total and math.isfinite(float(scores[action])) else None


@dataclass
class TradeTracker:
    """Turns fills into closed trades: a trade opens when a position leaves flat and closes when it returns to flat
    or flips (a flip opens the next one at the same fill)."""

    open_: dict[str, dict[str, float]] = field(default_factory=dict)

    def on_fill(self, symbol: str, time_us: int, qty: float, price: float, fee: float, realized: float,
                position_after: float) -> dict[str, Any] | None:
        t = self.open_.get(symbol)
        if t is None:
            if position_after == 0.0 or qty == 0.0:
                return None
            t = self.open_[symbol] = {"opened": float(time_us), "pnl": 0.0, "fees": 0.0, "entry": price,
                                      "side": 1.0 if qty > 0 else -1.0}
        t["pnl"] += realized
        t["fees"] += fee
        if position_after * t["side"] > 0.0:
            return None  # still open (added to or partly reduced)
        del self.open_[symbol]
        if position_after != 0.0:  # flipped through flat: this fill also opens the next trade
            self.open_[symbol] = {"opened": float(time_us), "pnl": 0.0, "fees": 0.0, "entry": price,
                                  "side": 1.0 if position_after > 0 else -1.0}
        return {"type": "trade", "symbol": symbol, "side": "long" if t["side"] > 0 else "short",
                "entry": t["entry"], "exit": price, "pnl": t["pnl"], "fees": t["fees"],
                "net": t["pnl"] - t["fees"], "holding_s": (time_us - t["opened"]) / 1e6}


def format_event(e: Mapping[str, Any]) -> str:
    if e.get("type") == "signal":
        conf = "" if e.get("confidence") is None else f" conf {e['confidence']:.2f}"
        return f"{e['symbol']} {e['action']} @ {e['price']:g}{conf}"
    return (f"{e['symbol']} {e['side']} closed {e['entry']:g} -> {e['exit']:g}: pnl {e['pnl']:+.4f}, "
            f"fees {e['fees']:.4f}, held {e['holding_s'] / 60:.0f} min")


class Notifier:
    """Bounded queue + one sender thread; ``signal``/``trade``/``on_fills`` never block the caller."""

    def __init__(self, *, webhook: str | None = None, telegram_token: str | None = None,
                 telegram_chat: str | None = None, telegram_api: str = "https://api.telegram.org",
                 maxsize: int = 1000, batch_s: float = 1.0, min_interval_s: float = 1.0,
                 timeout_s: float = 10.0) -> None:
        if telegram_token and not telegram_chat:
            raise ValueError(f"notify: {ENV_TG_TOKEN} is set but {ENV_TG_CHAT} is not")
        self.webhook, self.tg_token, self.tg_chat = webhook, telegram_token, telegram_chat
        self.tg_api = telegram_api.rstrip("/")
        self.batch_s, self.min_interval_s, self.timeout_s = batch_s, min_interval_s, timeout_s
        self.q: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=maxsize)
        self.dropped = 0
        self.sent = 0
        self.failed = 0
        self.trades = TradeTracker()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rltrader-notify", daemon=True)
        self._thread.start()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **kw: Any) -> Notifier | None:
        env = os.environ if env is None else env
        webhook, token = env.get(ENV_WEBHOOK) or None, env.get(ENV_TG_TOKEN) or None
        if webhook is None and token is None:
            return None
        return cls(webhook=webhook, telegram_token=token, telegram_chat=env.get(ENV_TG_CHAT) or None,
                   telegram_api=env.get(ENV_TG_API) or "https://api.telegram.org", **kw)

    # -- producer side (the trading thread) -------------------------------------------------------------
    def put(self, event: dict[str, Any]) -> bool:
        try:
            self.q.put_nowait(event)
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def signal(self, symbol: str, action: str, price: float, confidence: float | None, bar_time: int) -> bool:
        return self.put({"type": "signal", "symbol": symbol, "action": action, "price": price,
                         "confidence": confidence, "bar_time": bar_time})

    def on_fills(self, fills: Sequence[Any]) -> None:
        """The order gateway's fill listener: a fill that returns a position to flat closes a trade."""
        for f in fills:
            t = self.trades.on_fill(f.symbol, f.time, f.qty, f.price, f.fee, f.realized, f.position_after)
            if t is not None:
                self.put(t)

    # -- the sender thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        last = 0.0
        while not self._stop.is_set() or not self.q.empty():
            try:
                first = self.q.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + self.batch_s
            while len(batch) < 50:
                left = deadline - time.monotonic()
                try:  # closing: take what is queued without waiting for more
                    batch.append(self.q.get_nowait() if self._stop.is_set() or left <= 0 else
                                 self.q.get(timeout=left))
                except queue.Empty:
                    break
            wait = self.min_interval_s - (time.monotonic() - last)
            if wait > 0:
                self._stop.wait(wait)  # rate limit (cut short when closing)
            last = time.monotonic()
            self._send(batch)

    def _post(self, url: str, body: dict[str, Any]) -> None:
        req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            resp.read()

    def _send(self, batch: list[dict[str, Any]]) -> None:
        text = "\n".join(format_event(e) for e in batch)
        ok = True
        if self.webhook:
            try:
                self._post(self.webhook, {"text": text, "events": batch})
            except Exception as exc:  # a notifier failure must never reach the trader
                ok = False
                log.warning(json.dumps({"event": "notify_failed", "sink": "webhook", "error": type(exc).__name__}))
        if self.tg_token:
            try:
                self._post(f"{self.tg_api}/bot{self.tg_token}/sendMessage", {"chat_id": self.tg_chat, "text": text})
            except Exception as exc:  # the URL holds the token: log only the error type
                ok = False
                log.warning(json.dumps({"event": "notify_failed", "sink": "telegram", "error": type(exc).__name__}))
        if ok:
            self.sent += len(batch)
        else:
            self.failed += len(batch)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread after draining what is queued (bounded by ``timeout``; a hung sink is abandoned)."""
        self._stop.set()
        self._thread.join(timeout)
