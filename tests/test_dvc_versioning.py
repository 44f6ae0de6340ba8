"""DVC as its users expect, in a throwaway git+dvc repo with the real dvc.yaml, .gitignore and .dvc/config on tiny
params and real shared data: cached features, sessions and models that `dvc push` / `dvc pull` round-trip through
the default remote and that `git checkout <commit> && dvc checkout` restores exactly; metrics committed to git so
`dvc metrics diff` and `dvc plots diff` compare two commits; `dvc exp run -S d3qn.lr=…` / `dvc exp show` listing
params and metrics of an experiment; and params.tuned.yaml changing what `dvc repro` trains."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from test_dvc_pipeline import REPO, TINY, TINY_TRAIN, _ran, _run

pytestmark = pytest.mark.slow  # several small `dvc repro` runs with real training

DVC = [sys.executable, "-m", "dvc"]


def _repo(tmp_path: Path, shared_archive: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("dvc.yaml", ".gitignore", "params.tuned.yaml"):
        shutil.copy2(REPO / name, repo / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["archive_base"] = str(shared_archive)
    for section, values in {**TINY, "d3qn": TINY_TRAIN["d3qn"], "train": {"val_sessions": 50}}.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q", "-b", "main"], repo)
    _run([*DVC, "init", "-q"], repo)
    shutil.copy2(REPO / ".dvc" / "config", repo / ".dvc" / "config")  # the project's default remote
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "init"], repo)
    return repo


def _json(args: list[str], repo: Path) -> dict:  # type: ignore[type-arg]
    """A DVC command's ``--json`` stdout (its stderr may carry notices)."""
    import os
    import subprocess

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    loaded = json.loads(proc.stdout)
    return {"rows": loaded} if isinstance(loaded, list) else loaded


def _digest(repo: Path, *paths: str) -> dict[str, str]:
    """sha256 of every file under ``paths`` (relative names): what "restored exactly" is checked against."""
    out = {}
    for p in paths:
        root = repo / p
        files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
        for f in files:
            out[str(f.relative_to(repo))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


VERSIONED = ("data/features", "data/sessions", "data/models/d3qn.pt", "reports/plots/sessions.png")


def _commit(repo: Path, msg: str) -> str:
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", msg], repo)
    return _run(["git", "rev-parse", "HEAD"], repo).strip()


def test_dvc_versions_data_models_metrics_and_experiments(tmp_path: Path, shared_archive: Path) -> None:
    repo = _repo(tmp_path, shared_archive)
    first = _run([*DVC, "repro", "train@d3qn"], repo)
    assert _ran(first) == ["ingest", "features", "sessions", "train@d3qn"], first
    # metrics are git files (committed with dvc.lock); data and models are DVC-cached, not in git
    tracked = _run(["git", "status", "--porcelain", "--untracked-files=all"], repo)
    assert "reports/sessions.json" in tracked and "reports/train_d3qn.json" in tracked
    assert "data/" not in tracked and "reports/plots" not in tracked
    a = _commit(repo, "A")
    at_a = _digest(repo, *VERSIONED)
    # push each commit's data to the default remote (a git-ignored folder in the repo unless reconfigured); not
    # `push --all-commits`: DVC resolves a relative local remote against the wrong root in that mode (dvc#10054)
    _run([*DVC, "push", "--with-deps", "train@d3qn"], repo)

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["sessions"]["length"] = 15
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_run([*DVC, "repro", "train@d3qn"], repo)) == ["ingest", "sessions", "train@d3qn"]
    b = _commit(repo, "B")
    at_b = _digest(repo, *VERSIONED)
    assert at_a[next(k for k in at_a if k.startswith("data/sessions/train"))] != \
        at_b[next(k for k in at_b if k.startswith("data/sessions/train"))]

    # metrics and plots compare two commits
    diff = _json([*DVC, "metrics", "diff", a, b, "--json"], repo)
    assert diff.get("reports/sessions.json"), diff
    out = tmp_path / "plots"
    _run([*DVC, "plots", "diff", a, b, "--out", str(out)], repo)
    assert (out / "index.html").is_file()
    assert len([p for p in (out / "static").glob("*sessions.png")]) == 2  # one image per commit

    _run([*DVC, "push", "--with-deps", "train@d3qn"], repo)
    assert any((repo / ".dvc-remote").rglob("*"))

    # an older commit's data and model come back exactly
    _run(["git", "checkout", "-q", a], repo)
    _run([*DVC, "checkout", "--force", "--with-deps", "train@d3qn"], repo)  # the stages run here
    assert _digest(repo, *VERSIONED) == at_a
    assert _ran(_run([*DVC, "repro", "train@d3qn"], repo)) == ["ingest"]  # and DVC sees the rest as up to date

    # pull round trip: without cache and outputs, `dvc pull` restores them from the remote
    for p in (".dvc/cache", "data/features", "data/sessions", "data/models"):
        shutil.rmtree(repo / p)
    _run([*DVC, "pull", "--with-deps", "train@d3qn"], repo)
    assert _digest(repo, *VERSIONED) == at_a
    _run(["git", "checkout", "-q", "main"], repo)
    _run([*DVC, "pull", "--with-deps", "train@d3qn"], repo)
    assert _digest(repo, *VERSIONED) == at_b

    # experiments: a parameter set on the command line, listed with its metrics
    _run([*DVC, "exp", "run", "train@d3qn", "-S", "d3qn.lr=0.001", "--name", "lr-1e-3"], repo)
    shown = _json([*DVC, "exp", "show", "--json"], repo)["rows"]
    exps = [e for rev in shown for e in (rev.get("experiments") or [])]
    names = {e.get("name"): e for e in exps}
    assert "lr-1e-3" in names, shown
    data = names["lr-1e-3"]["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["d3qn"]["lr"] == 0.001
    assert "val" in data["metrics"]["reports/train_d3qn.json"]["data"]

    # tuning writes params.tuned.yaml: `dvc repro` retrains exactly the tuned configuration
    tuned = yaml.safe_load((repo / "params.tuned.yaml").read_text())
    assert tuned == {"backtest": {}, "cnn": {}, "d3qn": {}, "lowrider": {}, "ppo": {},  # nothing tuned as committed
                     "study": {}, "xgb": {}}
    tuned["d3qn"] = {"lr": 0.0005}
    (repo / "params.tuned.yaml").write_text(yaml.safe_dump(tuned))
    assert _ran(_run([*DVC, "repro", "train@d3qn"], repo)) == ["ingest", "train@d3qn"]
    from mlflow.tracking import MlflowClient

    run_id = json.loads((repo / "reports" / "train_d3qn.json").read_text())["run_id"]
    run = MlflowClient(f"sqlite:///{repo}/mlflow/mlflow.db").get_run(run_id)
    assert run.data.params["d3qn.lr"] == "0.0005"
