"""A simulated Binance on loopback: the replay server (REST + websocket market data over recorded real data).

Tests, benchmarks and offline demos point python-binance's real clients at it; nothing here talks to a real
exchange. Modules by concern: ``clock`` (market time), ``faults`` (faults on demand, rate limit, counters),
``data`` (the recorded market), ``rest`` and ``ws`` (the handlers), ``exchange`` (accounts, orders, fills
through the execution kernel), ``signing`` and ``trading_routes`` (Binance's SIGNED trading API), ``server``
(composition and running).
"""

from rltrader.sim.clock import ReplayClock
from rltrader.sim.data import ReplayData
from rltrader.sim.exchange import Exchange, default_params, kernel_fill
from rltrader.sim.faults import Faults, OrderFaults, RateLimit, ServerStats
from rltrader.sim.rest import BinanceError
from rltrader.sim.server import ReplayServer, parse_when, run_in_thread, serve_forever
from rltrader.sim.signing import hmac_sha256

__all__ = [
    "BinanceError",
    "Exchange",
    "Faults",
    "OrderFaults",
    "RateLimit",
    "ReplayClock",
    "ReplayData",
    "ReplayServer",
    "ServerStats",
    "default_params",
    "hmac_sha256",
    "kernel_fill",
    "parse_when",
    "run_in_thread",
    "serve_forever",
]
