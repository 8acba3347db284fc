"""API-key checks shared by the auth dependency and the body-limit middleware."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

# Reachable without a key even when TRAINSERVE_API_KEYS is set.
OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/openapi.json"})


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive), or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def key_matches(presented: str, keys: Sequence[str]) -> bool:
    """Constant time per key, and every key is compared: timing says nothing about which nearly matched."""
    candidate = presented.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key.encode())
    return matched


def api_key_matches(authorization: str | None, keys: Sequence[str]) -> bool:
    token = bearer_token(authorization)
    return token is not None and key_matches(token, keys)
