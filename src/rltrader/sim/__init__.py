"""A simulated Binance on loopback: the replay server (REST + websocket market data over recorded real data).

Tests, benchmarks and offline demos point python-binance's real clients at it; nothing here talks to a real
exchange.
"""

from rltrader.sim.server import (
    Faults,
    RateLimit,
    ReplayClock,
    ReplayData,
    ReplayServer,
    parse_when,
    run_in_thread,
    serve_forever,
)

__all__ = [
    "Faults",
    "RateLimit",
    "ReplayClock",
    "ReplayData",
    "ReplayServer",
    "parse_when",
    "run_in_thread",
    "serve_forever",
]
