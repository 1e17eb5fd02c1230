"""Bearer API-key check in constant time; health probes are exempt."""

from __future__ import annotations

import hmac
import os

from llmray.serving.schemas import APIError

PUBLIC_PATHS = ("/health", "/ready")


def resolve_api_key(api_key: str | None, api_key_env: str | None) -> str | None:
    """The configured key, else the one in the named environment variable, else None (no auth)."""
    if api_key:
        return api_key
    if api_key_env and os.environ.get(api_key_env):
        return os.environ[api_key_env]
    return None


def check_bearer(authorization: str | None, expected: str | None) -> None:
    """Raise a 401 APIError unless `Authorization: Bearer <expected>` (no-op when no key is set)."""
    if expected is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    # compare_digest takes time independent of where the strings differ: no timing oracle.
    ok = hmac.compare_digest(token.strip().encode(), expected.encode()) and scheme.lower() == "bearer"
    if not ok:
        raise APIError(401, "missing or invalid API key (send Authorization: Bearer <key>)",
                       None, type="authentication_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


def is_public(path: str, route_prefix: str = "/") -> bool:
    rel = "/" + path[len(route_prefix.rstrip("/")):].lstrip("/") if route_prefix != "/" else path
    return rel.rstrip("/") in PUBLIC_PATHS
