"""The trader's pending queue (``execution.latency_bars > 0``) rebuilt from the journal, for a resumed session.

With latency ``lat``, ``Trader._decide`` holds the order of its decision number ``k`` back ``lat`` decisions: it
sits in ``Trader.queued[(symbol, k + lat)]`` and in ``book.pending[0, k % (lat + 1)]`` (the committed quantity
the env's ``committed()`` adds to the position) until decision ``k + lat`` sends it. Those orders are in no
journal table until they are sent, so a restart that rebuilt only the account would lose the last ``lat``
decisions' orders and size its next orders against a wrong committed position.

They need no extra state: every decision that advances the queue is journaled (``decisions``: every row but the
"no new risk" holds, which return before the queue moves) with its ``target`` and the ``position`` it was taken
at, and its reference price is the decided-on bar's close (``marks.price``). Replaying ``_decide``'s queue steps
over those rows — committed = position + pending, the order re-derived with ``OrderGateway.order_for_target``
(so the same quantity and the same client order id, which the journal and the exchange dedupe) — gives the
queue, the slots and the decision count bit for bit as the uninterrupted run left them."""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

import numpy as np

from rltrader.errors import DataError
from rltrader.live.gateway import OrderGateway, OrderRequest
from rltrader.live.records import Records

BAR_US = 60_000_000


@dataclass
class QueueState:
    """``_decide``'s queue after the replayed decisions: decision count, slots, the held orders by due
    decision number, and per replayed decision (its bar's open time) whether any slot was left non-zero."""

    k: int
    pending: np.ndarray
    queued: dict[int, OrderRequest]
    times: list[int] = field(default_factory=list)
    any_pending: list[bool] = field(default_factory=list)

    def pending_at(self, bar_time: int) -> bool | None:
        """Whether orders were in the queue when bar ``bar_time`` settled (after the decision for that bar);
        None before the first replayed decision."""
        i = bisect_right(self.times, bar_time)
        return self.any_pending[i - 1] if i else None


def replay_queue(records: Records, gateway: OrderGateway, session_id: str, symbol: str, latency: int,
                 through: int | None) -> QueueState:
    """The queue as ``_decide`` left it after the session's decisions for bars up to ``through`` (open time;
    all of them when None), from the journal alone. Latency 0: nothing is ever held, and the count is unused
    (every slot is ``0 % 1``): the journal is not read."""
    nslot = latency + 1
    pending = np.zeros((1, nslot))
    queued: dict[int, OrderRequest] = {}
    state = QueueState(0, pending, queued)
    if latency == 0:
        return state
    closes: dict[int, float] | None = None
    k = 0
    for d in records.decisions(session_id, symbol):
        t = int(d["bar_time"])
        if through is not None and t > through:
            break
        if str(d["reason"]).startswith("no new risk"):
            continue  # returned before the queue moved
        committed = float(np.float64(d["position"]) + pending[0].sum())  # ``SymbolBook.committed``
        pending[0, k % nslot] = 0.0
        if d["target"] is not None:
            if closes is None:
                closes = {int(m["bar_time"]): float(m["price"]) for m in records.marks(session_id, symbol)}
            ref = closes.get(t - BAR_US)
            if ref is None:
                raise DataError(f"journal of session {session_id}: decision {symbol}@{t} has no mark of the bar "
                                "it was decided on (its order's reference price)")
            req = gateway.order_for_target(symbol, t, float(d["target"]), committed, ref, str(d["reason"]))
            if req is not None:
                pending[0, k % nslot] = req.qty
                queued[k + latency] = req
        queued.pop(k, None)  # sent by this decision
        pending[0, (k - latency) % nslot] = 0.0
        state.times.append(t)
        state.any_pending.append(bool(pending[0].any()))
        k += 1
    state.k = k
    return state


__all__ = ["QueueState", "replay_queue"]
