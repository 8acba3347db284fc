"""Request body limits, enforced while the body streams in (pure ASGI, so nothing is buffered first).

Every request gets a byte budget chosen by its route: image uploads `max_request_bytes`, a zip
`max_archive_bytes`, a weights file `max_weights_bytes`, one image for `/predict` `max_image_bytes`,
anything else `max_body_bytes`. A `Content-Length` over the budget is answered 413 before one body byte
is read; without one (chunked transfer), the bytes are counted as they arrive and the request is cut off
with 413 as soon as the count passes the budget. Upload routes also get per-file limits, which
`app.api.uploads` applies inside the multipart parser.

With API keys configured, a request that carries a body to a protected route is refused 401 before its
body is read, so nobody without a key can make the server spool a large upload.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.slow_clients import BodyTimeout, body_chunk_timeout
from app.core.config import Settings
from app.core.security import OPEN_PATHS, api_key_matches

# Boundaries, part headers and the small form fields that travel with a file.
MULTIPART_OVERHEAD = 64 * 1024
UPLOAD_LIMITS_KEY = "trainserve.upload_limits"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# At most this much of a refused (401) body is read, and dropped, so that small requests see the answer.
REFUSED_BODY_DRAIN_BYTES = 64 * 1024


@dataclass(frozen=True)
class UploadLimits:
    """Limits of one multipart upload route. `refuse_oversized`: a file over `file_bytes` fails the
    whole request (413); otherwise its first `file_bytes + 1` bytes are kept so the route can reject
    that file by name while the rest of the request still goes in."""

    file_bytes: int
    max_files: int
    field_bytes: int
    refuse_oversized: bool


@dataclass(frozen=True)
class BodyLimit:
    request_bytes: int
    upload: UploadLimits | None = None
    what: str = ""  # for single-file uploads: "a 500000-byte archive", named in the 413

    def message(self) -> str:
        extra = f" ({self.what} plus the form around it)" if self.what else ""
        return f"request body is larger than the {self.request_bytes}-byte limit of this endpoint{extra}"


def body_limit(method: str, path: str, settings: Settings) -> BodyLimit:
    """The byte budget (and per-file limits) of one request, by route; any route not named here
    (JSON bodies) gets `max_body_bytes`. A new upload route needs its line here."""
    field = settings.max_form_field_bytes
    if method != "POST":
        return BodyLimit(settings.max_body_bytes)
    single: tuple[int, str] | None = {
        "/predict": (settings.max_image_bytes, "image"),
        "/weights": (settings.max_weights_bytes, "weights file"),
    }.get(path)
    if re.fullmatch(r"/datasets/[^/]+/archive", path):
        single = (settings.max_archive_bytes, "archive")
    if single is not None:
        size, name = single
        upload = UploadLimits(size, 1, field, refuse_oversized=True)
        return BodyLimit(size + MULTIPART_OVERHEAD, upload, what=f"a {size}-byte {name}")
    if path == "/predict/batch":  # several images; one that is too large is only that file's error
        upload = UploadLimits(
            settings.max_image_bytes, settings.predict_max_files, field, refuse_oversized=False
        )
        return BodyLimit(settings.max_request_bytes, upload)
    if re.fullmatch(r"/datasets/[^/]+/images", path):
        upload = UploadLimits(
            settings.max_image_bytes, settings.max_files_per_request, field, refuse_oversized=False
        )
        return BodyLimit(settings.max_request_bytes, upload)
    return BodyLimit(settings.max_body_bytes)


class BodyTooLarge(HTTPException):
    """Raised from `receive`: an HTTPException, so FastAPI's body reading passes it on unchanged and
    the app's exception handler renders it as `{"detail": ...}`."""

    def __init__(self, limit: BodyLimit) -> None:
        super().__init__(status_code=413, detail=limit.message())


async def _send_json(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    # The rest of the body is never read: tell the client this connection ends here.
    raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def _discard_small_body(receive: Receive, headers: Headers, budget: int) -> None:
    """Read and drop a small refused body, so the client gets to read the answer: a server that closes
    a connection with unread bytes in it makes TCP reset it, and the client sees a reset instead of the
    401. Only a body that declares a length of at most `budget` is read; nothing of it is kept."""
    declared = headers.get("content-length")
    if declared is None or not declared.isdigit() or int(declared) > budget:
        return  # a chunked body (no length) or a large one: not read at all
    seen = 0
    while seen <= budget:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class BodyLimitMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware): wraps `receive`, so limits hold for streamed bodies."""

    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        headers = Headers(scope=scope)
        if (
            self.settings.api_keys
            and method in BODY_METHODS
            and path not in OPEN_PATHS
            and not api_key_matches(headers.get("authorization"), self.settings.api_keys)
        ):
            await _discard_small_body(receive, headers, REFUSED_BODY_DRAIN_BYTES)
            detail = "missing or invalid API key (Authorization: Bearer <key>)"
            await _send_json(send, 401, detail, {"WWW-Authenticate": "Bearer"})
            return

        limit = body_limit(method, path, self.settings)
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                await _send_json(send, 400, "Content-Length is not a number")
                return
            if int(declared) > limit.request_bytes:
                await _send_json(send, 413, limit.message())
                return
        scope[UPLOAD_LIMITS_KEY] = limit.upload

        received = 0
        body_complete = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, body_complete
            if body_complete:  # waiting for a disconnect (a stream), not for a slow body: no deadline
                return await receive()
            message = await body_chunk_timeout(receive, self.settings.body_read_timeout_seconds)
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit.request_bytes:
                    raise BodyTooLarge(limit)
                body_complete = not message.get("more_body", False)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except (BodyTooLarge, BodyTimeout) as exc:
            # Only when the app let it escape (a route reading the stream itself); FastAPI usually
            # turns it into the 413 (408) response already.
            if response_started:
                raise
            await _send_json(send, exc.status_code, exc.detail)
