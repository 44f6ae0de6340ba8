"""What a stored month should hold, from its sources: the CHECKSUM-verified archive, then REST for the days the
archive has not published (yet).

The archive publishes a day's files the day after, and a month's file early the next month; the days in between
exist only at the exchange's REST API. A month's reference is therefore the archive's files for the days they
cover, plus (given a REST base: Binance, a testnet, or the loopback replay server) REST for the days they do not.
Days neither covers are named, so a report can say what it could not check. 5 s bars have no source: they are
built from the live stream (:mod:`rltrader.data.bars`); the stored trades are their ground truth (see
:mod:`rltrader.data.verify_repair`).
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl

from rltrader.data.archive import ArchiveSource, load_file
from rltrader.data.schema import Market
from rltrader.data.verify_rules import AGG_TRADES, KLINES, Kind
from rltrader.errors import NotInArchiveError

Span = tuple[datetime, datetime]


def month_bounds(month: str) -> Span:
    y, m = (int(x) for x in month.split("-"))
    lo = datetime(y, m, 1, tzinfo=UTC)
    return lo, lo + timedelta(days=calendar.monthrange(y, m)[1])


class RestSource:
    """Binance REST (or a replay server / testnet at ``base``) as a month source; one client per market."""

    def __init__(self, base: str | None) -> None:
        self.base = base
        self._clients: dict[Market, Any] = {}

    def __repr__(self) -> str:
        return f"RestSource({self.base!r})"

    def _client(self, market: Market) -> Any:
        from rltrader.data.rest import make_client

        if market not in self._clients:
            self._clients[market] = make_client(market, self.base)
        return self._clients[market]

    def rows(self, kind: Kind, market: str, symbol: str, interval: str, span: Span) -> pl.DataFrame:
        """Closed candles / trades in ``[span)`` up to the server's now."""
        from rltrader.data.rest import fetch_agg_trades, fetch_klines

        client = self._client(Market(market))
        if kind is KLINES:
            return fetch_klines(client, market, symbol, interval, span[0], span[1])
        return fetch_agg_trades(client, market, symbol, span[0], span[1])

    def close(self) -> None:
        for c in self._clients.values():
            c.close_connection()
        self._clients.clear()


@dataclass
class Reference:
    """A month's rows from its sources, and which parts of the month each source covered."""

    rows: pl.DataFrame
    archive_spans: list[Span] = field(default_factory=list)
    rest_spans: list[Span] = field(default_factory=list)
    uncovered: list[Span] = field(default_factory=list)

    def note(self) -> str:
        """What the report says about coverage (empty when the archive covered the whole month)."""
        parts = []
        if self.rest_spans:
            parts.append("REST for " + ", ".join(_days(s) for s in self.rest_spans))
        if self.uncovered:
            parts.append(", ".join(_days(s) for s in self.uncovered) + " not in the archive (`--rest-base URL` "
                         "checks and refetches them through REST)")
        return "; ".join(parts)


def _days(span: Span) -> str:
    lo, last = span[0].date(), (span[1] - timedelta(microseconds=1)).date()
    return lo.isoformat() if lo == last else f"{lo}..{last}"


def _merge(spans: list[Span]) -> list[Span]:
    out: list[Span] = []
    for lo, hi in sorted(spans):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _gaps(within: Span, covered: list[Span]) -> list[Span]:
    out, cursor = [], within[0]
    for lo, hi in _merge(covered):
        if lo > cursor:
            out.append((cursor, min(lo, within[1])))
        cursor = max(cursor, hi)
    if cursor < within[1]:
        out.append((cursor, within[1]))
    return [s for s in out if s[0] < s[1]]


def reference_month(kind: Kind, market: str, symbol: str, interval: str, month: str,
                    archive: ArchiveSource | None, rest: RestSource | None) -> Reference | None:
    """The month's rows from the archive files that cover it, plus REST for the days they do not cover.

    None when there is no source for this kind (bars) or neither source has anything for the month.
    """
    if kind not in (KLINES, AGG_TRADES) or (archive is None and rest is None):
        return None
    lo, hi = span = month_bounds(month)
    frames: list[pl.DataFrame] = []
    covered: list[Span] = []
    if archive is not None:
        try:
            plans = archive.plan(Market(market), "klines" if kind is KLINES else "aggTrades", symbol,
                                 interval if kind is KLINES else None, lo.date(), (hi - timedelta(days=1)).date())
        except NotInArchiveError:
            plans = []
        for f in plans:
            frames.append(load_file(archive, f).rows)
            f_lo, f_hi = f.period_bounds
            covered.append((max(f_lo, lo), min(f_hi, hi)))
    ref = Reference(pl.DataFrame(schema=kind.schema), archive_spans=_merge(covered))
    missing = _gaps(span, covered)
    if rest is not None:
        for gap in missing:
            frames.append(rest.rows(kind, market, symbol, interval, gap))
        ref.rest_spans, missing = missing, []
    ref.uncovered = missing
    if not frames:
        return None
    t = pl.col(kind.time)
    ref.rows = (pl.concat(frames).filter((t >= lo) & (t < hi)).unique(subset=[kind.key], keep="first")
                .select(list(kind.schema)).cast(kind.schema).sort(kind.key))  # type: ignore[arg-type]
    return ref
