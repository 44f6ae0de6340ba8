"""Integrity of every file rltrader stores or produces: a damaged file (truncated, flipped bytes, emptied) is one
error line naming it, exit code 1, and nothing else changes; model and checkpoint hashes; guarded reads."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, copy_archive_file

from rltrader.agents import d3qn
from rltrader.agents.networks import DuelingQNet, NetConfig
from rltrader.agents.packaging import PolicyModule, load_policy_file, save_policy, weights_sha256
from rltrader.config import load_settings
from rltrader.data.ingest import run_ingest_stage
from rltrader.data.store import open_store
from rltrader.dataset.build import run_features_stage
from rltrader.env.core import N_STATE
from rltrader.errors import DataError
from rltrader.integrity import (
    BACKTEST_PRODUCER,
    PROMOTE_PRODUCER,
    load_torch,
    read_report,
    sidecar_path,
    train_producer,
    tune_producer,
    write_report,
    write_torch,
)

AVAX_FEB = "futures/um/monthly/klines/AVAXUSDT/1m/AVAXUSDT-1m-2023-02.zip"
AVAX_SEP = "futures/um/monthly/klines/AVAXUSDT/1m/AVAXUSDT-1m-2023-09.zip"
TUNE_SUMMARY = "reports/tune/d3qn/summary.json"
FEB_FILE = "data/store/klines/market=futures-um/symbol=AVAXUSDT/interval=1m/month=2023-02/data.parquet"
TINY = {
    "ingest": {"market": "futures-um", "interval": "1m", "symbols": ["AVAXUSDT"], "start": "2023-02", "end": "2023-02"},
    "sessions": {"context": 30, "length": 10, "stride": 10, "volatility_percentile": 50, "embargo": 60,
                 "splits": {"train": {"start": "2023-02-01", "end": "2023-02-15"},
                            "val": {"start": "2023-02-15", "end": "2023-02-21"},
                            "test": {"start": "2023-02-21", "end": "2023-02-25"},
                            "backtest": {"start": "2023-02-25", "end": "2023-03-01"}}},
}


# -- damage ------------------------------------------------------------------------------------------------------
def truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def flip(p: Path) -> None:
    """Flip 16 bytes in the middle of the file (not the footer, not the header)."""
    b = bytearray(p.read_bytes())
    mid = len(b) // 2
    b[mid: mid + 16] = bytes(x ^ 0xFF for x in b[mid: mid + 16])
    p.write_bytes(bytes(b))


def empty(p: Path) -> None:
    p.write_bytes(b"")


DAMAGE: dict[str, Callable[[Path], None]] = {"truncated": truncate, "flipped": flip, "empty": empty}


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLTRADER_")}
    env.update({"COLUMNS": "300", "MLFLOW_DISABLE_TELEMETRY": "true"})
    return subprocess.run([sys.executable, "-m", "rltrader.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def one_error_line(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# -- a tiny project: store → features → sessions, a model, a backtest summary -----------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, shared_archive: Path) -> Path:
    root = tmp_path_factory.mktemp("project")
    archive = root / "archive"
    copy_archive_file(shared_archive, archive, AVAX_FEB)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    params["backtest"]["models"] = ["d3qn"]  # the stage reads its training record and tuning summary
    params["data"] = {"dir": "data", "archive_base": "archive"}  # relative: a copied project uses its own
    params["train"].update({"tracking_uri": "sqlite:///mlflow/mlflow.db", "artifact_root": "mlflow/artifacts"})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cwd = Path.cwd()
    os.chdir(root)
    try:
        settings = load_settings()
        store = open_store(None, settings.data.dir)
        try:
            run_ingest_stage(settings, store, root / "reports" / "ingest.json")
            run_features_stage(settings, store)
        finally:
            store.close()
        from rltrader.dataset.build import run_sessions_stage

        run_sessions_stage(settings)
        net = DuelingQNet(23, 30, N_STATE, 4, NetConfig(channels=4, hidden=8))
        module = PolicyModule(net, "q_values", 30, 23, N_STATE, 4, {"algo": "d3qn", "mlflow_run_id": "abc123"})
        save_policy(module, root / "data" / "models" / "d3qn.pt", {"mlflow_run": "abc123", "dvc_stage": "train@d3qn"})
        write_report(root / "reports" / "backtest" / "summary.json",
                     {"primary_split": "backtest", "splits": ["val", "backtest"], "tables": {}}, BACKTEST_PRODUCER)
        write_report(root / "reports" / "train_d3qn.json", {"algo": "d3qn", "run_id": "abc123", "model_uri":
                     "models:/m/1", "val": {"total_return": 0.01}, "verdict": "ok"}, train_producer("d3qn"))
        write_report(root / "reports" / "promotion.json", {"action": "keep", "gates": []}, PROMOTE_PRODUCER)
        write_report(root / TUNE_SUMMARY, {"study": "d3qn", "pbo": {"pbo": 0.25},
                                           "trial_states": {"complete": 7, "pruned": 3}}, tune_producer("d3qn"))
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def project(built: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "p"
    shutil.copytree(built, dst)
    return dst


def test_the_tiny_project_is_sound(project: Path) -> None:
    """The baseline the damage tests start from: every command used below succeeds on undamaged files."""
    r = cli("data", "verify", "--archive", "--json", cwd=project)
    assert r.returncode == 0, r.stderr
    assert [(m["month"], m["status"], m["rows"]) for m in json.loads(r.stdout)["months"]] == [
        ("2023-02", "ok", 28 * 1440)]
    assert isinstance(load_policy_file(project / "data" / "models" / "d3qn.pt"), PolicyModule)


# (file, command that reads it, text the error names)
CASES: dict[str, tuple[str, list[str]]] = {
    "store month": (FEB_FILE, ["data", "backfill", "--market", "futures-um", "--symbols", "AVAXUSDT", "--start",
                               "2023-02", "--end", "2023-02"]),
    "store month (verify)": (FEB_FILE, ["data", "verify"]),
    "features": ("data/features/AVAXUSDT.parquet", ["dataset", "sessions", "--metrics", "reports/s.json",
                                                     "--plot", "reports/s.png"]),
    "sessions rows": ("data/sessions/train/rows.parquet", ["train", "d3qn"]),
    "sessions index": ("data/sessions/val/index.parquet", ["train", "d3qn"]),
    "model": ("data/models/d3qn.pt", ["backtest", "--model", "data/models/d3qn.pt"]),
    "backtest summary": ("reports/backtest/summary.json", ["promote", "--dry-run"]),
    "training record": ("reports/train_d3qn.json", ["backtest"]),
    "tuning summary": (TUNE_SUMMARY, ["backtest"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("kind", list(CASES))
def test_damaged_file_is_one_line_naming_it(project: Path, kind: str, damage: str) -> None:
    rel, args = CASES[kind]
    target = project / rel
    DAMAGE[damage](target)
    before = tree_hashes(project)
    r = cli(*args, cwd=project)
    line = one_error_line(r, rel.split("/")[-1])
    assert str(target) in line or rel in line, line
    after = tree_hashes(project)
    assert after == before, sorted(k for k in after.keys() | before.keys() if after.get(k) != before.get(k))


def test_model_error_names_its_origin(project: Path) -> None:
    path = project / "data" / "models" / "d3qn.pt"
    flip(path)
    with pytest.raises(DataError, match=r"d3qn\.pt: model file is corrupt.*MLflow run abc123.*train@d3qn"):
        load_policy_file(path)


def test_model_weights_hash_travels_inside_the_module(project: Path, tmp_path: Path) -> None:
    """Without the sidecar (a copied file, an MLflow artifact) the weights' hash in ``meta`` still refuses
    changed weights."""
    module = load_policy_file(project / "data" / "models" / "d3qn.pt")
    assert module.meta["weights_sha256"] == weights_sha256(module)
    with torch.no_grad():
        next(module.parameters()).view(-1)[0] += 1.0
    torch.save(module, tmp_path / "copied.pt")  # a plain copy: no sidecar
    assert not sidecar_path(tmp_path / "copied.pt").exists()
    with pytest.raises(DataError, match=r"copied\.pt: model weights are corrupt.*MLflow run abc123"):
        load_policy_file(tmp_path / "copied.pt")


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_refused(tmp_path: Path, damage: str) -> None:
    ckpt = tmp_path / "ckpt" / d3qn.CHECKPOINT_NAME
    payload = {"step": 7, "online": {"w": torch.arange(10_000, dtype=torch.float32)}}
    d3qn.save_checkpoint(ckpt, payload)
    (tmp_path / "ckpt" / "d3qn.run_id").write_text("run42\n")
    assert torch.equal(d3qn.load_checkpoint(ckpt)["online"]["w"], payload["online"]["w"])
    DAMAGE[damage](ckpt)
    with pytest.raises(DataError, match=rf"{ckpt}: (unreadable checkpoint|checkpoint is corrupt).*run42.*"
                                        "without --resume"):
        d3qn.load_checkpoint(ckpt)


def test_embedded_hash_catches_a_changed_payload(tmp_path: Path) -> None:
    """A checkpoint whose payload bytes were altered but that still unpickles: the embedded sha256 refuses it."""
    path = tmp_path / "c.pt"
    write_torch(path, {"x": torch.ones(100)}, {"mlflow_run": "r1"})
    outer = torch.load(path, weights_only=False)
    payload = bytearray(outer["payload"])
    i = payload.find(b"\x00\x00\x80?")  # a float32 1.0 of the tensor data
    payload[i + 2: i + 4] = b"\x00@"  # → 2.0: still a valid torch file
    outer["payload"] = bytes(payload)
    torch.save(outer, path)
    with pytest.raises(DataError, match=r"c\.pt: checkpoint is corrupt.*stored in it.*MLflow run r1"):
        load_torch(path, "checkpoint")


def test_stats_lists_a_broken_month_and_counts_the_rest(project: Path, shared_archive: Path) -> None:
    copy_archive_file(shared_archive, project / "archive", AVAX_SEP)
    assert cli("data", "backfill", "--market", "futures-um", "--symbols", "AVAXUSDT", "--start", "2023-09",
               "--end", "2023-09", cwd=project).returncode == 0
    truncate(project / FEB_FILE)
    r = cli("data", "stats", "--json", cwd=project)
    assert r.returncode == 0, r.stderr
    [s] = json.loads(r.stdout)
    assert s["rows"] == 30 * 1440 and s["first"].startswith("2023-09-01")
    assert s["broken"] == [FEB_FILE]  # data.dir is relative in these params
    r = cli("data", "stats", cwd=project)
    assert r.returncode == 0 and "broken:" in r.stderr and FEB_FILE in r.stderr


def test_verbose_shows_the_traceback(project: Path) -> None:
    truncate(project / FEB_FILE)
    r = cli("-v", "data", "backfill", "--market", "futures-um", "--symbols", "AVAXUSDT", "--start", "2023-02",
            "--end", "2023-02", cwd=project)
    assert r.returncode == 1 and "Traceback" in r.stderr and "unreadable store month file" in r.stderr


def test_archive_source_used_by_verify_is_checksum_verified(project: Path) -> None:
    """--archive compares against CHECKSUM-verified files: a damaged archive zip is an error, not a verdict."""
    z = project / "archive" / AVAX_FEB
    flip(z)
    r = cli("data", "verify", "--archive", cwd=project)
    one_error_line(r, "AVAXUSDT-1m-2023-02.zip", "CHECKSUM")


@pytest.mark.parametrize(("rel", "producer"), [
    ("reports/backtest/summary.json", "the backtest stage (`rltrader backtest`)"),
    ("reports/train_d3qn.json", "the train@d3qn stage (`rltrader train d3qn`)"),
    (TUNE_SUMMARY, "`rltrader tune d3qn`"),
    ("reports/promotion.json", "the promote stage (`rltrader promote`)"),  # read by the nightly flow
])
def test_report_hash_catches_an_edit_that_still_parses(project: Path, rel: str, producer: str) -> None:
    """A changed digit or a dropped key is still valid JSON: the embedded sha256 refuses it, naming the file and
    the stage that writes it; a file without a hash (by hand, older rltrader) is refused the same way."""
    path = project / rel
    rec = read_report(path, "report", producer)
    assert rec and "integrity" not in rec
    text = path.read_text()
    assert json.loads(text)["integrity"]["producer"] == producer
    edited = re.sub(r'0\.25|"ok"|"keep"|"primary_split": "backtest"', lambda m: {
        "0.25": "0.35", '"ok"': '"no"', '"keep"': '"promote"'}.get(m.group(0), '"primary_split": "val"'), text, count=1)
    assert edited != text
    path.write_text(edited)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: report is corrupt .*{re.escape(producer)}.*re-run"):
        read_report(path, "report", producer)
    path.write_text(json.dumps(rec))  # parses, but carries no hash
    name, stage = re.escape(str(path)), re.escape(producer)
    with pytest.raises(DataError, match=rf"^{name}: report carries no content hash.*re-run {stage}"):
        read_report(path, "report", producer)
    write_report(path, {**rec, "extra": [1.5, None, float("nan")]}, producer)  # NaN and None survive the check
    assert read_report(path, "report", producer)["extra"][:2] == [1.5, None]


def test_promote_names_an_edited_backtest_summary(project: Path) -> None:
    path = project / "reports" / "backtest" / "summary.json"
    path.write_text(path.read_text().replace('"val"', '"test"', 1))
    one_error_line(cli("promote", "--dry-run", cwd=project), str(path.relative_to(project)), "is corrupt",
                   "rltrader backtest")
