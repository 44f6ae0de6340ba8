"""What the live ingester's modules share: the structured log line, time conversions, message codes.

Split out of :mod:`rltrader.data.stream` so the socket reader (:mod:`rltrader.data.ws_reader`) and the REST hole
repair (:mod:`rltrader.data.stream_repair`) can use them without importing the ingester. Every log line still
goes to the ``rltrader.data.stream`` logger, so logging configuration (the CLI sets it to INFO) is unchanged.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("rltrader.data.stream")

OK, DUP, GAP_TRADE, GAP_KLINE, BAD, CONN_ERROR, IGNORED = range(7)
"""What accounting one message found (``StreamIngester._on_message``)."""


def event(level: int, name: str, **fields: Any) -> None:
    """One structured log line: ``{"event": name, ...}``."""
    if log.isEnabledFor(level):
        log.log(level, json.dumps({"event": name, **fields}, default=str, separators=(",", ":")))


def dt(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1e6, tz=UTC)


def epoch_us(t: datetime) -> int:
    return int((t - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() * 1_000_000)


class Reconnect(Exception):
    """The current connection is unusable; the run loop reconnects."""
