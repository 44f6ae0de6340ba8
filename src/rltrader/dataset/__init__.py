"""Session datasets: causal features from stored bars and fixed-length trading sessions split by date."""

from rltrader.dataset.split import SessionSet, load_split

__all__ = ["SessionSet", "load_split"]
