"""Bearer API-key check in constant time; health probes are exempt."""

from __future__ import annotations

import hmac
import os

from llmray.serving.errors import APIError

PUBLIC_PATHS = ("/health", "/ready")


def resolve_api_key(api_key: str | None, api_key_env: str | None) -> str | None:
    """The configured key, else the one in the named environment variable, else None (no auth)."""
    if api_key:
        return api_key
    if api_key_env and os.environ.get(api_key_env):
        return os.environ[api_key_env]
    return None


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def require_key_for_bind(cfg) -> str | None:
    """The API key for a ServeConfig; a UserError (the server refuses to start) when it binds to
    anything other than loopback without one."""
    from llmray.errors import UserError

    key = resolve_api_key(cfg.api_key, cfg.api_key_env)
    if key is None and cfg.host not in LOOPBACK and not cfg.host.startswith("127."):
        env = cfg.api_key_env or "LLMRAY_API_KEY"
        raise UserError(f"refusing to serve on {cfg.host} without an API key: set one with "
                        f"`export {env}=<a secret of 8+ characters>` (or api_key in the config), "
                        "or bind to 127.0.0.1")
    return key


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
