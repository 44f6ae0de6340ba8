"""REST hole repair of the live ingester: what the stream missed is fetched from REST before it moves on.

A mixin of :class:`rltrader.data.stream.StreamIngester` (split out of that module, no behaviour change): on every
(re)connect the ingester repairs from its per-symbol cursors to the server's now, and a message that skips
ahead of its cursor (a trade id or a candle beyond the next one) is held until the hole before it is fetched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import polars as pl

from rltrader.data.rest import RestPolicy, fetch_agg_trades_async, fetch_klines_async
from rltrader.data.schema import AGG_TRADE_SCHEMA, KLINE_SCHEMA, Market, epoch_to_us
from rltrader.data.stream_common import GAP_KLINE, GAP_TRADE, Columns, Reconnect, dt, epoch_us, event

if TYPE_CHECKING:
    from rltrader.data.stream import StreamStats, _SymbolState


class RestRepair:
    """The REST half of :class:`~rltrader.data.stream.StreamIngester`; the attributes are the ingester's."""

    market: Market
    interval: str
    step_us: int
    since: datetime | None
    rest_policy: RestPolicy
    on_kline: Callable[[tuple[Any, ...]], None] | None
    stats: StreamStats
    _state: dict[str, _SymbolState]
    _client: Any
    _klines: Columns
    _trades: Columns
    _wake: asyncio.Event

    def _on_message(self, msg: Any) -> int:
        raise NotImplementedError  # the ingester's message accounting

    def _stopping(self) -> bool:
        raise NotImplementedError  # the ingester's stop event / deadline

    async def _sleep(self, seconds: float) -> None:
        raise NotImplementedError  # the ingester's stop-aware sleep

    # -- REST repair -------------------------------------------------------------------------------------
    async def _repair(self, sym: str, *, klines: bool = True, trades: bool = True,
                      kline_end_us: int | None = None) -> None:
        """Fetch through REST what lies between the cursors and the server's now (or ``kline_end_us``).

        Every request is bounded (``rest_policy.timeout_s``), back-offs wake on the stop, and the stop is asked
        before every page (:class:`~rltrader.data.rest.RestStopped`): a repair never outlives a stop.
        """
        st = self._state[sym]
        n_k = n_t = 0
        if klines and (st.last_kline_us is not None or self.since is not None):
            start = st.last_kline_us + self.step_us if st.last_kline_us is not None else epoch_us(self.since)  # type: ignore[arg-type]
            df = await fetch_klines_async(self._client, self.market, sym, self.interval, dt(start),
                                          None if kline_end_us is None else dt(kline_end_us),
                                          policy=self.rest_policy, sleep=self._sleep, stop=self._stopping)
            rows = df.select(*[pl.col(c).dt.epoch("us") if c in ("open_time", "close_time") else pl.col(c)
                               for c in KLINE_SCHEMA]).rows()
            for row in rows:
                if st.last_kline_us is None or row[3] > st.last_kline_us:
                    self._klines.append(row)
                    st.last_kline_us = row[3]
                    n_k += 1
                    if self.on_kline is not None:
                        self.on_kline(row)
        if trades and (st.last_trade_id is not None or self.since is not None):
            if st.last_trade_id is not None:
                df = await fetch_agg_trades_async(self._client, self.market, sym, from_id=st.last_trade_id + 1,
                                                  policy=self.rest_policy, sleep=self._sleep, stop=self._stopping)
            else:
                df = await fetch_agg_trades_async(self._client, self.market, sym, start=self.since,
                                                  policy=self.rest_policy, sleep=self._sleep, stop=self._stopping)
            rows = df.select(*[pl.col(c).dt.epoch("us") if c == "transact_time" else pl.col(c)
                               for c in AGG_TRADE_SCHEMA]).rows()
            for row in rows:
                a = row[2]
                if st.last_trade_id is None or a > st.last_trade_id:
                    self._trades.append(row)
                    st.last_trade_id = a
                    st.bars.add(row[7], a, row[3], row[4], row[8])
                    n_t += 1
        self.stats.repairs += 1
        self.stats.repaired_candles += n_k
        self.stats.repaired_trades += n_t
        if n_k or n_t:
            event(logging.INFO, "stream_repaired", symbol=sym, candles=n_k, trades=n_t,
                   kline_cursor=None if st.last_kline_us is None else dt(st.last_kline_us).isoformat(),
                   trade_cursor=st.last_trade_id)
            self._wake.set()

    async def _resolve_gap(self, msg: Any, code: int) -> int:
        """Repair the hole a message revealed, then account the message again.

        A trade gap that REST cannot fill means the server lags its own stream: reconnect (after back-off the
        repair runs again from the same cursor). Candles that REST does not have after a repair do not exist
        (exchange outages leave real holes in kline history), so the candle is then accepted.
        """
        data = msg["data"]
        sym = data["s"]
        if code == GAP_KLINE:
            open_us = epoch_to_us(int(data["k"]["t"]))
            await self._repair(sym, trades=False, kline_end_us=open_us)
            code = self._on_message(msg)
            if code == GAP_KLINE:
                st = self._state[sym]
                event(logging.WARNING, "kline_gap_at_exchange", symbol=sym,
                       after=dt(st.last_kline_us).isoformat() if st.last_kline_us is not None else None,
                       next=dt(open_us).isoformat())
                st.last_kline_us = open_us - self.step_us
                code = self._on_message(msg)
            return code
        await self._repair(sym, klines=False)
        code = self._on_message(msg)
        if code == GAP_TRADE:
            raise Reconnect(f"{sym}: trade {data.get('a')} still beyond the repaired cursor "
                             f"{self._state[sym].last_trade_id}")
        return code
