"""Incremental time bars (e.g. 5 s) built from a live aggregate-trade stream.

The live ingester cannot wait for a window's trades to be queryable from the store: it must emit the bar as
soon as the window is complete, and a bar once written is final (stores never overwrite a key). So the builder
needs a rule for *when* a window is complete, and a rule for trades that show up after that.

Watermark policy
----------------
* Each symbol's builder keeps a **watermark**: the latest exchange time it has seen, from trade times and
  from any other event of that symbol (kline updates carry the exchange's event time, so a quiet symbol's
  windows still close).
* A window ``[start, start + width)`` is **emitted** once ``watermark >= start + width + allowed_lateness``.
  Combined streams interleave aggTrade and kline events slightly out of order, and a reconnect repairs
  trades through REST after newer events arrived; ``allowed_lateness`` absorbs both.
* Windows are emitted **contiguously** from the first window the builder saw (or from ``start``): a window
  without a trade is emitted as such — ``trades = 0``, null OHLC, zero volumes — never invented from a
  neighbour's price.
* A trade whose window was already emitted is **late**: it is counted (``late_trades``) and logged, never
  merged, because the bar it belongs to may already be stored. The trade itself is still stored by the
  ingester; :func:`rltrader.data.store.trade_bars_frame` over stored trades remains the ground truth.
* On a clean stop, :meth:`BarBuilder.drain` with ``final=True`` also emits windows whose end the watermark
  has reached, ignoring the lateness allowance (nothing later will arrive in this process). The window still
  open is not emitted — a partial bar stored as final would be wrong forever; the next run rebuilds it from
  the stored trades.

For in-order input the emitted non-empty bars are :func:`trade_bars_frame`'s: OHLC and counts exactly (OHLC
follow trade id order, not arrival order), volume sums to float rounding (polars sums in a different order;
the difference is a few ulps, ~1e-15 relative).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

import polars as pl

from rltrader.data.schema import BAR_SCHEMA, interval_us

log = logging.getLogger(__name__)

BarRow = tuple[str, str, int, float | None, float | None, float | None, float | None, float, float, int, float]
"""market, symbol, bucket (epoch µs), open, high, low, close, volume, quote_volume, trades, taker_buy_volume."""


@dataclass
class _Window:
    open: float
    high: float
    low: float
    close: float
    open_id: int
    close_id: int
    volume: float = 0.0
    quote_volume: float = 0.0
    trades: int = 0
    taker_buy_volume: float = 0.0


@dataclass
class BarBuilder:
    """Bars of one market/symbol; feed trades with :meth:`add`, clock with :meth:`advance`, take :meth:`drain`.

    Times are epoch microseconds (the store's resolution). ``start`` (µs, window-aligned) makes the first
    emitted window that one even if its first trade comes later, so a restarted ingester continues the stored
    bar series without a hole.
    """

    market: str
    symbol: str
    width: str = "5s"
    allowed_lateness_us: int = 2_000_000
    start: int | None = None
    watermark: int | None = None
    late_trades: int = 0
    emitted: int = 0
    _width_us: int = field(init=False)
    _open: dict[int, _Window] = field(init=False, default_factory=dict)
    _next: int | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._width_us = interval_us(self.width)
        if self.allowed_lateness_us < 0:
            raise ValueError("allowed_lateness_us must be >= 0")
        if self.start is not None:
            if self.start % self._width_us:
                raise ValueError(f"start {self.start} is not aligned to {self.width} windows")
            self._next = self.start

    @property
    def width_us(self) -> int:
        return self._width_us

    @property
    def next_window(self) -> int | None:
        """Start of the next window to be emitted (None until the first trade or ``start``)."""
        return self._next

    @property
    def open_windows(self) -> int:
        return len(self._open)

    def add(self, time_us: int, agg_trade_id: int, price: float, quantity: float, is_buyer_maker: bool) -> bool:
        """Account one trade; False (and counted as late) when its window was already emitted."""
        w = time_us - time_us % self._width_us
        if self._next is not None and w < self._next:
            self.late_trades += 1
            log.warning("bars %s %s: late trade %d at %s for emitted window %s; stored, not merged into the bar",
                        self.market, self.symbol, agg_trade_id, _iso(time_us), _iso(w))
            return False
        win = self._open.get(w)
        if win is None:
            win = self._open[w] = _Window(price, price, price, price, agg_trade_id, agg_trade_id)
        else:
            if price > win.high:
                win.high = price
            if price < win.low:
                win.low = price
            if agg_trade_id < win.open_id:
                win.open, win.open_id = price, agg_trade_id
            if agg_trade_id > win.close_id:
                win.close, win.close_id = price, agg_trade_id
        win.volume += quantity
        win.quote_volume += price * quantity
        win.trades += 1
        if not is_buyer_maker:
            win.taker_buy_volume += quantity
        if self.watermark is None or time_us > self.watermark:
            self.watermark = time_us
        return True

    def advance(self, time_us: int) -> None:
        """Move the watermark to exchange time ``time_us`` (never backwards)."""
        if self.watermark is None or time_us > self.watermark:
            self.watermark = time_us

    def drain(self, *, final: bool = False) -> list[BarRow]:
        """Windows that are complete under the watermark policy, in time order, empty ones included."""
        if self.watermark is None:
            return []
        if self._next is None:
            if not self._open:
                return []
            self._next = min(self._open)
        limit = self.watermark - (0 if final else self.allowed_lateness_us)
        out: list[BarRow] = []
        w = self._next
        width = self._width_us
        while w + width <= limit:
            win = self._open.pop(w, None)
            if win is None:
                out.append((self.market, self.symbol, w, None, None, None, None, 0.0, 0.0, 0, 0.0))
            else:
                out.append((self.market, self.symbol, w, win.open, win.high, win.low, win.close, win.volume,
                            win.quote_volume, win.trades, win.taker_buy_volume))
            w += width
        self._next = w
        self.emitted += len(out)
        return out


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, tz=UTC).isoformat()


def bars_frame(rows: list[BarRow]) -> pl.DataFrame:
    """Bar rows → BAR_SCHEMA frame (what :meth:`Store.write_bars` takes)."""
    if not rows:
        return pl.DataFrame(schema=BAR_SCHEMA)
    cols = list(zip(*rows, strict=True))
    data = {name: list(col) for name, col in zip(BAR_SCHEMA, cols, strict=True)}
    return pl.DataFrame(data, schema_overrides={"bucket": pl.Int64}).with_columns(
        pl.col("bucket").cast(pl.Datetime("us", "UTC"))
    ).cast(BAR_SCHEMA)  # type: ignore[arg-type]


def build_bars(trades: pl.DataFrame, width: str = "5s", *, allowed_lateness_us: int = 0,
               complete: bool = True) -> tuple[pl.DataFrame, int]:
    """Run trades (AGG_TRADE_SCHEMA, in the given row order) through builders; (bars, late trade count).

    The offline twin of the live path, for tests and for rebuilding bars from stored trades. ``complete``
    says the input holds every trade there is, so the last window is closed too.
    """
    builders: dict[tuple[str, str], BarBuilder] = {}
    rows: list[BarRow] = []
    cols = trades.select(
        "market", "symbol", pl.col("transact_time").dt.epoch("us"), "agg_trade_id", "price", "quantity",
        "is_buyer_maker",
    )
    for market, symbol, t, a, p, q, m in cols.iter_rows():
        b = builders.get((market, symbol))
        if b is None:
            b = builders[(market, symbol)] = BarBuilder(market, symbol, width, allowed_lateness_us)
        b.add(t, a, p, q, m)
        rows += b.drain()
    for b in builders.values():
        if complete and b.watermark is not None:
            b.advance(b.watermark - b.watermark % b.width_us + b.width_us)
        rows += b.drain(final=True)
    return bars_frame(rows), sum(b.late_trades for b in builders.values())
