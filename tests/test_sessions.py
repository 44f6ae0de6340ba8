"""Sessions stage: date splits with embargo, gap-free windows, train-only statistics, metadata, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from rltrader.cli import app
from rltrader.config import Settings
from rltrader.data.parquet_store import ParquetStore
from rltrader.dataset import load_split
from rltrader.dataset.build import run_features_stage, run_sessions_stage
from rltrader.dataset.split import read_metadata
from rltrader.errors import ConfigError, DataError
from rltrader.testing import synthetic_klines

DAY = 1440
SPLITS = {"train": {"start": "2024-01-01", "end": "2024-01-06"},
          "val": {"start": "2024-01-06", "end": "2024-01-08"},
          "test": {"start": "2024-01-08", "end": "2024-01-09"},
          "backtest": {"start": "2024-01-09", "end": "2024-01-11"}}
FEATURES = {"return_horizons": [1, 3], "rsi": 5, "ema": [4, 8], "macd": [3, 6, 3], "bollinger": 5, "atr": 4,
            "volatility": [4], "zscore_window": 10}


def make_settings(tmp: Path, **sessions: Any) -> Settings:
    return Settings.model_validate({
        "data": {"dir": str(tmp / "data")},
        "ingest": {"market": "futures-um", "symbols": ["AAAUSDT", "BBBUSDT"], "interval": "1m"},
        "features": FEATURES,
        "sessions": {"context": 10, "length": 5, "stride": 5, "embargo": 15, "volatility_percentile": 0,
                     "splits": SPLITS, **sessions},
    })


def fill_store(tmp: Path, gap: tuple[int, int] = (2 * DAY + 100, 2 * DAY + 160), **changes: Any) -> ParquetStore:
    store = ParquetStore(tmp / "data" / "store")
    store.write_klines(synthetic_klines("AAAUSDT", "2024-01-01", 10 * DAY, seed=1, missing=(gap,), **changes))
    store.write_klines(synthetic_klines("BBBUSDT", "2024-01-01", 10 * DAY, seed=2, price=3.0))
    return store


TINY_D3QN = {"total_steps": 600, "num_envs": 16, "learning_starts": 200, "batch_size": 32, "buffer_size": 2000,
             "eval_every": 600, "eval_sessions": 30, "checkpoint_every": 600, "net": {"channels": 8, "hidden": 16}}
"""A D3QN that trains in seconds on the synthetic sessions (tests of what happens to a trained model)."""


def training_settings(tmp: Path, **sections: Any) -> Settings:
    """Synthetic features and sessions built under ``tmp``, MLflow / checkpoints / models there too, and the given
    sections (e.g. ``d3qn=TINY_D3QN``, ``backtest={...}``) on top: what the trained-model tests share."""
    base = make_settings(tmp)
    run_features_stage(base, fill_store(tmp))
    run_sessions_stage(base)
    d = base.model_dump(mode="json")
    d["train"] = {"tracking_uri": f"sqlite:///{tmp}/mlflow.db", "artifact_root": str(tmp / "artifacts"),
                  "checkpoint_dir": str(tmp / "ckpt"), "models_dir": str(tmp / "models"), "val_sessions": 100}
    d["promote"] = {"decision_path": str(tmp / "reports" / "promotion.json")}
    for name, values in sections.items():
        d[name] = {**d.get(name, {}), **values} if name == "promote" else values
    return Settings.model_validate(d)


@pytest.fixture
def built(tmp_path: Path) -> tuple[Settings, dict[str, Any]]:
    settings = make_settings(tmp_path)
    run_features_stage(settings, fill_store(tmp_path))
    summary = run_sessions_stage(settings, metrics_path=tmp_path / "reports" / "sessions.json",
                                 plot_path=tmp_path / "reports" / "sessions.png")
    return settings, summary


def _us(day: str) -> int:
    return int(np.datetime64(day, "us").astype(np.int64))


def test_splits_windows_embargo_and_gaps(built: tuple[Settings, dict[str, Any]]) -> None:
    settings, summary = built
    s = settings.sessions
    for name, rng in SPLITS.items():
        ds = load_split(settings.data.dir / "sessions", name)
        assert ds.n_sessions == summary["splits"][name]["sessions"] > 0
        assert set(ds.symbols) == {"AAAUSDT", "BBBUSDT"}
        rows = ds.ctx_start[:, None] + np.arange(s.context + s.length)
        t = ds.time[rows]
        # every window is gap-free (one bar per minute) and within one symbol
        assert (np.diff(t, axis=1) == 60_000_000).all()
        assert (ds.symbol_id[rows] == ds.symbol_id[rows[:, :1]]).all()
        # context and traded bars inside the split; after the first split an embargo ≥ context is kept
        lo, hi = _us(rng["start"]), _us(rng["end"])
        assert t.min() >= lo + (0 if name == "train" else s.embargo * 60_000_000)
        assert t.max() + 60_000_000 <= hi
        # the stride grid is fixed in time
        assert (ds.time[ds.start] // 60_000_000 % s.stride == 0).all()
        # the gap on day 2 (AAAUSDT, minutes 100–160) is inside no window
        gap_lo, gap_hi = _us("2024-01-03") + 100 * 60_000_000, _us("2024-01-03") + 161 * 60_000_000
        aaa = ds.symbol_id[ds.start] == ds.symbols.index("AAAUSDT")
        assert not ((t[aaa][:, 0] < gap_hi) & (t[aaa][:, -1] >= gap_lo)).any()
        assert ds.features.dtype == np.float32 and ds.features.flags.c_contiguous
        assert np.isfinite(ds.features).all()
        # the price columns are the rows of one block, which every env over the split shares (no copy per env)
        from rltrader.env.core import bars_block

        assert bars_block(ds) is ds.open.base and bars_block(ds) is bars_block(ds)
        assert np.array_equal(bars_block(ds)[3], ds.close)


def test_standardised_on_train_only_and_metadata(built: tuple[Settings, dict[str, Any]], tmp_path: Path) -> None:
    settings, _summary = built
    train = load_split(settings.data.dir / "sessions", "train")
    # rows of train are (up to clipping) zero-mean unit-variance; the stats come from train rows only
    mean = train.features.mean(axis=0)
    assert np.abs(mean).max() < 0.05, mean
    meta = read_metadata(settings.data.dir / "sessions" / "val" / "rows.parquet")
    assert meta["features"] == list(train.feature_names)
    assert set(meta["input_sha256"]) == {"AAAUSDT", "BBBUSDT"}
    assert all(len(v) == 64 for v in meta["input_sha256"].values())
    assert meta["params"]["sessions"]["context"] == 10 and meta["params"]["features"]["rsi"] == 5
    assert meta["code"]["rltrader"] and meta["code"]["dataset_code_sha256"]
    assert set(meta["normalization"]) == set(train.feature_names)
    # the DVC metrics file and the plot exist; the summary counts per split and symbol add up
    metrics = json.loads((tmp_path / "reports" / "sessions.json").read_text())
    for _name, sp in metrics["splits"].items():
        assert sum(sp["symbols"].values()) == sp["sessions"]
    assert (tmp_path / "reports" / "sessions.png").stat().st_size > 10_000
    assert set(metrics["feature_stats"]) == set(train.feature_names)


def test_later_data_changes_leave_train_untouched(tmp_path: Path) -> None:
    """No look-ahead through the dataset: other bars after the train split change nothing in train."""
    a, b = tmp_path / "a", tmp_path / "b"
    run_features_stage(make_settings(a), fill_store(a))
    # b: the same bars up to the val split, then a different market (another walk at another price level)
    store = ParquetStore(b / "data" / "store")
    early = synthetic_klines("AAAUSDT", "2024-01-01", 10 * DAY, seed=1, missing=((2 * DAY + 100, 2 * DAY + 160),))
    early = early.filter(pl.col("open_time") < pl.datetime(2024, 1, 6, time_zone="UTC"))
    store.write_klines(pl.concat([early, synthetic_klines("AAAUSDT", "2024-01-06", 5 * DAY, seed=99, price=500.0)]))
    store.write_klines(synthetic_klines("BBBUSDT", "2024-01-01", 10 * DAY, seed=2, price=3.0))
    run_features_stage(make_settings(b), store)
    for root in (a, b):
        run_sessions_stage(make_settings(root))
    ta, tb = (load_split(r / "data" / "sessions", "train") for r in (a, b))
    np.testing.assert_array_equal(ta.features, tb.features)
    np.testing.assert_array_equal(ta.start, tb.start)
    va, vb = (load_split(r / "data" / "sessions", "val") for r in (a, b))
    assert not np.array_equal(va.close, vb.close)


def test_rerun_is_idempotent(built: tuple[Settings, dict[str, Any]]) -> None:
    settings, _ = built
    root = settings.data.dir / "sessions"
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    run_sessions_stage(settings)
    after = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert before == after
    assert not [p for p in settings.data.dir.iterdir() if p.name.startswith(".")], "temp folders left behind"


def test_volatility_filter_uses_train_percentile(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, volatility_percentile=75)
    run_features_stage(settings, fill_store(tmp_path))
    summary = run_sessions_stage(settings)
    everything = run_sessions_stage(make_settings(tmp_path))
    ratio = summary["splits"]["train"]["sessions"] / everything["splits"]["train"]["sessions"]
    assert 0.2 < ratio < 0.3
    assert summary["volatility_threshold"] > 0


def _unchanged(settings: Settings, before: dict[Path, bytes]) -> None:
    root = settings.data.dir / "sessions"
    assert {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    assert not [p for p in settings.data.dir.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(("change", "exc", "names"), [
    ({"splits": {**SPLITS, "val": {"start": "2030-01-01", "end": "2030-02-01"}}}, DataError, "sessions.splits.val"),
    ({"context": 20000, "embargo": 20000}, DataError, "sessions.context"),
    ({"embargo": 5}, ConfigError, "sessions.embargo"),
    ({"splits": {k: v for k, v in SPLITS.items() if k != "train"}}, ConfigError, "sessions.splits"),
    ({"splits": {**SPLITS, "test": {"start": "2024-01-07", "end": "2024-01-09"}}}, ConfigError, "overlap"),
])
def test_bad_parameters_name_themselves_and_keep_old_output(built: tuple[Settings, dict[str, Any]],
                                                            change: dict[str, Any], exc: type[Exception],
                                                            names: str) -> None:
    settings, _ = built
    root = settings.data.dir / "sessions"
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    bad = Settings.model_validate({**settings.model_dump(mode="json"),
                                   "sessions": {**settings.sessions.model_dump(mode="json"), **change}})
    with pytest.raises(exc, match=names):
        run_sessions_stage(bad)
    _unchanged(settings, before)


def test_symbol_missing_from_store_is_named(built: tuple[Settings, dict[str, Any]], tmp_path: Path) -> None:
    settings, _ = built
    bad = Settings.model_validate({**settings.model_dump(mode="json"),
                                   "ingest": {**settings.ingest.model_dump(mode="json"),
                                              "symbols": ["AAAUSDT", "ZZZUSDT"]}})
    before = {p.name: p.read_bytes() for p in (settings.data.dir / "features").iterdir()}
    with pytest.raises(DataError, match=r"ingest.symbols: ZZZUSDT"):
        run_features_stage(bad, ParquetStore(tmp_path / "data" / "store"))
    assert {p.name: p.read_bytes() for p in (settings.data.dir / "features").iterdir()} == before


def test_cli_reports_one_error_line(built: tuple[Settings, dict[str, Any]], tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    settings, _ = built
    params = settings.model_dump(mode="json")
    params["sessions"].update(context=20000, embargo=20000)
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["dataset", "sessions", "--metrics", "m.json", "--plot", "p.png"])
    assert result.exit_code == 1
    assert "sessions.context" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m.json").exists()


def test_rows_parquet_is_uncompressed_float32(built: tuple[Settings, dict[str, Any]]) -> None:
    settings, _ = built
    path = settings.data.dir / "sessions" / "train" / "rows.parquet"
    md = pq.ParquetFile(path).metadata
    cols = {md.row_group(0).column(i).path_in_schema: md.row_group(0).column(i) for i in range(md.num_columns)}
    assert cols["rsi"].compression == "UNCOMPRESSED" and cols["rsi"].physical_type == "FLOAT"


def test_streamed_rows_parquet_matches_one_call_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage appends a symbol's rows at a time through a row-group buffer: the file must be byte-identical
    to writing the assembled split in one ``pq.write_table`` (here with row groups of 700 rows, so buffers
    fill mid-symbol and several row groups hold two symbols)."""
    import pyarrow as pa

    from rltrader.dataset import split

    monkeypatch.setattr(split, "ROW_GROUP_ROWS", 700)
    settings = make_settings(tmp_path)
    run_features_stage(settings, fill_store(tmp_path))
    run_sessions_stage(settings)
    d = settings.data.dir / "sessions" / "train"
    s = load_split(settings.data.dir / "sessions", "train")
    assert pq.ParquetFile(d / "rows.parquet").metadata.num_row_groups == -(-len(s.features) // 700) > 2
    assert len(np.unique(s.symbol_id)) == 2
    cols: dict[str, Any] = {
        "symbol": pa.DictionaryArray.from_arrays(pa.array(s.symbol_id), pa.array(list(s.symbols), pa.string())),
        "time": pa.array(s.time).cast(pa.timestamp("us", "UTC")),
        **{n: pa.array(getattr(s, n)) for n in split.PRICE_COLUMNS},
        **{n: pa.array(np.ascontiguousarray(s.features[:, j]), pa.float32()) for j, n in enumerate(s.feature_names)},
    }
    meta = pq.read_schema(d / "rows.parquet").metadata
    ref = pa.table(cols).replace_schema_metadata({split.META_KEY: meta[split.META_KEY]})
    pq.write_table(ref, tmp_path / "ref.parquet", compression="none", use_dictionary=["symbol"], row_group_size=700,
                   write_page_checksum=True)
    assert (tmp_path / "ref.parquet").read_bytes() == (d / "rows.parquet").read_bytes()
