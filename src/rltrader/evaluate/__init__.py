"""Backtesting and evaluation: the backtest runner, metrics with their uncertainty, and the offline report."""
