"""Binance's SIGNED endpoint security, server side: API key, HMAC-SHA256 signature, timestamp and recvWindow.

The rules are Binance's (spot "SIGNED Endpoint security", the same for USDⓈ-M futures): the ``X-MBX-APIKEY``
header names the key; ``signature`` is the hex HMAC-SHA256, keyed by the secret, of the *total params*: the
query string followed directly by the request body, without the ``signature`` parameter itself; the request
must carry ``timestamp`` (ms) and is refused when the server received it more than ``recvWindow`` (default
5000, at most 60000) after it, or when the timestamp is more than 1 s ahead of the server.

Time here is wall-clock time, like the request-weight window: recvWindow guards network latency, a real-time
notion, and the clients sign with their own clock (python-binance uses ``time.time()``), whatever market
time the replay shows.

One leniency: python-binance signs the parameter values as they are, while ``requests`` percent-encodes the
form body it sends; Binance's own server decodes before checking. A signature over the percent-decoded
total params is therefore accepted as well.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from urllib.parse import unquote_plus

from rltrader.sim.rest import MANDATORY, BinanceError

DEFAULT_RECV_WINDOW_MS = 5000
MAX_RECV_WINDOW_MS = 60000


def hmac_sha256(secret: str, payload: str) -> str:
    """The hex signature Binance expects for ``payload`` under ``secret``."""
    return hmac.new(secret.encode(), payload.encode(), hashlib.sha256).hexdigest()


def _without_signature(raw: str) -> tuple[str, str | None]:
    """``raw`` (a query string or form body) without its ``signature=…`` pair, and that signature."""
    if not raw:
        return "", None
    kept: list[str] = []
    signature: str | None = None
    for part in raw.split("&"):
        if part.startswith("signature="):
            signature = part[len("signature="):]
        else:
            kept.append(part)
    return "&".join(kept), signature


def total_params(query: str, body: str) -> tuple[str, str | None]:
    """What Binance signs: query string then body, concatenated as they are, the signature taken out."""
    q, sig_q = _without_signature(query)
    b, sig_b = _without_signature(body)
    return q + b, sig_q if sig_q is not None else sig_b


def verify(headers: Mapping[str, str], query: str, body: str, params: Mapping[str, str],
           secrets: Mapping[str, str], *, now_ms: float | None = None) -> str:
    """Check a SIGNED request; return its API key or raise the BinanceError Binance answers with."""
    key = headers.get("X-MBX-APIKEY", "")
    if not key:
        raise BinanceError(-2014, "API-key format invalid.", status=401)
    secret = secrets.get(key)
    if secret is None:
        raise BinanceError(-2015, "Invalid API-key, IP, or permissions for action.", status=401)
    for name in ("timestamp", "signature"):
        if not params.get(name):
            raise BinanceError(-1102, MANDATORY.format(name))
    payload, signature = total_params(query, body)
    expected = hmac_sha256(secret, payload)
    ok = signature is not None and hmac.compare_digest(signature.lower(), expected)
    if not ok and signature is not None and payload != unquote_plus(payload):
        ok = hmac.compare_digest(signature.lower(), hmac_sha256(secret, unquote_plus(payload)))
    if not ok:
        raise BinanceError(-1022, "Signature for this request is not valid.")
    try:
        ts = int(params["timestamp"])
        window = int(params.get("recvWindow") or DEFAULT_RECV_WINDOW_MS)
    except ValueError as exc:
        raise BinanceError(-1100, "Illegal characters found in a parameter.") from exc
    if window > MAX_RECV_WINDOW_MS or window <= 0:
        raise BinanceError(-1131, f"recvWindow must be less than {MAX_RECV_WINDOW_MS}")
    now = time.time() * 1000 if now_ms is None else now_ms
    if ts >= now + 1000:
        raise BinanceError(-1021, "Timestamp for this request was 1000ms ahead of the server's time.")
    if now - ts > window:
        raise BinanceError(-1021, "Timestamp for this request is outside of the recvWindow.")
    return key


__all__ = ["DEFAULT_RECV_WINDOW_MS", "hmac_sha256", "total_params", "verify"]
