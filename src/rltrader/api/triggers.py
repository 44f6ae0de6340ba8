"""REST triggers: each POST creates one flow run of an existing Prefect deployment and returns its id.

There is no second way of running anything: the run is created through Prefect (``arun_deployment`` with
``timeout=0``), so it shows up in the Prefect UI, obeys the deployment's concurrency limit, and is executed by
whatever serves the deployments (``python -m flows.deploy``). The handlers only validate, create and report.

- ``POST /data/collect``: ``start`` (the default) creates an ``ingest-live`` run for the given symbols, refused with
  409 while one is alive (pending, running, or scheduled to start now); it also resumes the deployment's 10-minute
  supervisor schedule if a ``stop`` paused it. ``stop`` pauses that schedule (else it would restart the stream
  within 10 minutes) and cancels every run that is running or still to come.
- ``POST /data/backfill``: a ``backfill-archive`` run for a day or a range (default yesterday).
- ``POST /train/{algo}``: a ``train`` run (queued behind a running one by its concurrency limit).
- ``POST /pipeline/run``: a ``nightly-retrain`` run now.
- ``GET /runs/{id}``: state and parameters of a flow run.

The deployment names are the ones ``flows/deploy.py`` declares (tests check they match).
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, HTTPException, Path, Request, status
from pydantic import BaseModel, ConfigDict, Field, field_validator

from rltrader.api.auth import require_token
from rltrader.data.schema import Market

# flow name/deployment name, as flows/deploy.py registers them
COLLECT = "ingest-live/ingest-live"
BACKFILL = "backfill-archive/backfill-archive-daily"
TRAIN = "train/train"
PIPELINE = "nightly-retrain/nightly-retrain"
DEPLOYMENTS = (COLLECT, BACKFILL, TRAIN, PIPELINE)
ALGOS = ("d3qn", "ppo", "cnn")  # rltrader.train.ALGOS (not imported: it would load torch into the API process)
RUN_TAG = "api"
# A scheduled run counts as alive when it is due within this window (ours are due now); the supervisor schedule's
# pre-created future runs are not a stream that is running.
DUE_WITHIN = timedelta(seconds=60)

router = APIRouter(dependencies=[Depends(require_token)])

_DAY = re.compile(r"^\d{4}-\d{2}(-\d{2})?$")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _symbols(v: list[str] | None) -> list[str] | None:
    if v is None:
        return None
    out = [s.strip().upper() for s in v if s.strip()]
    bad = [s for s in out if not re.fullmatch(r"[A-Z0-9]{2,30}", s)]
    if bad or not out:
        raise ValueError(f"symbols: expected Binance symbols like BTCUSDT, got {v!r}")
    return out


class CollectRequest(_Body):
    action: Literal["start", "stop"] = "start"
    symbols: list[str] | None = Field(default=None, description="default: params.yaml stream.symbols")
    market: Market | None = Field(default=None, description="default: params.yaml stream.market")
    max_seconds: float | None = Field(default=None, gt=0, description="stop after this long (default: never)")

    _check_symbols = field_validator("symbols")(_symbols)


class BackfillRequest(_Body):
    day: str | None = Field(default=None, description="YYYY-MM-DD or YYYY-MM (default: yesterday, UTC)")
    through: str | None = Field(default=None, description="inclusive end, YYYY-MM-DD or YYYY-MM (default: day)")
    market: Market | None = None
    symbols: list[str] | None = None
    interval: str = Field(default="1m", pattern=r"^\d+[smhdw]$")

    _check_symbols = field_validator("symbols")(_symbols)

    @field_validator("day", "through")
    @classmethod
    def _day(cls, v: str | None) -> str | None:
        if v is not None and not _DAY.match(v):
            raise ValueError(f"{v!r}: expected YYYY-MM-DD or YYYY-MM")
        return v


class TrainRequest(_Body):
    resume: bool = False
    params: str | None = Field(default=None, description="params file on the flow runner's host (default params.yaml)")


class PipelineRequest(_Body):
    through: str | None = Field(default=None, description="backfill through this day (default yesterday)")
    use_dvc: bool | None = None
    params: str | None = None


class RunOut(BaseModel):
    id: UUID
    name: str
    deployment: str | None
    state: str | None
    state_name: str | None
    parameters: dict[str, Any]
    created: datetime | None
    expected_start: datetime | None
    start_time: datetime | None
    end_time: datetime | None


class CollectStopped(BaseModel):
    deployment: str
    paused: bool
    cancelled: list[UUID]


def _unavailable(name: str, exc: Exception) -> HTTPException:
    from prefect.exceptions import ObjectNotFound

    if isinstance(exc, ObjectNotFound):
        return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                             f"Prefect deployment {name!r} is not registered (run `python -m flows.deploy`)")
    return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"Prefect API unavailable: {type(exc).__name__}")


def _run_out(run: Any, deployment: str | None) -> RunOut:
    state = run.state
    return RunOut(id=run.id, name=run.name, deployment=deployment,
                  state=state.type.value if state is not None else None,
                  state_name=state.name if state is not None else None, parameters=dict(run.parameters or {}),
                  created=run.created, expected_start=run.expected_start_time, start_time=run.start_time,
                  end_time=run.end_time)


async def create_run(name: str, parameters: dict[str, Any]) -> RunOut:
    """One flow run of deployment ``name`` (``flow/deployment``), scheduled now; returns at once."""
    import httpx
    from prefect.deployments import arun_deployment
    from prefect.exceptions import ObjectNotFound

    params = {k: v for k, v in parameters.items() if v is not None}  # the flow's defaults apply to the rest
    try:
        run = await arun_deployment(name, parameters=params, timeout=0, as_subflow=False, tags=[RUN_TAG])
    except (ObjectNotFound, httpx.HTTPError) as exc:
        raise _unavailable(name, exc) from exc
    return _run_out(run, name)


async def alive_runs(client: Any, deployment_id: UUID, *, due_only: bool = True) -> list[Any]:
    """Runs of the deployment that are pending, running, or scheduled (``due_only``: to start about now)."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    runs = await client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
            any_=[StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]))))
    due = datetime.now(UTC) + DUE_WITHIN
    return [r for r in runs if not due_only or r.state.type != StateType.SCHEDULED
            or (r.expected_start_time is None or r.expected_start_time <= due)]


def _lock(request: Request) -> asyncio.Lock:
    """Check-then-create of /data/collect under one lock per app, so two concurrent POSTs cannot both start."""
    lock: asyncio.Lock | None = getattr(request.app.state, "rltrader_collect_lock", None)
    if lock is None:
        lock = request.app.state.rltrader_collect_lock = asyncio.Lock()
    return lock


@router.post("/data/collect", status_code=status.HTTP_202_ACCEPTED, response_model=RunOut | CollectStopped)
async def collect(body: CollectRequest, request: Request) -> RunOut | CollectStopped:
    """Start (409 if one is alive) or stop the live ingester (``ingest-live`` deployment)."""
    import httpx
    from prefect import get_client
    from prefect.client.schemas.objects import State, StateType
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Cancelled, Cancelling

    async with _lock(request), get_client() as client:
        try:
            dep = await client.read_deployment_by_name(COLLECT)
            # stop: every run that could still stream, later ones included; start: only what is alive now
            alive = await alive_runs(client, dep.id, due_only=body.action == "start")
        except (ObjectNotFound, httpx.HTTPError) as exc:
            raise _unavailable(COLLECT, exc) from exc
        if body.action == "stop":
            await client.pause_deployment(dep.id)  # else the supervisor schedule restarts it
            for run in alive:
                # a run that has not started has nothing to stop: cancel outright; a running one is told to stop
                state: State[Any] = Cancelling() if run.state.type == StateType.RUNNING else Cancelled()
                await client.set_flow_run_state(run.id, state=state, force=True)
            return CollectStopped(deployment=COLLECT, paused=True, cancelled=[r.id for r in alive])
        if alive:
            ids = ", ".join(str(r.id) for r in alive)
            raise HTTPException(status.HTTP_409_CONFLICT,
                                f"{COLLECT} is already alive (flow run {ids}); stop it first")
        if dep.paused:
            await client.resume_deployment(dep.id)
        return await create_run(COLLECT, {"market": body.market.value if body.market else None,
                                          "symbols": body.symbols, "max_seconds": body.max_seconds})


@router.post("/data/backfill", status_code=status.HTTP_202_ACCEPTED, response_model=RunOut)
async def backfill(body: BackfillRequest) -> RunOut:
    """Archive backfill of a day or range (``backfill-archive`` deployment)."""
    return await create_run(BACKFILL, {"day": body.day, "through": body.through, "interval": body.interval,
                                       "market": body.market.value if body.market else None,
                                       "symbols": body.symbols})


@router.post("/train/{algo}", status_code=status.HTTP_202_ACCEPTED, response_model=RunOut)
async def train(algo: Annotated[str, Path(description=f"one of {', '.join(ALGOS)}")],
                body: TrainRequest | None = None) -> RunOut:
    """Train one algorithm (``train`` deployment; queued behind a running training)."""
    if algo not in ALGOS:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"algo {algo!r}: one of {', '.join(ALGOS)}")
    b = body or TrainRequest()
    return await create_run(TRAIN, {"algo": algo, "resume": b.resume, "params": b.params})


@router.post("/pipeline/run", status_code=status.HTTP_202_ACCEPTED, response_model=RunOut)
async def pipeline_run(body: PipelineRequest | None = None) -> RunOut:
    """The nightly retrain (backfill → rebuild → promote through the gates), now."""
    b = body or PipelineRequest()
    return await create_run(PIPELINE, {"through": b.through, "use_dvc": b.use_dvc, "params": b.params})


@router.get("/runs/{run_id}", response_model=RunOut)
async def get_run(run_id: UUID) -> RunOut:
    """State and parameters of a flow run (any run: the ids the POSTs return, or one from the Prefect UI)."""
    import httpx
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            run = await client.read_flow_run(run_id)
        except ObjectNotFound as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no flow run {run_id}") from exc
        except httpx.HTTPError as exc:
            raise _unavailable("flow runs", exc) from exc
        name = None
        if run.deployment_id is not None:
            try:
                dep = await client.read_deployment(run.deployment_id)
                flow = await client.read_flow(dep.flow_id)
                name = f"{flow.name}/{dep.name}"
            except ObjectNotFound:
                name = None
    return _run_out(run, name)
