"""The recorded market a replay serves: candles and trades per symbol, plus the formatting Binance uses."""

from __future__ import annotations

import logging
import math
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import polars as pl

from rltrader.data.archive import ArchiveSource, Kind, load_file
from rltrader.data.schema import AGG_TRADE_SCHEMA, KLINE_SCHEMA, Market, interval_us
from rltrader.errors import DataError, NotInArchiveError

log = logging.getLogger(__name__)

# Spot archive files (and spot's microsecond REST/ws mode) switched to µs timestamps on this date.
_SPOT_US_ERA = datetime(2025, 1, 1, tzinfo=UTC)
_QUOTE_ASSETS = ("FDUSD", "USDT", "USDC", "BUSD", "TUSD", "USDP", "DAI", "BTC", "ETH", "BNB", "EUR", "TRY",
                 "BRL", "JPY", "GBP", "AUD", "XRP", "DOGE")


def decimals_of(s: pl.Series, *, cap: int = 8) -> int | None:
    """Fewest decimals (≤ cap) that print every value back to the same float; None if none do.

    Values parsed from Binance's fixed-decimal strings always pass at 8, so printing with this many decimals
    gives the client exactly the float the archive holds.
    """
    s = s.drop_nulls()
    if s.is_empty():
        return 0
    for k in range(cap + 1):
        if bool((s.round(k) == s).all()):
            return k
    return None


def fmt(x: float, decimals: int | None) -> str:
    if decimals is None:
        return format(Decimal(repr(x)), "f")
    return f"{x:.{decimals}f}"


@dataclass
class CandleState:
    """Running state of one candle (decimals as floats, as in KLINE_SCHEMA)."""

    o: float
    h: float
    l: float  # noqa: E741 - Binance's own field name
    c: float
    v: float = 0.0
    q: float = 0.0
    n: int = 0
    bv: float = 0.0
    bq: float = 0.0
    f: int = -1
    last: int = -1


def _us(col: str) -> pl.Expr:
    return pl.col(col).dt.epoch("us")


@dataclass
class SymbolData:
    """One symbol's candles and trades as plain lists: per-event access from Python must be cheap."""

    symbol: str
    open_us: list[int]
    close_us: list[int]
    open_ms: list[int]
    close_ms: list[int]
    o: list[float]
    h: list[float]
    l: list[float]  # noqa: E741
    c: list[float]
    v: list[float]
    q: list[float]
    n: list[int]
    bv: list[float]
    bq: list[float]
    first_id: list[int]  # first trade id of each candle (from trades, else synthetic but consistent)
    tr_lo: list[int]  # trades of candle i are trades[tr_lo[i]:tr_hi[i]]
    tr_hi: list[int]
    a: list[int]
    p: list[float]
    qty: list[float]
    f: list[int]
    last: list[int]
    t_us: list[int]
    t_ms: list[int]
    m: list[bool]
    best: list[bool]
    price_dec: int | None
    qty_dec: int | None
    quote_dec: int | None


@dataclass(frozen=True)
class SymbolFilters:
    """A symbol's trading rules as exchangeInfo publishes them and the replay exchange enforces them.

    Tick and step come from the data's own decimals (the archive prints prices and quantities on the
    exchange's grid), so orders and fills live on the grid the recorded market traded on.
    """

    price_dec: int
    qty_dec: int
    tick: float
    step: float
    max_price: float
    max_qty: float
    market_max_qty: float
    min_notional: float


def split_symbol(symbol: str) -> tuple[str, str]:
    for q in _QUOTE_ASSETS:
        if symbol.endswith(q) and len(symbol) > len(q):
            return symbol[: -len(q)], q
    return symbol[:-4], symbol[-4:]


class ReplayData:
    """The recorded market a server replays: 1m (or another base interval) klines and aggTrades per symbol.

    Candles missing from the klines but fully covered by trades (a trade exists at or after the candle's end)
    are derived from the trades, so an aggTrades-only day still streams klines. A trailing candle that the
    trades do not cover completely is left out rather than invented.
    """

    def __init__(self, market: Market, klines: pl.DataFrame, agg_trades: pl.DataFrame | None = None,
                 *, interval: str = "1m") -> None:
        self.market = market
        self.interval = interval
        self.interval_ms = interval_us(interval) // 1000
        klines = klines.filter(pl.col("interval") == interval) if klines.height else klines
        trades = agg_trades if agg_trades is not None else pl.DataFrame(schema=AGG_TRADE_SCHEMA)
        syms = sorted(set(klines.get_column("symbol").to_list()) | set(trades.get_column("symbol").to_list()))
        if not syms:
            raise DataError("replay data is empty: no klines and no aggTrades for any symbol")
        self._filters: dict[str, SymbolFilters] = {}
        self.symbols: dict[str, SymbolData] = {
            s: self._build(s, klines.filter(pl.col("symbol") == s), trades.filter(pl.col("symbol") == s))
            for s in syms
        }

    @classmethod
    def from_archive(cls, archive_base: str, market: Market | str, symbols: Sequence[str], start: date,
                     end: date, *, interval: str = "1m", agg_trades: bool = True) -> ReplayData:
        """Load the inclusive date range from the archive; a symbol needs klines or aggTrades (or both).

        A partial month may come from its monthly file (when the daily ones are not all there): rows outside
        the whole days asked for are cut, so the replay holds the same rows whichever files the archive has.
        """
        market = Market(market)
        source = ArchiveSource(archive_base)
        lo = datetime(start.year, start.month, start.day, tzinfo=UTC)
        hi = datetime(end.year, end.month, end.day, tzinfo=UTC) + timedelta(days=1)
        kl: list[pl.DataFrame] = []
        tr: list[pl.DataFrame] = []
        kinds: list[tuple[Kind, str | None, list[pl.DataFrame], str]] = [("klines", interval, kl, "open_time")]
        if agg_trades:
            kinds.append(("aggTrades", None, tr, "transact_time"))
        for sym in symbols:
            sym = sym.upper()
            found = False
            for kind, iv, out, time_col in kinds:
                try:
                    files = source.plan(market, kind, sym, iv, start, end)
                except NotInArchiveError:
                    continue
                for f in files:
                    parsed = load_file(source, f)
                    if parsed.bad.height:
                        log.warning("replay: %d invalid rows skipped in %s", parsed.bad.height, f.relpath)
                    rows = parsed.rows.filter((pl.col(time_col) >= lo) & (pl.col(time_col) < hi))
                    if rows.height:
                        out.append(rows)
                        found = True
            if not found:
                raise NotInArchiveError(
                    f"{archive_base}: no {interval} klines or aggTrades for {sym} on {market.value} between "
                    f"{start} and {end}"
                )
        klines = pl.concat(kl) if kl else pl.DataFrame(schema=KLINE_SCHEMA)
        trades = pl.concat(tr) if tr else pl.DataFrame(schema=AGG_TRADE_SCHEMA)
        return cls(market, klines, trades, interval=interval)

    def _close_offset_us(self, open_us: int) -> int:
        """Close minus open time in the archive's convention: the last ms, or the last µs in spot's µs era."""
        step = self.interval_ms * 1000
        us_era = self.market is Market.SPOT and open_us >= int(_SPOT_US_ERA.timestamp() * 1_000_000)
        return step - 1 if us_era else step - 1000

    def _build(self, symbol: str, kl: pl.DataFrame, tr: pl.DataFrame) -> SymbolData:
        tr = tr.unique("agg_trade_id", keep="first").sort("agg_trade_id")
        kl = kl.unique("open_time", keep="first").sort("open_time")
        qty_dec = decimals_of(tr.get_column("quantity")) if tr.height else None
        kcols = kl.select(
            _us("open_time").alias("open_us"), _us("close_time").alias("close_us"),
            "open", "high", "low", "close", "volume", "quote_volume", "trades", "taker_buy_volume",
            "taker_buy_quote_volume",
        )
        if tr.height:
            derived = self._from_trades(tr, qty_dec)
            kcols = pl.concat([kcols, derived.join(kcols.select("open_us"), on="open_us", how="anti")])
            kcols = kcols.sort("open_us")
        d = {c: kcols.get_column(c).to_list() for c in kcols.columns}
        t_us: list[int] = tr.select(_us("transact_time")).to_series().to_list()
        lo = [bisect_left(t_us, x) for x in d["open_us"]]
        hi = [bisect_left(t_us, x + self.interval_ms * 1000) for x in d["open_us"]]
        f_ids = tr.get_column("first_trade_id").to_list()
        first_id: list[int] = []
        counter = 1
        for i, n in enumerate(d["trades"]):
            if hi[i] > lo[i]:
                first_id.append(f_ids[lo[i]])
                counter = f_ids[lo[i]] + n
            else:
                first_id.append(counter if n else -1)
                counter += n
        prices = pl.concat([kcols.get_column(c) for c in ("open", "high", "low", "close")]
                           + [tr.get_column("price")])
        price_dec: int | None
        quote_dec: int | None
        if self.market is Market.SPOT:
            # Spot prints every decimal with 8 places ("7195.24000000").
            price_dec = qty_dec = quote_dec = 8
        else:
            price_dec = decimals_of(prices)
            qty_dec = decimals_of(pl.concat([kcols.get_column("volume"), kcols.get_column("taker_buy_volume"),
                                           tr.get_column("quantity")]))
            quote_dec = decimals_of(pl.concat([kcols.get_column("quote_volume"),
                                             kcols.get_column("taker_buy_quote_volume")]))
        if self.market is Market.SPOT:
            # …unless a value needs more (not seen in archive data; keeps exactness if it ever is).
            price_dec = 8 if decimals_of(prices) is not None else None
        return SymbolData(
            symbol=symbol,
            open_us=d["open_us"], close_us=d["close_us"],
            open_ms=[x // 1000 for x in d["open_us"]], close_ms=[x // 1000 for x in d["close_us"]],
            o=d["open"], h=d["high"], l=d["low"], c=d["close"], v=d["volume"], q=d["quote_volume"],
            n=d["trades"], bv=d["taker_buy_volume"], bq=d["taker_buy_quote_volume"],
            first_id=first_id, tr_lo=lo, tr_hi=hi,
            a=tr.get_column("agg_trade_id").to_list(), p=tr.get_column("price").to_list(),
            qty=tr.get_column("quantity").to_list(), f=f_ids, last=tr.get_column("last_trade_id").to_list(),
            t_us=t_us, t_ms=[x // 1000 for x in t_us], m=tr.get_column("is_buyer_maker").to_list(),
            best=tr.get_column("is_best_match").to_list(),
            price_dec=price_dec, qty_dec=qty_dec, quote_dec=quote_dec,
        )

    def _from_trades(self, tr: pl.DataFrame, qty_dec: int | None) -> pl.DataFrame:
        step = self.interval_ms * 1000
        last_t = tr.select(_us("transact_time").max()).item()
        taker_buy = ~pl.col("is_buyer_maker")
        notional = pl.col("price") * pl.col("quantity")
        out = (
            tr.with_columns(open_us=(_us("transact_time") // step) * step)
            .group_by("open_us", maintain_order=True)
            .agg(
                pl.col("price").first().alias("open"),
                pl.col("price").max().alias("high"),
                pl.col("price").min().alias("low"),
                pl.col("price").last().alias("close"),
                pl.col("quantity").sum().alias("volume"),
                notional.sum().alias("quote_volume"),
                (pl.col("last_trade_id") - pl.col("first_trade_id") + 1).sum().alias("trades"),
                pl.col("quantity").filter(taker_buy).sum().alias("taker_buy_volume"),
                notional.filter(taker_buy).sum().alias("taker_buy_quote_volume"),
            )
            .filter(pl.col("open_us") + step <= last_t)
        )
        rq = qty_dec if qty_dec is not None else 8
        out = out.with_columns(
            pl.col("volume").round(rq), pl.col("taker_buy_volume").round(rq),
            pl.col("quote_volume").round(8), pl.col("taker_buy_quote_volume").round(8),
            pl.col("trades").cast(pl.Int64),
        )
        closes = [o + self._close_offset_us(o) for o in out.get_column("open_us").to_list()]
        return out.with_columns(close_us=pl.Series(closes, dtype=pl.Int64)).select(
            "open_us", "close_us", "open", "high", "low", "close", "volume", "quote_volume", "trades",
            "taker_buy_volume", "taker_buy_quote_volume",
        )

    def filters(self, symbol: str) -> SymbolFilters:
        """The symbol's PRICE_FILTER / LOT_SIZE / MARKET_LOT_SIZE / (MIN_)NOTIONAL values (computed once)."""
        cached = self._filters.get(symbol)
        if cached is not None:
            return cached
        sd = self.symbols[symbol]
        spot = self.market is Market.SPOT
        pdec = sd.price_dec if sd.price_dec is not None else 8
        if spot:
            # Spot prints filters with 8 decimals whatever the tick; derive tick/step from the data itself.
            prices = [*sd.o, *sd.h, *sd.l, *sd.c, *sd.p]
            pdec = decimals_of(pl.Series(prices, dtype=pl.Float64)) or 0
            qdec = decimals_of(pl.Series(sd.qty if sd.qty else sd.v, dtype=pl.Float64)) or 0
        else:
            qdec = sd.qty_dec if sd.qty_dec is not None else 3
        hi_price = max([*sd.h, *sd.p], default=1.0)
        max_qty = 10.0 ** (math.ceil(math.log10(max([*sd.v, *sd.qty, 1.0]))) + 1)
        flt = SymbolFilters(
            price_dec=pdec, qty_dec=qdec, tick=10.0 ** -pdec, step=10.0 ** -qdec,
            max_price=10.0 ** (math.ceil(math.log10(max(hi_price, 1e-8))) + 2), max_qty=max_qty,
            market_max_qty=max_qty if spot else max_qty / 10,
            min_notional={"BTC": 0.0001, "ETH": 0.001, "BNB": 0.01}.get(split_symbol(symbol)[1], 5.0),
        )
        self._filters[symbol] = flt
        return flt

    # -- candle state: REST and the websockets show the same candles ------------------------------------
    def final(self, sd: SymbolData, i: int) -> CandleState:
        n = sd.n[i]
        f = sd.first_id[i]
        return CandleState(sd.o[i], sd.h[i], sd.l[i], sd.c[i], sd.v[i], sd.q[i], n, sd.bv[i], sd.bq[i],
                  f, f + n - 1 if f >= 0 else -1)

    def synthetic(self, sd: SymbolData, i: int) -> list[tuple[int, CandleState]]:
        """Two in-progress states at 1/3 and 2/3 of the candle for candles without trades.

        The price path goes open → first extreme → second extreme → close (down first when the candle closes
        up), so every partial is a valid candle whose high/low never exceed the final ones and whose volumes
        only grow: consistent with the final candle, though not what really happened.
        """
        o, h, lo, c = sd.o[i], sd.h[i], sd.l[i], sd.c[i]
        e1, e2 = (lo, h) if c >= o else (h, lo)
        f = sd.first_id[i]
        out: list[tuple[int, CandleState]] = []
        for k, e in ((1, e1), (2, e2)):
            frac = k / 3
            n = int(sd.n[i] * frac)
            st = CandleState(o, max(o, e1, e if k == 2 else o), min(o, e1, e if k == 2 else o), e,
                    sd.v[i] * frac, sd.q[i] * frac, n, sd.bv[i] * frac, sd.bq[i] * frac,
                    f if n else -1, f + n - 1 if n else -1)
            out.append((sd.open_ms[i] + self.interval_ms * k // 3, st))
        return out

    @staticmethod
    def add_trade(st: CandleState | None, sd: SymbolData, j: int) -> CandleState:
        p, q = sd.p[j], sd.qty[j]
        if st is None:
            st = CandleState(p, p, p, p, f=sd.f[j])
        st.h = max(st.h, p)
        st.l = min(st.l, p)
        st.c = p
        st.v += q
        st.q += p * q
        st.n += sd.last[j] - sd.f[j] + 1
        if not sd.m[j]:
            st.bv += q
            st.bq += p * q
        st.last = sd.last[j]
        return st

    def state_at(self, sd: SymbolData, i: int, now_ms: int) -> CandleState:
        """The candle as the exchange shows it at ``now_ms`` while it is still open."""
        empty = CandleState(sd.o[i], sd.o[i], sd.o[i], sd.o[i])
        lo, hi = sd.tr_lo[i], sd.tr_hi[i]
        if hi > lo:
            st: CandleState | None = None
            for j in range(lo, hi):
                if sd.t_ms[j] > now_ms:
                    break
                st = self.add_trade(st, sd, j)
            return st or empty
        best = empty
        for t, s in self.synthetic(sd, i):
            if t <= now_ms:
                best = s
        return best

    def trade_json(self, sd: SymbolData, j: int, micro: bool) -> dict[str, Any]:
        """Trade ``j`` as REST aggTrades and the aggTrade stream print it."""
        d: dict[str, Any] = {
            "a": sd.a[j], "p": fmt(sd.p[j], sd.price_dec), "q": fmt(sd.qty[j], sd.qty_dec), "f": sd.f[j],
            "l": sd.last[j], "T": sd.t_us[j] if micro else sd.t_ms[j], "m": sd.m[j],
        }
        if (self.market is Market.SPOT):
            d["M"] = sd.best[j]
        return d

