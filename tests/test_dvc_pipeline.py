"""`dvc repro` in a throwaway git+dvc repo: the real dvc.yaml, tiny params, real shared data.

Checks what users rely on: a first run builds every stage, a second run does nothing, a parameter change re-runs
exactly the stages that read it (and those after them), and the whole pipeline — ingest → features → sessions →
train (d3qn, ppo, cnn, xgb) → backtest → promote — runs end to end with `dvc metrics show` / `dvc plots show` working.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # training / DVC / Prefect / MLflow server: tens of seconds each

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "ingest": {"market": "futures-um", "interval": "1m", "symbols": ["AVAXUSDT"], "start": "2023-02",
               "end": "2023-02"},
    "sessions": {"context": 30, "length": 10, "stride": 10, "volatility_percentile": 50, "embargo": 60,
                 "splits": {"train": {"start": "2023-02-01", "end": "2023-02-15"},
                            "val": {"start": "2023-02-15", "end": "2023-02-21"},
                            "test": {"start": "2023-02-21", "end": "2023-02-25"},
                            "backtest": {"start": "2023-02-25", "end": "2023-03-01"}}},
    "study": {"horizons": [1, 15], "xgb_rounds": 10, "bootstrap": 50, "ablation_model": "ridge"},
}


def _run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def _set(repo: Path, section: str, key: str, value: object) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


TINY_TRAIN = {
    "d3qn": {"total_steps": 600, "num_envs": 16, "learning_starts": 200, "batch_size": 32, "buffer_size": 2000,
             "eval_every": 600, "eval_sessions": 30, "checkpoint_every": 600, "net": {"channels": 8, "hidden": 16}},
    "ppo": {"total_steps": 512, "num_envs": 16, "rollout_steps": 16, "eval_every": 512, "eval_max_sessions": 30,
            "checkpoint_every": 512, "net": {"channels": 8, "hidden": 16, "tcn_levels": 2}},
    "cnn": {"epochs": 1, "max_samples": 2000, "net": {"channels": 8, "hidden": 16}},
    "xgb": {"horizons": [15], "rounds": 20},
    "lowrider": {"total_steps": 600, "num_envs": 16, "learning_starts": 200, "batch_size": 32, "buffer_size": 2000,
                 "eval_every": 600, "eval_sessions": 30, "checkpoint_every": 0, "net": {"channels": 8, "hidden": 16}},
}


def _repo(tmp_path: Path, shared_archive: Path, extra: dict[str, dict[str, object]] | None = None) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy2(REPO / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy2(REPO / "params.tuned.yaml", repo / "params.tuned.yaml")  # a params file of the train stages
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["archive_base"] = str(shared_archive)
    for section, values in {**TINY, **(extra or {})}.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text("/data/\n/reports/\n/mlflow/\n")
    _run(["git", "init", "-q"], repo)
    _run([sys.executable, "-m", "dvc", "init", "-q"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "init"], repo)
    return repo


def test_whole_pipeline_on_tiny_params(tmp_path: Path, shared_archive: Path) -> None:
    repo = _repo(tmp_path, shared_archive, {**TINY_TRAIN, "train": {"val_sessions": 100},
                                            "backtest": {"bootstrap": 200}})
    first = _run([sys.executable, "-m", "dvc", "repro"], repo)
    assert sorted(_ran(first)) == sorted(["ingest", "features", "sessions", "study", "train@d3qn", "train@ppo",
                                          "train@cnn", "train@xgb", "train@lowrider", "ensemble", "backtest",
                                          "promote"]), first
    assert (repo / "reports" / "study" / "report.html").is_file()
    decision = json.loads((repo / "reports" / "promotion.json").read_text())
    assert decision["action"] in ("promote", "refuse") and decision["gates"]
    assert decision["challenger"] in ("d3qn", "ppo", "xgb", "d3qn_ens")
    for algo in ("d3qn", "ppo", "cnn", "xgb", "lowrider", "d3qn_ens"):
        assert (repo / "reports" / "backtest" / algo / "report.html").is_file()
    shown = _run([sys.executable, "-m", "dvc", "metrics", "show"], repo)
    assert "reports/backtest.json" in shown and "reports/promotion.json" in shown and "reports/study.json" in shown
    plots = _run([sys.executable, "-m", "dvc", "plots", "show", "--out", str(tmp_path / "plots")], repo)
    assert (tmp_path / "plots" / "index.html").is_file(), plots
    assert _ran(_run([sys.executable, "-m", "dvc", "repro"], repo)) == ["ingest"]  # re-checks the archive only


def test_dvc_repro_runs_only_what_a_change_touches(tmp_path: Path, shared_archive: Path) -> None:
    repo = _repo(tmp_path, shared_archive)

    first = _run([sys.executable, "-m", "dvc", "repro", "sessions"], repo)
    assert _ran(first) == ["ingest", "features", "sessions"], first
    assert (repo / "data" / "sessions" / "backtest" / "rows.parquet").exists()
    assert (repo / "reports" / "plots" / "sessions.png").exists()

    # ingest always runs (its input is outside the repo) and leaves its metrics byte-identical, so nothing after it
    assert _ran(_run([sys.executable, "-m", "dvc", "repro", "sessions"], repo)) == ["ingest"]

    _set(repo, "sessions", "length", 15)
    assert _ran(_run([sys.executable, "-m", "dvc", "repro", "sessions"], repo)) == ["ingest", "sessions"]

    _set(repo, "features", "rsi", 10)
    assert _ran(_run([sys.executable, "-m", "dvc", "repro", "sessions"], repo)) == ["ingest", "features", "sessions"]

    assert _ran(_run([sys.executable, "-m", "dvc", "repro", "sessions"], repo)) == ["ingest"]
    metrics = _run([sys.executable, "-m", "dvc", "metrics", "show"], repo)
    assert "reports/sessions.json" in metrics


def test_a_fresh_clone_fills_its_empty_store_and_rebuilds(tmp_path: Path, shared_archive: Path) -> None:
    """What the README's one command meets on a new machine: dvc.lock and the metrics files come with the clone,
    the store and the data do not. The ingest stage must run (it used to be skipped as up to date, and features
    then failed on the empty store), and the rebuilt store must be the one the lock describes."""
    repo = _repo(tmp_path, shared_archive)
    (repo / ".gitignore").write_text("/data/\n/mlflow/\n")  # metrics are committed, as in this project
    _run([sys.executable, "-m", "dvc", "repro", "sessions"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "built"], repo)

    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / "data").exists()
    ran = _ran(_run([sys.executable, "-m", "dvc", "repro", "sessions"], clone))
    assert ran == ["ingest", "features", "sessions"], ran
    assert (clone / "data" / "sessions" / "backtest" / "rows.parquet").is_file()
    for name in ("ingest.json", "features.json", "sessions.json"):  # the same stored bars and derived data
        assert (clone / "reports" / name).read_bytes() == (repo / "reports" / name).read_bytes(), name
    assert _run(["git", "status", "--porcelain"], clone).strip() == ""  # nothing to commit: the lock still holds
