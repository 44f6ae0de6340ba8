"""The signal study: measure forecast power before training an agent on it.

Supervised forecasters (ridge and XGBoost) of volatility-normalised forward returns at several horizons are fitted
on the train split of the ``features`` stage output and judged on val and test: information coefficient with a
block-bootstrap interval, hit rate, forecast size against the round-trip cost, the break-even cost of a threshold
strategy, decile plots, and a feature-group ablation. If no horizon clears costs here, no RL agent trained on the
same features can be expected to, and the study says so in one line per horizon.

- :mod:`rltrader.study.data`: rows, targets, splits and costs from the feature tables.
- :mod:`rltrader.study.models`: the forecasters.
- :mod:`rltrader.study.signal`: the measurements (IC, CI, deciles, threshold strategy).
- :mod:`rltrader.study.stage`: the ``study`` DVC stage / ``rltrader study``.
"""
