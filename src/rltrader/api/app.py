"""The control app: the trigger router behind bearer-token auth, and ``serve`` for ``rltrader api serve``."""

from __future__ import annotations

from fastapi import FastAPI

import rltrader
from rltrader.api import auth, triggers


def create_app(token: str | None = None) -> FastAPI:
    """The app; ``token`` defaults to ``RLTRADER_API_TOKEN`` (None: no auth, which :func:`serve` allows on
    loopback only)."""
    app = FastAPI(title="rltrader control API", version=rltrader.__version__,
                  description="Creates runs of the Prefect deployments (data collection, backfill, training, the "
                              "nightly pipeline) and reports their state.")
    auth.install(app, token if token is not None else auth.token_from_env())
    app.include_router(triggers.router)
    return app


def serve(host: str = "127.0.0.1", port: int = 8080, token: str | None = None) -> None:
    """Run the app with uvicorn until interrupted; refuses a non-loopback address without a token."""
    import uvicorn

    token = token if token is not None else auth.token_from_env()
    auth.check_bind(host, token)
    uvicorn.run(create_app(token), host=host, port=port, log_level="info")
