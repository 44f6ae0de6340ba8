"""Which policy trades: resolved once, pinned, reloaded only on request.

``--model`` takes what the backtest takes (``evaluate.backtest.load_policy``: a rule baseline name, a ``.pt``
file, an MLflow URI) plus a bare MLflow run id. A registry alias (``models:/rltrader@champion``) is resolved
ONCE to its version and the trader keeps that pinned version (``models:/rltrader/7``): promoting another model
does not change a running trader behind its back. ``alias_moved`` tells the trader (between bars) whether the
alias now points elsewhere; it then reloads only with ``trader.follow_champion: true`` or an explicit reload,
and records the new version.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from rltrader.errors import ConfigError
from rltrader.evaluate.backtest import POLICY_NAMES, load_policy

_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[\w-]+)$")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class ResolvedModel:
    spec: str
    """What the user asked for (``models:/rltrader@champion``, ``sma_cross``, …)."""
    uri: str
    """What was loaded (the pinned version's URI for an alias)."""
    version: str | None
    policy: Any


def resolve(settings: Any, spec: str, mode: str, seed: int = 0) -> ResolvedModel:
    """Load the policy ``spec`` names, pinning an alias to its current version."""
    if spec in POLICY_NAMES:
        return ResolvedModel(spec, spec, None, load_policy(spec, mode, seed))
    m = _ALIAS.match(spec)
    if m:
        from rltrader.registry import _alias, _client

        mv = _alias(_client(settings), m["name"], m["alias"])
        if mv is None:
            raise ConfigError(f"trader.model: no version of {m['name']!r} has the alias {m['alias']!r} in "
                              f"{settings.train.tracking_uri} (run `rltrader promote`, or trade a baseline: "
                              f"--model sma_cross)")
        uri = f"models:/{m['name']}/{mv.version}"
        return ResolvedModel(spec, uri, str(mv.version), load_policy(uri, mode, seed))
    if _RUN_ID.match(spec):
        uri = f"runs:/{spec}/model"
        return ResolvedModel(spec, uri, None, load_policy(uri, mode, seed))
    return ResolvedModel(spec, spec, None, load_policy(spec, mode, seed))


def alias_moved(settings: Any, current: ResolvedModel) -> str | None:
    """The alias's version now, when it differs from the pinned one (None: not an alias, or unchanged)."""
    m = _ALIAS.match(current.spec)
    if not m:
        return None
    from rltrader.registry import _alias, _client

    mv = _alias(_client(settings), m["name"], m["alias"])
    return None if mv is None or str(mv.version) == current.version else str(mv.version)
