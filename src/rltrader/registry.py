"""The MLflow model registry step: register every trained model, promote a challenger to ``champion`` only when
it passes every gate, and roll back.

Why gates and not "the newest model wins": a retrain on fresh data is not automatically better, and a model that
loses to doing nothing (``flat``) or to ``buy_and_hold`` net of fees must never trade. The rules
(``params.yaml: promote``), all on the continuous backtests of the ``backtest`` stage:

- the challenger is the candidate (``promote.candidates``) with the best val ``metric``;
- on val AND backtest: ``metric`` ≥ champion's + ``margin`` (skipped only when there is no champion), max
  drawdown ≤ ``max_drawdown``, and ``metric`` and total return strictly above every ``promote.baselines``;
- the champion is re-evaluated on the same data as the challenger when its inputs still fit the current
  dataset (same context, features and actions); otherwise its recorded metrics are used and the decision says so.

Aliases: ``champion`` is what the trader loads; ``previous`` is the champion before it; the registered model's
``champion_history`` tag lists every promoted version so ``--rollback`` can walk back more than one step.
Every decision is an MLflow run (``promote``, with the numbers) and a JSON file; ``--dry-run`` only prints.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rltrader.config import Settings
from rltrader.errors import ConfigError, DataError, RLTraderError
from rltrader.integrity import BACKTEST_PRODUCER, PROMOTE_PRODUCER, read_report, write_report

CHAMPION, PREVIOUS = "champion", "previous"
HISTORY_TAG = "champion_history"
TAG_METRICS = ("total_return", "sharpe_daily_annualized", "sortino", "max_drawdown", "win_rate", "trades_per_day",
               "fees_paid", "n_days")
"""Metrics copied onto each model version as tags (``val_bt_*`` and ``backtest_*``), readable in the registry UI."""


class PromotionError(RLTraderError):
    """The registry is not in a state the requested step can work from (no champion to roll back, …)."""


@dataclass(frozen=True)
class Gate:
    name: str
    passed: bool
    detail: str


@dataclass
class Decision:
    action: str
    """``promote``, ``refuse``, ``keep`` (the challenger already is champion) or ``rollback``."""
    model_name: str
    challenger: str | None = None
    challenger_version: str | None = None
    champion_version: str | None = None
    gates: list[Gate] = field(default_factory=list)
    dry_run: bool = False
    notes: list[str] = field(default_factory=list)
    numbers: dict[str, float | None] = field(default_factory=dict)
    time: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def promoted(self) -> bool:
        return self.action == "promote" and not self.dry_run

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["promoted"] = self.promoted
        return d

    def summary(self) -> str:
        failed = [g for g in self.gates if not g.passed]
        head = {"promote": f"PROMOTED {self.challenger} v{self.challenger_version} to {CHAMPION}",
                "refuse": f"REFUSED {self.challenger} v{self.challenger_version}: {len(failed)} gate(s) failed",
                "keep": f"{self.challenger} v{self.challenger_version} already is {CHAMPION}; nothing to do",
                "rollback": f"ROLLED BACK {CHAMPION} to v{self.challenger_version} (was v{self.champion_version})",
                }[self.action]
        if self.dry_run:
            head = "dry run, would have: " + head
        lines = [head] + [f"  [{'pass' if g.passed else 'FAIL'}] {g.name}: {g.detail}" for g in self.gates]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


# ------------------------------------------------------------------------------------------------------- gates
def _num(m: Mapping[str, Any] | None, key: str) -> float:
    v = None if m is None else m.get(key)
    return float(v) if isinstance(v, int | float) else math.nan


def decide(challenger: Mapping[str, Mapping[str, Any]], champion: Mapping[str, Mapping[str, Any]] | None,
           baselines: Mapping[str, Mapping[str, Mapping[str, Any]]], cfg: Any,
           splits: Sequence[str] = ("val", "backtest")) -> list[Gate]:
    """The gates, as plain arithmetic on metrics dicts (``split → metrics``; baselines ``split → name → metrics``).
    An undefined (NaN) number never passes a gate."""
    metric, gates = cfg.metric, []
    for split in splits:
        m = challenger.get(split)
        x = _num(m, metric)
        if champion is not None:
            c = _num(champion.get(split), metric)
            ok = math.isfinite(x) and math.isfinite(c) and x >= c + cfg.margin
            gates.append(Gate(f"beats champion on {split}", ok,
                              f"{metric} {x:.4g} vs champion {c:.4g} + margin {cfg.margin:g}"))
        dd = _num(m, "max_drawdown")
        gates.append(Gate(f"drawdown on {split}", math.isfinite(dd) and dd <= cfg.max_drawdown,
                          f"max drawdown {dd:.2%} (limit {cfg.max_drawdown:.0%})"))
        r = _num(m, "total_return")
        for b in cfg.baselines:
            bm = baselines.get(split, {}).get(b)
            if bm is None:
                gates.append(Gate(f"beats {b} on {split}", False, f"{b} was not evaluated on {split}"))
                continue
            bx, br = _num(bm, metric), _num(bm, "total_return")
            ok = all(math.isfinite(v) for v in (x, bx, r, br)) and x > bx and r > br
            gates.append(Gate(f"beats {b} on {split}", ok,
                              f"{metric} {x:.4g} vs {bx:.4g}, total return {r:+.4%} vs {br:+.4%} (net of fees)"))
    return gates


# ------------------------------------------------------------------------------------------------- registry I/O
def _client(settings: Settings) -> Any:
    import os

    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow.set_tracking_uri(settings.train.tracking_uri)
    mlflow.set_registry_uri(settings.train.tracking_uri)
    return mlflow.MlflowClient(tracking_uri=settings.train.tracking_uri, registry_uri=settings.train.tracking_uri)


def _alias(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _history(client: Any, name: str) -> list[str]:
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(name).tags or {}
    except MlflowException:
        return []
    return [str(v) for v in json.loads(tags.get(HISTORY_TAG, "[]"))]


def _metric_tags(per_split: Mapping[str, Mapping[str, Any]], primary: str) -> dict[str, str]:
    tags = {}
    for split, m in per_split.items():
        prefix = "backtest_" if split == primary else f"{split}_bt_"
        tags.update({f"{prefix}{k}": f"{_num(m, k):.6g}" for k in TAG_METRICS})
    return tags


def register_models(settings: Settings, summary: Mapping[str, Any]) -> dict[str, str]:
    """Each trained model of the ``backtest`` stage's summary as a registry version (name → version), tagged with
    its data fingerprint, params hash, git commit and val/backtest metrics. Idempotent: a model whose training run
    already has a version is not registered twice (its tags are refreshed)."""
    import mlflow

    client = _client(settings)
    name = settings.promote.model_name
    if not _registered(client, name):
        client.create_registered_model(name, description="rltrader trading policies (PolicyModule: flat observation "
                                       "→ action scores). Alias champion = what the trader loads.")
    versions: dict[str, str] = {}
    for algo in summary["models"]:
        uri, run_id = summary["model_uris"].get(algo), summary["train_runs"].get(algo)
        if not uri or not run_id:
            raise DataError(f"reports/train_{algo}.json: no model_uri/run_id for {algo} (re-run `rltrader train "
                            f"{algo}`); it cannot be registered")
        run = client.get_run(run_id)
        per_split = {s: summary["metrics"][s][algo] for s in summary["splits"]}
        tags = {"algo": algo, "train_run_id": run_id,
                **{k: run.data.tags.get(k, "unknown") for k in ("data_fingerprint", "params_hash", "git_commit")},
                **_metric_tags(per_split, summary["primary_split"])}
        existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
        mv = existing[0] if existing else mlflow.register_model(uri, name, tags=tags)
        for k, v in tags.items():
            client.set_model_version_tag(name, mv.version, k, v)
        versions[algo] = str(mv.version)
    return versions


def _champion_metrics(settings: Settings, champion: Any, splits: Sequence[str], primary: str,
                      sessions_dir: Path | None, features_dir: Path | None) -> tuple[dict[str, dict[str, Any]], str]:
    """The champion on the challenger's data (re-run), or its recorded tags when it no longer fits the data."""
    from rltrader.agents.packaging import load_mlflow_policy
    from rltrader.evaluate.backtest import continuous_split
    from rltrader.evaluate.stage import evaluate

    name = settings.promote.model_name
    try:
        module = load_mlflow_policy(f"models:/{name}@{CHAMPION}")  # a corrupt champion: DataError → tags
        out = {}
        for split in splits:
            data = continuous_split(settings, split, sessions_dir=sessions_dir, features_dir=features_dir)
            names = list(getattr(module, "meta", {}).get("feature_names") or data.feature_names)
            if names != list(data.feature_names):
                raise ConfigError("the champion was trained on other features")
            out[split] = evaluate(settings, module, data, split)[1]
        return out, f"champion v{champion.version} re-evaluated on the same data as the challenger"
    except (ConfigError, DataError) as exc:
        tags = champion.tags or {}
        out = {}
        for split in splits:
            prefix = "backtest_" if split == primary else f"{split}_bt_"
            out[split] = {k: float(tags[prefix + k]) for k in TAG_METRICS if prefix + k in tags}
        return out, (f"champion v{champion.version} cannot run on the current dataset ({exc}); compared with its "
                     "recorded metrics, which come from its own data")


def _record(settings: Settings, decision: Decision, path: Path | None) -> None:
    """The decision as an MLflow run ``promote`` and as JSON (``promote.decision_path``)."""
    import mlflow
    from rltrader.agents.common import mlflow_run

    t = settings.train
    with mlflow_run(t.tracking_uri, t.experiment, "promote", t.artifact_root):
        mlflow.set_tags({"decision": decision.action, "promoted": str(decision.promoted),
                         "challenger": str(decision.challenger), "challenger_version": str(decision.challenger_version),
                         "champion_version": str(decision.champion_version)})
        mlflow.log_metrics({k: v for k, v in decision.numbers.items() if v is not None and math.isfinite(v)}
                           | {"promoted": float(decision.promoted),
                              "gates_failed": float(sum(not g.passed for g in decision.gates))})
        mlflow.log_dict(decision.as_dict(), "decision.json")
    target = path or settings.promote.decision_path
    write_report(target, decision.as_dict(), PROMOTE_PRODUCER)  # the nightly flow reads it


def promote(settings: Settings, *, dry_run: bool = False, summary_path: Path = Path("reports/backtest/summary.json"),
            decision_path: Path | None = None, sessions_dir: Path | None = None,
            features_dir: Path | None = None) -> Decision:
    """Register the backtest stage's models, pick the challenger, apply the gates, move the aliases."""
    if not summary_path.is_file():
        raise DataError(f"{summary_path}: no backtest summary (run `rltrader backtest` first)")
    summary = read_report(summary_path, "backtest summary", BACKTEST_PRODUCER)
    cfg = settings.promote
    splits = [s for s in ("val", summary["primary_split"]) if s in summary["splits"]]
    if len(splits) < 2:
        raise ConfigError(f"backtest.eval_splits: promotion compares on val and {summary['primary_split']}; the "
                          f"backtest summary only has {', '.join(summary['splits'])}")
    primary = summary["primary_split"]
    candidates = [c for c in cfg.candidates if c in summary["models"]]
    if not candidates:
        raise ConfigError(f"promote.candidates: none of {cfg.candidates} was backtested (backtest.models: "
                          f"{summary['models']})")
    client = _client(settings)
    versions = register_models(settings, summary) if not dry_run else {}
    challenger = max(candidates, key=lambda c: (lambda v: v if math.isfinite(v) else -math.inf)(
        _num(summary["metrics"]["val"][c], cfg.metric)))
    ch = {s: summary["metrics"][s][challenger] for s in splits}
    bases = {s: {b: summary["metrics"][s][b] for b in summary["baselines"] if b in summary["metrics"][s]}
             for s in splits}
    if dry_run:
        run_id = summary["train_runs"][challenger]
        found = client.search_model_versions(f"name='{cfg.model_name}' and run_id='{run_id}'")
        ver = str(found[0].version) if found else "(new)"
    else:
        ver = versions[challenger]
    champ = _alias(client, cfg.model_name, CHAMPION)
    decision = Decision(action="refuse", model_name=cfg.model_name, challenger=challenger, challenger_version=ver,
                        champion_version=None if champ is None else str(champ.version), dry_run=dry_run)
    decision.notes.append(f"challenger = best val {cfg.metric} among {', '.join(candidates)}")
    champ_metrics = None
    if champ is not None and str(champ.version) == ver:
        decision.action = "keep"
    else:
        if champ is not None:
            champ_metrics, note = _champion_metrics(settings, champ, splits, primary, sessions_dir, features_dir)
            decision.notes.append(note)
        else:
            decision.notes.append("no champion yet: the baseline and drawdown gates still apply")
        decision.gates = decide(ch, champ_metrics, bases, cfg, splits)
        decision.action = "promote" if all(g.passed for g in decision.gates) else "refuse"
    for s in splits:
        decision.numbers[f"challenger_{s}_{cfg.metric}"] = _num(ch[s], cfg.metric)
        decision.numbers[f"challenger_{s}_total_return"] = _num(ch[s], "total_return")
        decision.numbers[f"challenger_{s}_max_drawdown"] = _num(ch[s], "max_drawdown")
        if champ_metrics is not None:
            decision.numbers[f"champion_{s}_{cfg.metric}"] = _num(champ_metrics.get(s), cfg.metric)
        for b, bm in bases[s].items():
            decision.numbers[f"{b}_{s}_{cfg.metric}"] = _num(bm, cfg.metric)
    if dry_run:
        return decision
    if decision.action == "promote":
        history = _history(client, cfg.model_name)
        if champ is not None:
            client.set_registered_model_alias(cfg.model_name, PREVIOUS, champ.version)
            if not history or history[-1] != str(champ.version):
                history.append(str(champ.version))
        client.set_registered_model_alias(cfg.model_name, CHAMPION, ver)
        history.append(ver)
        client.set_registered_model_tag(cfg.model_name, HISTORY_TAG, json.dumps(history))
        client.set_model_version_tag(cfg.model_name, ver, "promoted_at", decision.time)
    _record(settings, decision, decision_path)
    return decision


def _registered(client: Any, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException:
        return False


def rollback(settings: Settings, *, dry_run: bool = False, decision_path: Path | None = None) -> Decision:
    """``champion`` back to the version before it (``previous``); ``previous`` moves one further back."""
    client = _client(settings)
    name = settings.promote.model_name
    champ = _alias(client, name, CHAMPION)
    prev = _alias(client, name, PREVIOUS) if champ is not None else None
    if champ is None or prev is None:
        raise PromotionError(f"registered model {name!r}: nothing to roll back to (champion: "
                             f"{'none' if champ is None else 'v' + str(champ.version)}, previous: none)")
    history = _history(client, name) or [str(prev.version), str(champ.version)]
    if history[-1] == str(champ.version):
        history.pop()
    if not history or history[-1] != str(prev.version):
        history.append(str(prev.version))
    decision = Decision(action="rollback", model_name=name, challenger=(prev.tags or {}).get("algo"),
                        challenger_version=str(prev.version), champion_version=str(champ.version), dry_run=dry_run)
    earlier = history[-2] if len(history) >= 2 else None
    decision.notes.append(f"{PREVIOUS} becomes " + (f"v{earlier}" if earlier else "unset (no earlier champion)"))
    if dry_run:
        return decision
    client.set_registered_model_alias(name, CHAMPION, prev.version)
    if earlier:
        client.set_registered_model_alias(name, PREVIOUS, earlier)
    else:
        client.delete_registered_model_alias(name, PREVIOUS)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    client.set_model_version_tag(name, champ.version, "rolled_back_at", decision.time)
    _record(settings, decision, decision_path)
    return decision
