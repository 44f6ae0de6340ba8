"""The control app: the trigger router and the trader's status/control router behind bearer-token auth, the live
page, and ``serve`` (``rltrader api serve``) / ``serve_in_thread`` (``rltrader trade --api-port``)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from fastapi import FastAPI

import rltrader
from rltrader.api import auth, trader, triggers
from rltrader.errors import ConfigError


def create_app(token: str | None = None, records_url: str | Path | None = None) -> FastAPI:
    """The app; ``token`` defaults to ``RLTRADER_API_TOKEN`` (None: no auth, which :func:`serve` allows on
    loopback only); ``records_url``: the trader's records (default ``trader.records_url`` of params.yaml)."""
    app = FastAPI(title="rltrader control API", version=rltrader.__version__,
                  description="Creates runs of the Prefect deployments (data collection, backfill, training, the "
                              "nightly pipeline) and reports their state; the trader's status, records, metrics "
                              "and controls (halt, resume, flatten, …), and its live page at /live.")
    auth.install(app, token if token is not None else auth.token_from_env())
    app.state.trader_records_url = None if records_url is None else str(records_url)
    app.include_router(triggers.router)
    app.include_router(trader.public)
    app.include_router(trader.router)
    return app


def serve(host: str = "127.0.0.1", port: int = 8080, token: str | None = None,
          records_url: str | Path | None = None) -> None:
    """Run the app with uvicorn until interrupted; refuses a non-loopback address without a token."""
    import uvicorn

    token = token if token is not None else auth.token_from_env()
    auth.check_bind(host, token)
    uvicorn.run(create_app(token, records_url), host=host, port=port, log_level="info")


class ApiThread:
    """uvicorn in a daemon thread beside the trading loop (its own event loop; the loop never waits on it)."""

    def __init__(self, host: str, port: int, token: str | None, records_url: str | Path | None) -> None:
        import uvicorn

        auth.check_bind(host, token)
        config = uvicorn.Config(create_app(token, records_url), host=host, port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="rltrader-api", daemon=True)
        self.host, self.port = host, port

    def start(self, timeout: float = 30.0) -> ApiThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"api: could not serve on {self.host}:{self.port} (in use?)")
            time.sleep(0.02)
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def serve_in_thread(host: str = "127.0.0.1", port: int = 8080, token: str | None = None,
                    records_url: str | Path | None = None) -> ApiThread:
    """Start the API in a thread (``rltrader trade --api-port``); same token rule as :func:`serve`."""
    return ApiThread(host, port, token if token is not None else auth.token_from_env(), records_url).start()
