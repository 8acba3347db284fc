"""Who may talk to the API from a browser: a Host allow-list, and no state-changing cross-origin request.

Without keys the API is open to anyone who can reach it, and a web page in the user's browser can
reach it: a cross-site form or `fetch` with a simple content type can upload and cancel jobs (no
preflight), and a page whose name is re-pointed at 127.0.0.1 (DNS rebinding) can read answers too.
So, in both modes:

- a request whose `Host` is not in `TRAINSERVE_ALLOWED_HOSTS` (default: the bound address and the
  localhost names) is refused 400, which ends DNS rebinding: the browser sends the attacker's name;
- a POST, PUT, PATCH or DELETE that a browser marks as coming from another origin (`Origin`, or
  `Sec-Fetch-Site: cross-site` when there is no `Origin`) is refused 403, unless that origin is the
  API's own or one of `TRAINSERVE_CORS_ALLOW_ORIGINS`. Clients that are not browsers send neither
  header and are not affected.
"""

from __future__ import annotations

import json

from starlette.datastructures import URL, Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from app.core.config import Settings

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
DEFAULT_PORTS = {"http": 80, "https": 443}


def host_name(host: str) -> str:
    """The name part of a Host header (`[::1]:8000` → `::1`, `Example.com:80` → `example.com`)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _netloc(scheme: str, host: str) -> str:
    """`host[:port]` with the scheme's default port left out, lower case, for comparing origins."""
    parsed = URL(f"{scheme}://{host.strip().lower()}")
    try:
        port = parsed.port
    except ValueError:  # not a number
        return host.strip().lower()
    name = f"[{parsed.hostname}]" if parsed.hostname and ":" in parsed.hostname else parsed.hostname or ""
    return name if port is None or port == DEFAULT_PORTS.get(scheme) else f"{name}:{port}"


def same_origin(origin: str, host: str) -> bool:
    """Does `Origin` name this server (its host and port as the request's Host gives them)? The
    scheme is not compared: behind a TLS proxy the page is https while the API sees http."""
    parsed = URL(origin)
    if parsed.scheme not in DEFAULT_PORTS or not parsed.netloc:
        return False
    return _netloc(parsed.scheme, parsed.netloc) == _netloc(parsed.scheme, host)


async def _refuse(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class HostOriginMiddleware:
    """Pure ASGI: runs before anything else, so a refused request costs no body read and no route."""

    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.allowed_hosts = settings.effective_allowed_hosts
        self.allowed_origins = frozenset(origin.rstrip("/") for origin in settings.cors_allow_origins)

    def host_allowed(self, host: str) -> bool:
        if "*" in self.allowed_hosts:
            return True
        name = host_name(host)
        return name in self.allowed_hosts or any(
            pattern.startswith("*.") and name.endswith(pattern[1:]) for pattern in self.allowed_hosts
        )

    def origin_allowed(self, origin: str, host: str) -> bool:
        return "*" in self.allowed_origins or origin in self.allowed_origins or same_origin(origin, host)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if not self.host_allowed(host):
            await _refuse(
                send,
                400,
                f"Host {host[:100]!r} is not served here; allowed: {', '.join(sorted(self.allowed_hosts))} "
                "(TRAINSERVE_ALLOWED_HOSTS)",
            )
            return
        if scope["method"] in STATE_CHANGING:
            origin = headers.get("origin")
            cross_site = headers.get("sec-fetch-site") == "cross-site"
            if (origin is None and cross_site) or (
                origin is not None and not self.origin_allowed(origin.rstrip("/"), host)
            ):
                await _refuse(
                    send,
                    403,
                    f"cross-origin {scope['method']} from {(origin or 'another site')[:100]!r} refused: "
                    "not this server's origin, and not in TRAINSERVE_CORS_ALLOW_ORIGINS",
                )
                return
        await self.app(scope, receive, send)
