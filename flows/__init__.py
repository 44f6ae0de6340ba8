"""Prefect 3 flows: orchestration only; every step is a plain function from :mod:`rltrader`."""
