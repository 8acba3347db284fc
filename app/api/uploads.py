"""Multipart parsing with per-file limits applied while the parts stream in.

Starlette's parser bounds the number of parts and the size of text fields, but writes every file part
in full to a spooled temporary file. Here a file part over its limit stops being stored at
`limit + 1` bytes (the route then rejects that file by name) or fails the request with 413 at once,
so no file ever costs more than its limit in memory or on disk. The limits come from
`app.api.body_limits`, which chose them for the route.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from contextlib import aclosing
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, Headers
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from app.api.body_limits import UPLOAD_LIMITS_KEY, UploadLimits


class UploadTooLarge(HTTPException):
    def __init__(self, detail: str) -> None:
        super().__init__(status_code=413, detail=detail)


class BoundedMultiPartParser(MultiPartParser):
    """Starlette's parser, with file count, file size and field size checked per chunk."""

    def __init__(self, headers: Headers, stream: Any, *, limits: UploadLimits, max_fields: int) -> None:
        super().__init__(
            headers, stream, max_files=float("inf"), max_fields=max_fields, max_part_size=limits.field_bytes
        )
        self.limits = limits
        # Bytes seen of the part being parsed, reset when the next part begins. (Keyed by `id(part)`
        # it was wrong: finished parts are freed while parsing, so a later part could reuse an id and
        # inherit an earlier file's count, and valid files were cut short or rejected.)
        self._part_bytes = 0

    def on_part_begin(self) -> None:
        super().on_part_begin()
        self._part_bytes = 0

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        if self._current_files > self.limits.max_files:
            raise UploadTooLarge(f"too many files in one request; the limit is {self.limits.max_files}")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._current_part
        if part.file is None:
            if len(part.data) + (end - start) > self.limits.field_bytes:
                raise UploadTooLarge(
                    f"form field {part.field_name!r} is larger than the {self.limits.field_bytes}-byte limit"
                )
            super().on_part_data(data, start, end)
            return
        seen = self._part_bytes
        self._part_bytes = seen + (end - start)
        if seen + (end - start) <= self.limits.file_bytes:
            super().on_part_data(data, start, end)
            return
        if self.limits.refuse_oversized:
            raise UploadTooLarge(
                f"file {part.file.filename!r} is larger than the {self.limits.file_bytes}-byte limit"
            )
        # Keep one byte past the limit, so the route sees "too large" and rejects it by name.
        keep = max(0, self.limits.file_bytes + 1 - seen)
        if keep:
            super().on_part_data(data, start, start + keep)


class LimitedRequest(Request):
    """A request whose multipart form is parsed with the route's upload limits."""

    async def form(  # type: ignore[override]
        self,
        *,
        max_files: int | float = 1000,
        max_fields: int | float = 1000,
        max_part_size: int = 1024 * 1024,
    ) -> FormData:
        limits: UploadLimits | None = self.scope.get(UPLOAD_LIMITS_KEY)
        content_type, _ = parse_options_header(self.headers.get("Content-Type"))
        if limits is None or content_type != b"multipart/form-data":
            return await super().form(max_files=max_files, max_fields=max_fields, max_part_size=max_part_size)
        if self._form is None:
            try:
                async with aclosing(self.stream()) as stream:
                    parser = BoundedMultiPartParser(
                        self.headers, stream, limits=limits, max_fields=int(min(max_fields, 1000))
                    )
                    self._form = await parser.parse()
            except MultiPartException as exc:
                raise HTTPException(status_code=400, detail=exc.message) from None
        return self._form


class UploadRoute(APIRoute):
    """Route class of the upload routers: hands the endpoint a `LimitedRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def limited(request: Request) -> Response:
            return await handler(LimitedRequest(request.scope, request.receive))

        return limited
