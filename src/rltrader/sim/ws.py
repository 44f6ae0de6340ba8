"""The replay server's websocket streams: ``<symbol>@kline_<interval>``, ``<symbol>@aggTrade`` and futures'
``<pair>_perpetual@continuousKline_<interval>``, raw (``/ws/…``) and combined (``/stream?streams=…``).

Events are sent when the replay clock reaches their event time. A client that reconnects continues from the
clock's current position, so whatever was sent while it was away is lost, exactly the situation REST repair
exists for. The stream faults (:class:`rltrader.sim.Faults`) are applied here, counted per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import re
from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from aiohttp import WSMsgType, web

from rltrader.sim.clock import ReplayClock
from rltrader.sim.data import CandleState, ReplayData, SymbolData, fmt
from rltrader.sim.faults import Faults, MalformedKind, ServerStats
from rltrader.sim.rest import MANDATORY, dumps

log = logging.getLogger(__name__)

_STREAM_RE = re.compile(r"^([a-z0-9]+)@(aggTrade|kline_[0-9]+[smhdwM])$")
_CONTINUOUS_RE = re.compile(r"^([a-z0-9]+)_perpetual@continuousKline_([0-9]+[smhdwM])$")


class MarketStreams:
    """Websocket handlers; mixed into :class:`rltrader.sim.ReplayServer`, which sets these attributes."""

    data: ReplayData
    clock: ReplayClock
    faults: Faults
    stats: ServerStats
    heartbeat_s: float | None
    _spot: bool
    _update_ms: int
    _sockets: set[web.WebSocketResponse]
    _tasks: set[asyncio.Task[None]]

    def _kline_event(self, sd: SymbolData, i: int, st: CandleState, closed: bool, e_ms: int,
                     micro: bool, continuous: bool = False) -> dict[str, Any]:
        event = {
            "e": "kline", "E": e_ms * 1000 if micro else e_ms, "s": sd.symbol,
            "k": {
                "t": sd.open_us[i] if micro else sd.open_ms[i],
                "T": sd.close_us[i] if micro else sd.close_ms[i],
                "s": sd.symbol, "i": self.data.interval, "f": st.f, "L": st.last,
                "o": fmt(st.o, sd.price_dec), "c": fmt(st.c, sd.price_dec), "h": fmt(st.h, sd.price_dec),
                "l": fmt(st.l, sd.price_dec), "v": fmt(st.v, sd.qty_dec), "n": st.n, "x": closed,
                "q": fmt(st.q, sd.quote_dec), "V": fmt(st.bv, sd.qty_dec), "Q": fmt(st.bq, sd.quote_dec),
                "B": "0",
            },
        }
        if continuous:  # futures' <pair>_perpetual@continuousKline_<interval>: same candle, other envelope
            k = event["k"]
            assert isinstance(k, dict)
            del k["s"]
            return {"e": "continuous_kline", "E": event["E"], "ps": sd.symbol, "ct": "PERPETUAL", "k": k}
        return event

    def _kline_events(self, sd: SymbolData, stream: str, from_ms: int, micro: bool,
                      continuous: bool = False) -> Iterator[tuple[int, str, dict[str, Any]]]:
        """In-progress updates then the closed candle, for every candle whose events are not yet due.

        With trades, an update goes out at the end of each push interval in which trades happened, carrying
        everything traded so far; without, the two synthetic states. The closed candle (x=true) follows at
        close time + 1 ms, when the exchange publishes it.
        """
        upd = self._update_ms
        for i in range(bisect_left(sd.close_ms, from_ms - 1), len(sd.open_ms)):
            t, t_close = sd.open_ms[i], sd.close_ms[i]
            lo, hi = sd.tr_lo[i], sd.tr_hi[i]
            if hi > lo:
                st: CandleState | None = None
                window: int | None = None
                for j in range(lo, hi):
                    w = (sd.t_ms[j] - t) // upd
                    if window is not None and w != window and st is not None:
                        e = t + (window + 1) * upd
                        if from_ms <= e <= t_close:
                            yield e, stream, self._kline_event(sd, i, st, False, e, micro, continuous)
                    st = self.data.add_trade(st, sd, j)
                    window = w
                if window is not None and st is not None:
                    e = t + (window + 1) * upd
                    if from_ms <= e <= t_close:
                        yield e, stream, self._kline_event(sd, i, st, False, e, micro, continuous)
            else:
                for e, s in self.data.synthetic(sd, i):
                    if e >= from_ms:
                        yield e, stream, self._kline_event(sd, i, s, False, e, micro, continuous)
            e = t_close + 1
            if e >= from_ms:
                yield e, stream, self._kline_event(sd, i, self.data.final(sd, i), True, e, micro,
                                                   continuous)

    def _trade_events(self, sd: SymbolData, stream: str, from_ms: int,
                      micro: bool) -> Iterator[tuple[int, str, dict[str, Any]]]:
        for j in range(bisect_left(sd.t_ms, from_ms), len(sd.a)):
            e = sd.t_ms[j]
            d = {"e": "aggTrade", "E": e * 1000 if micro else e, "s": sd.symbol, **self.data.trade_json(sd, j, micro)}
            yield e, stream, d

    def _events(self, streams: Sequence[str], from_ms: int,
                micro: bool) -> Iterator[tuple[int, str, dict[str, Any]]]:
        gens: list[Iterator[tuple[int, str, dict[str, Any]]]] = []
        for stream in streams:
            m = _STREAM_RE.match(stream)
            cm = None if m or self._spot else _CONTINUOUS_RE.match(stream)
            name = m.group(1) if m else cm.group(1) if cm else ""
            sd = self.data.symbols.get(name.upper())
            if sd is None:
                # The exchange accepts such subscriptions and sends nothing; say so here at least.
                log.warning("replay: stream %r has no data in this replay; nothing is sent for it", stream)
                continue
            kind = m.group(2) if m else f"continuous_{cm.group(2) if cm else ''}"
            if kind == f"continuous_{self.data.interval}":
                gens.append(self._kline_events(sd, stream, from_ms, micro, continuous=True))
            elif kind == "aggTrade":
                gens.append(self._trade_events(sd, stream, from_ms, micro))
            elif kind == f"kline_{self.data.interval}":
                gens.append(self._kline_events(sd, stream, from_ms, micro))
            else:
                log.warning("replay: %r: only kline_%s is replayed", stream, self.data.interval)
        return heapq.merge(*gens, key=lambda ev: ev[0])

    @staticmethod
    def _malformed(kind: MalformedKind, stream: str, data: Mapping[str, Any], combined: bool) -> str:
        if kind == "not_json":
            # A frame cut off mid-object, as a truncated write would leave it.
            return '{"stream":"' + stream + '","data":{"e":"' + str(data.get("e")) + '",'
        broken = {"e": data.get("e"), "E": data.get("E"), "s": data.get("s"),
                  "k": "?" if "k" in data else None}
        return dumps({"stream": stream, "data": broken} if combined else broken)

    async def _ws_combined(self, request: web.Request) -> web.StreamResponse:
        raw = request.query.get("streams", "")
        micro = request.query.get("timeUnit", "").upper() == "MICROSECOND"
        if "?" in raw:  # python-binance appends "?timeUnit=…" to the path even after "?streams="
            raw, _, extra = raw.partition("?")
            micro = micro or extra.upper().endswith("MICROSECOND")
        streams = [s for s in raw.split("/") if s]
        if not streams:
            raise web.HTTPBadRequest(text=dumps({"code": -1102, "msg": MANDATORY.format("streams")}),
                                     content_type="application/json")
        return await self._serve_ws(request, streams, combined=True, micro=micro and self._spot)

    async def _ws_raw(self, request: web.Request) -> web.StreamResponse:
        streams = [s for s in request.match_info["streams"].split("/") if s]
        micro = request.query.get("timeUnit", "").upper() == "MICROSECOND"
        return await self._serve_ws(request, streams, combined=False, micro=micro and self._spot)

    async def _serve_ws(self, request: web.Request, streams: list[str], *, combined: bool,
                        micro: bool) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=self.heartbeat_s, autoping=True)
        await ws.prepare(request)
        self.stats.connections += 1
        self.stats.active_connections += 1
        self._sockets.add(ws)
        pump = asyncio.ensure_future(self._pump(ws, request, streams, combined, micro))
        self._tasks.add(pump)
        try:
            async for msg in ws:  # keeps control frames flowing and notices the client leaving
                if msg.type == WSMsgType.TEXT:
                    await self._on_client_text(ws, msg.data)
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
            self._tasks.discard(pump)
            self._sockets.discard(ws)
            self.stats.active_connections -= 1
        return ws

    async def _on_client_text(self, ws: web.WebSocketResponse, text: str) -> None:
        """Live SUBSCRIBE/UNSUBSCRIBE is not replayed; answer as the exchange answers a request it rejects."""
        try:
            req = json.loads(text)
            req_id = req.get("id") if isinstance(req, dict) else None
        except ValueError:
            req_id = None
        await ws.send_str(dumps({"error": {"code": 2, "msg": "Invalid request: the replay server serves the "
                                            "streams named in the URL only"}, "id": req_id}))

    async def _pump(self, ws: web.WebSocketResponse, request: web.Request, streams: list[str], combined: bool,
                    micro: bool) -> None:
        sent = 0
        stalled = False
        try:
            for e_ms, stream, data in self._events(streams, self.clock.now_ms(), micro):
                await self.clock.wait_until(e_ms)
                faults = self.faults
                if faults.drop_after is not None and sent >= faults.drop_after:
                    # Break instead of sending message drop_after + 1, now that it is due. Not right after
                    # the last write: the client would then notice the closed connection while the last
                    # messages still sat unread in its buffers and lose a varying number of them.
                    self.stats.drops += 1
                    transport = request.transport
                    if transport is not None:
                        transport.abort()  # no close frame: the client sees a broken connection
                    return
                if faults.stall_after is not None and sent >= faults.stall_after and not stalled:
                    stalled = True
                    self.stats.stalls += 1
                    await asyncio.sleep(faults.stall_seconds)
                await ws.send_str(dumps({"stream": stream, "data": data} if combined else data))
                sent += 1
                self.stats.messages_sent += 1
                # send_str only suspends when the socket buffer is full; without this a fast replay would
                # monopolise the event loop (and starve a client or other connections sharing it).
                await asyncio.sleep(0)
                if faults.malformed_every is not None and sent % faults.malformed_every == 0:
                    await ws.send_str(self._malformed(faults.malformed_kind, stream, data, combined))
                    self.stats.malformed_sent += 1
        except (ConnectionResetError, RuntimeError) as exc:  # client went away mid-send
            log.debug("replay: websocket send ended: %s", exc)
