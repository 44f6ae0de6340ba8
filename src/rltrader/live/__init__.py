"""The live trader: closed bars → incremental features → policy → target position → order gateway → broker.

Modules: ``features`` (the batch feature stage, one bar at a time), ``records`` (decisions, orders and fills in
SQLite/PostgreSQL), ``gateway`` (targets to orders, filters, pre-send hooks, paper and exchange brokers),
``trader`` (the loop), ``risk`` (limits, ACTIVE/REDUCING/HALTED, the operator's halt/resume/flatten),
``recovery`` (start is recovery: open intents resolved, positions reconciled with the exchange).
"""
