"""What every ``benchmarks/bench_*.py`` shares: the import path, stderr logging, the ``--quick`` flag, the ratio
rule and the one-JSON-line-per-figure output ``{"metric", "value", "unit", "peer", "peer_value", "ratio"}``
(extra keys allowed), plus a best-of-N timer. Each harness keeps only what it measures and how it reports it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
try:
    import rltrader  # noqa: F401
except ImportError:  # running from a checkout without an installed package
    sys.path.insert(0, str(REPO / "src"))


def logger(name: str) -> Callable[[str], None]:
    """``log(msg)`` to stderr as ``[name] msg`` (stdout carries only the JSON lines)."""

    def log(msg: str) -> None:
        print(f"[{name}] {msg}", file=sys.stderr, flush=True)

    return log


def parser(doc: str | None, quick_help: str = "shorter runs, under a minute in all") -> argparse.ArgumentParser:
    """An argument parser described by the first paragraph of ``doc``, with ``--quick``."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    return ap


def ratio(value: float | None, peer_value: float | None, *, higher_is_better: bool = True,
          digits: int = 2) -> float | None:
    """> 1 means ours is better: ours / peer (peer / ours when lower is better); None when either is 0 or missing."""
    if not value or not peer_value:
        return None
    return round(value / peer_value if higher_is_better else peer_value / value, digits)


def line(metric: str, value: float | None, unit: str, peer: str | None, peer_value: float | None, *,
         digits: int = 1, ratio_value: float | None = None, **extra: Any) -> dict[str, Any]:
    """One figure's JSON object; ``value`` / ``peer_value`` rounded to ``digits`` (0: integers)."""

    def rnd(x: float | None) -> float | int | None:
        if x is None:
            return None
        return round(x) if digits == 0 else round(x, digits)

    return {"metric": metric, "value": rnd(value), "unit": unit, "peer": peer, "peer_value": rnd(peer_value),
            "ratio": ratio_value, **extra}


def emit(obj: dict[str, Any]) -> None:
    """Print one figure as a JSON line on stdout, flushed (a killed run keeps what it measured)."""
    print(json.dumps(obj), flush=True)


def table(lines: list[str]) -> None:
    """The human-readable summary, to stderr."""
    print("\n".join(lines), file=sys.stderr, flush=True)


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """(fastest wall seconds of ``repeats`` calls of ``fn``, the last call's result)."""
    best, out = float("inf"), None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


@dataclass
class Timing:
    """Seconds of each repetition over ``rows`` input rows; the best one is the figure (the least disturbed by
    the other jobs of a shared machine)."""

    rows: int
    seconds: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def rate(self) -> float:
        return self.rows / self.best
