"""Errors a user sees. Each names the file/row/field/parameter at fault so the message alone says what to fix."""

from __future__ import annotations


class RLTraderError(Exception):
    """Base of errors that the CLI prints as one clear line and exits non-zero."""


class ConfigError(RLTraderError):
    """A parameter in params.yaml or the environment is unknown or has the wrong type."""


class StoreError(RLTraderError):
    """A database wait outlived its bound (connect, pool, lock or statement timeout) or the database is
    unreachable; the message names the operation, table/series and the bound. Writes were rolled back."""


class DataError(RLTraderError):
    """Input data is unusable: corrupt zip, checksum mismatch, truncated or malformed file, unknown symbol."""


class ChecksumError(DataError):
    pass


class NotInArchiveError(DataError):
    """The archive has no such file: usually an unknown symbol or a period not yet published."""


class ValidationError(DataError):
    """Rows failed validation; they were quarantined and nothing from the batch was stored."""

    def __init__(self, message: str, n_bad: int) -> None:
        super().__init__(message)
        self.n_bad = n_bad
