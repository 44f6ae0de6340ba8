"""The Binance markets rltrader knows. A leaf module (no polars, no numba) so that the typed settings
(``rltrader.config``) can name them without importing the data layer; ``rltrader.data.schema`` re-exports it."""

from __future__ import annotations

from enum import StrEnum


class Market(StrEnum):
    """Binance market. The value is what users type and what stores keep."""

    SPOT = "spot"
    FUTURES_UM = "futures-um"

    @property
    def archive_prefix(self) -> str:
        """Folder of this market under the archive's ``data/`` root."""
        return "spot" if self is Market.SPOT else "futures/um"
