"""What the live ingester's modules share: the structured log line, time conversions, message codes, bounded task waits.

Split out of :mod:`rltrader.data.stream` so the socket reader (:mod:`rltrader.data.ws_reader`) and the REST hole
repair (:mod:`rltrader.data.stream_repair`) can use them without importing the ingester. Every log line still
goes to the ``rltrader.data.stream`` logger, so logging configuration (the CLI sets it to INFO) is unchanged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import polars as pl

log = logging.getLogger("rltrader.data.stream")

T = TypeVar("T")

END_TASK_S = 5.0
"""How long a stop waits for a cancelled task (helper loop, connection attempt) before it logs and moves on."""

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


async def run_until_stopped(coro: Coroutine[Any, Any, T], stopping: Callable[[], bool], grace_s: float) -> T | None:
    """Run ``coro`` as a task until it returns; once ``stopping()`` (the stop event, the deadline) is true, give
    it ``grace_s`` to return by itself (the consume loop polls the stop every 0.25 s and ends cleanly), then
    cancel it. None if it had to be cancelled; its exception if it raised.

    Why: the ingester cannot know every await below it (python-binance, aiohttp, a store), and its deadline must
    end the run whatever it is waiting for; cancelling is safe because cursors only move with the rows they
    describe (a repair cut short is redone from the same cursors by the next start).
    """
    task = asyncio.create_task(coro, name="stream-connection")
    try:
        while not task.done() and not stopping():
            await asyncio.wait((task,), timeout=0.05)  # polled: the stop event may be a thread's
        if not task.done():
            await asyncio.wait((task,), timeout=grace_s)
        if not task.done():
            event(logging.WARNING, "stream_cancel_on_stop", grace_s=grace_s)
            task.cancel()
            await asyncio.wait((task,), timeout=END_TASK_S)  # its finally: the socket's close (≤ 2 s)
            if not task.done():
                event(logging.ERROR, "stream_task_stuck", task=task.get_name())
                return None
        if task.cancelled():
            return None
        return task.result()
    finally:
        if not task.done():  # we were cancelled ourselves
            task.cancel()


async def end_task(task: asyncio.Task[Any]) -> BaseException | None:
    """Cancel a helper loop and wait for it, bounded: a task that swallows its cancel must not hang the stop.
    Returns the exception it failed with, if it failed (a store that kept failing: the run raises it)."""
    task.cancel()
    started = time.monotonic()
    await asyncio.wait((task,), timeout=END_TASK_S)
    if not task.done():
        event(logging.ERROR, "stream_task_stuck", task=task.get_name(), waited_s=round(time.monotonic() - started, 3))
        return None
    return None if task.cancelled() else task.exception()


class Columns:
    """Rows buffered column by column, turned into one frame per commit.

    Why: ``pl.DataFrame(rows, orient="row")`` costs ~1.6 µs per 14-field kline row (measured); appending each
    field to its column list as the row is accepted and building the frame from the columns costs ~0.6 µs.
    ``cols`` is public so the hot paths append field by field without building a tuple first.
    """

    __slots__ = ("cols", "schema", "time_cols")

    def __init__(self, schema: dict[str, pl.DataType], time_cols: tuple[str, ...]) -> None:
        self.schema = schema
        self.time_cols = time_cols
        self.cols: tuple[list[Any], ...] = tuple([] for _ in schema)

    def __len__(self) -> int:
        return len(self.cols[0])

    def append(self, row: Sequence[Any]) -> None:
        """One row in schema order (times as µs epochs)."""
        if len(row) != len(self.cols):
            raise ValueError(f"row of {len(row)} fields, {len(self.cols)} columns")
        any(map(list.append, self.cols, row))  # appends field by field in C (list.append returns None)

    def empty(self) -> Columns:
        return Columns(self.schema, self.time_cols)

    def frame(self) -> pl.DataFrame:
        """The buffered rows as a frame of ``schema``; time columns from µs epochs to UTC datetimes."""
        if not len(self):
            return pl.DataFrame(schema=self.schema)
        overrides = {c: (pl.Int64() if c in self.time_cols else t) for c, t in self.schema.items()}
        return pl.DataFrame(dict(zip(self.schema, self.cols, strict=True)), schema=overrides).with_columns(
            *[pl.col(c).cast(pl.Datetime("us", "UTC")) for c in self.time_cols])
