"""A simulated Binance on loopback: the replay server (REST + websocket market data over recorded real data).

Tests, benchmarks and offline demos point python-binance's real clients at it; nothing here talks to a real
exchange. Modules by concern: ``clock`` (market time), ``faults`` (faults on demand, rate limit, counters),
``data`` (the recorded market), ``rest`` and ``ws`` (the handlers), ``server`` (composition and running).
"""

from rltrader.sim.clock import ReplayClock
from rltrader.sim.data import ReplayData
from rltrader.sim.faults import Faults, RateLimit, ServerStats
from rltrader.sim.rest import BinanceError
from rltrader.sim.server import ReplayServer, parse_when, run_in_thread, serve_forever

__all__ = [
    "BinanceError",
    "Faults",
    "RateLimit",
    "ReplayClock",
    "ReplayData",
    "ReplayServer",
    "ServerStats",
    "parse_when",
    "run_in_thread",
    "serve_forever",
]
