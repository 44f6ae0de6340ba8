"""The train split's normalization, read once (``dataset.normalization``) by the backtest and the live trader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rltrader.dataset.normalization import Normalization
from rltrader.dataset.split import META_KEY
from rltrader.errors import DataError
from rltrader.live import book


def write_train(sessions: Path, meta: dict[str, Any] | None) -> Path:
    path = sessions / "train" / "rows.parquet"
    path.parent.mkdir(parents=True)
    table = pa.table({"a": [1.0, 2.0], "b": [3.0, 4.0]})
    if meta is not None:
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    pq.write_table(table, path)
    return path


GOOD = {"features": ["a", "b"], "normalization": {"a": [1.5, 0.5], "b": [3.5, 2.0]},
        "params": {"sessions": {"clip": 5.0}}, "context": 30}


def test_reads_the_train_metadata(tmp_path: Path) -> None:
    write_train(tmp_path, GOOD)
    n = Normalization.from_sessions(tmp_path)
    assert n.names == ("a", "b") and n.clip == 5.0 and n.context == 30
    assert np.array_equal(n.mean, [1.5, 3.5]) and np.array_equal(n.std, [0.5, 2.0])
    assert n.table == GOOD["normalization"]
    assert book.Normalization is Normalization  # the live trader's is this one


def test_missing_train_split_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"train/rows\.parquet: the train split is needed"):
        Normalization.from_sessions(tmp_path)


def test_file_without_metadata_is_refused(tmp_path: Path) -> None:
    write_train(tmp_path, None)
    with pytest.raises(DataError, match=r"rows\.parquet: no rltrader metadata"):
        Normalization.from_sessions(tmp_path)


@pytest.mark.parametrize(("drop", "field"), [("context", "'context'"), ("normalization", "'normalization'"),
                                             ("b", "'b'")])
def test_missing_field_names_file_and_field(tmp_path: Path, drop: str, field: str) -> None:
    meta = json.loads(json.dumps(GOOD))
    if drop == "b":
        del meta["normalization"]["b"]
    else:
        del meta[drop]
    write_train(tmp_path, meta)
    with pytest.raises(DataError, match=rf"rows\.parquet: the train split's metadata has no {field} entry"):
        Normalization.from_sessions(tmp_path)


def test_malformed_statistics_are_refused(tmp_path: Path) -> None:
    meta = json.loads(json.dumps(GOOD))
    meta["params"]["sessions"]["clip"] = "wide"
    write_train(tmp_path, meta)
    with pytest.raises(DataError, match=r"rows\.parquet: malformed normalization metadata"):
        Normalization.from_sessions(tmp_path)
