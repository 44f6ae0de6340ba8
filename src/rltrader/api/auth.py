"""Bearer-token auth for every control endpoint, and the rule that an unauthenticated API never leaves loopback.

The token comes from ``RLTRADER_API_TOKEN`` (never from params.yaml, never logged). With a token configured every
request must carry ``Authorization: Bearer <token>``; a missing or wrong one gets 401 before any handler runs, so
nothing happens. Without a token the API is open, which is only acceptable on loopback: :func:`check_bind` refuses
any other address. The token lives on ``app.state`` so any app that includes the routers (the trader API later)
sets it once with :func:`install`.
"""

from __future__ import annotations

import ipaddress
import os
import secrets

from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from rltrader.errors import ConfigError

TOKEN_ENV = "RLTRADER_API_TOKEN"
_bearer = HTTPBearer(auto_error=False, description=f"the value of {TOKEN_ENV}")


def token_from_env() -> str | None:
    return os.environ.get(TOKEN_ENV) or None


def install(app: FastAPI, token: str | None) -> None:
    """Make ``token`` (None: no auth, loopback only) the one the routers' :func:`require_token` checks."""
    app.state.rltrader_api_token = token


def require_token(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:  # noqa: B008
    expected: str | None = getattr(request.app.state, "rltrader_api_token", None)
    if expected is None:
        return
    given = creds.credentials if creds is not None and creds.scheme.lower() == "bearer" else ""
    if not secrets.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or wrong bearer token",
                            headers={"WWW-Authenticate": "Bearer"})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve without a token on anything but loopback (0.0.0.0, a LAN address, a host name)."""
    if token is None and not is_loopback(host):
        raise ConfigError(f"api serve --host {host}: refusing to serve the control API beyond loopback without a "
                          f"token; set {TOKEN_ENV} (clients send 'Authorization: Bearer <token>') or bind 127.0.0.1")
