"""Market time of a replay: the clock every REST answer and websocket event is measured against."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta


def _to_ms(t: datetime | int) -> int:
    if isinstance(t, datetime):
        if t.tzinfo is None:
            t = t.replace(tzinfo=UTC)
        return int(t.timestamp() * 1000)
    return int(t)


class ReplayClock:
    """Market time of the replay, in epoch milliseconds; thread-safe, never goes backwards.

    ``speed`` is market seconds per real second (60 = a minute per second). Speed 0 or ``inf`` is "as fast as
    possible": time then only moves when a websocket sender needs the next event (it jumps to that event) or
    when :meth:`advance_to` is called, so REST sees exactly as far as the streams have got. ``pause()``
    freezes the clock so tests can step it with :meth:`advance_to`/:meth:`advance` and nothing else moves it.
    """

    def __init__(self, start: datetime | int, speed: float = 60.0, *, paused: bool = False,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._mono = monotonic
        self._anchor_ms = float(_to_ms(start))
        self._anchor_mono = monotonic()
        self._speed = self._check_speed(speed)
        self._paused = paused

    @staticmethod
    def _check_speed(speed: float) -> float:
        if math.isnan(speed) or speed < 0:
            raise ValueError(f"replay speed must be >= 0 (0 or inf = as fast as possible), not {speed}")
        return speed

    @property
    def speed(self) -> float:
        return self._speed

    @property
    def fast(self) -> bool:
        return self._speed == 0 or math.isinf(self._speed)

    @property
    def paused(self) -> bool:
        return self._paused

    def _now_locked(self) -> float:
        if self._paused or self.fast:
            return self._anchor_ms
        return self._anchor_ms + (self._mono() - self._anchor_mono) * self._speed * 1000.0

    def _reanchor(self, ms: float) -> None:
        self._anchor_ms = ms
        self._anchor_mono = self._mono()

    def now_ms(self) -> int:
        with self._lock:
            return int(self._now_locked())

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.now_ms() / 1000, tz=UTC)

    def set_speed(self, speed: float) -> None:
        with self._lock:
            self._reanchor(self._now_locked())
            self._speed = self._check_speed(speed)

    def pause(self) -> None:
        with self._lock:
            self._reanchor(self._now_locked())
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._reanchor(self._now_locked())
            self._paused = False

    def advance_to(self, t: datetime | int) -> None:
        """Jump forward to ``t``; a time already passed is ignored (market time never runs backwards)."""
        with self._lock:
            self._reanchor(max(self._now_locked(), float(_to_ms(t))))

    def advance(self, delta: timedelta) -> None:
        with self._lock:
            self._reanchor(self._now_locked() + delta / timedelta(milliseconds=1))

    async def wait_until(self, t_ms: int) -> None:
        """Return once market time has reached ``t_ms``; in fast mode by moving the clock there.

        Polls in short real-time steps rather than computing one sleep, because speed, pause state and the
        time itself can be changed from another thread while we wait.
        """
        while True:
            with self._lock:
                if self.fast and not self._paused:
                    self._reanchor(max(self._anchor_ms, float(t_ms)))
                    return
                now = self._now_locked()
                if now >= t_ms:
                    return
                delay = 0.02 if self._paused else min((t_ms - now) / self._speed / 1000.0, 0.05)
            await asyncio.sleep(max(delay, 0.0005))

