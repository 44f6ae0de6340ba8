"""Small helpers every stage uses: provenance (``git_commit``), atomic outputs (``atomic_dir``, ``write_json``) and
the one rule for split dates (``parse_day``). No heavy imports: the CLI, the stages and the registry share them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rltrader.errors import ConfigError


def git_commit() -> str | None:
    """Commit of the checkout the package runs from (None outside git): provenance for outputs and runs."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temp folder beside ``target``; on success it replaces ``target`` in one rename, else vanishes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON, written to a temp file and renamed: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def parse_day(text: str, where: str) -> int:
    """An ISO date (UTC when no zone is given) as epoch microseconds; ``where`` names the parameter in the error."""
    try:
        d = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(f"{where}: {text!r} is not an ISO date") from exc
    return int((d if d.tzinfo else d.replace(tzinfo=UTC)).timestamp() * 1_000_000)
