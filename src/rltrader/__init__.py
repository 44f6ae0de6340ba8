"""rltrader: Binance market data → features → RL agents → backtest → promotion → trading."""

__version__ = "0.1.0"
