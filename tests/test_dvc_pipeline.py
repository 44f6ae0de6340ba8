"""`dvc repro sessions` in a throwaway git+dvc repo: the real dvc.yaml, tiny params, real shared data.

Checks what users rely on: a first run builds every stage up to the sessions, a second run does nothing, and a
parameter change re-runs exactly the stages that read it (and those after them). The training stages after
`sessions` are exercised by tests/test_train.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "ingest": {"market": "futures-um", "interval": "1m", "symbols": ["AVAXUSDT"], "start": "2023-02",
               "end": "2023-02"},
    "sessions": {"context": 30, "length": 10, "stride": 10, "volatility_percentile": 50, "embargo": 60,
                 "splits": {"train": {"start": "2023-02-01", "end": "2023-02-15"},
                            "val": {"start": "2023-02-15", "end": "2023-02-21"},
                            "test": {"start": "2023-02-21", "end": "2023-02-25"},
                            "backtest": {"start": "2023-02-25", "end": "2023-03-01"}}},
}


def _run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def _set(repo: Path, section: str, key: str, value: object) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_dvc_repro_runs_only_what_a_change_touches(tmp_path: Path, shared_archive: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy2(REPO / "dvc.yaml", repo / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["archive_base"] = str(shared_archive)
    for section, values in TINY.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text("/data/\n/reports/\n")
    _run(["git", "init", "-q"], repo)
    _run([sys.executable, "-m", "dvc", "init", "-q"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "init"], repo)

    first = _run([sys.executable, "-m", "dvc", "repro", "sessions"], repo)
    assert _ran(first) == ["ingest", "features", "sessions"], first
    assert (repo / "data" / "sessions" / "backtest" / "rows.parquet").exists()
    assert (repo / "reports" / "plots" / "sessions.png").exists()

    assert _ran(_run([sys.executable, "-m", "dvc", "repro", "sessions"], repo)) == []

    _set(repo, "sessions", "length", 15)
    assert _ran(_run([sys.executable, "-m", "dvc", "repro", "sessions"], repo)) == ["sessions"]

    _set(repo, "features", "rsi", 10)
    assert _ran(_run([sys.executable, "-m", "dvc", "repro", "sessions"], repo)) == ["features", "sessions"]

    assert _ran(_run([sys.executable, "-m", "dvc", "repro", "sessions"], repo)) == []
    metrics = _run([sys.executable, "-m", "dvc", "metrics", "show"], repo)
    assert "reports/sessions.json" in metrics
