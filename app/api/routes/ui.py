"""The dashboard at `/ui`: static files served by the API itself, no outside asset of any kind.

The page is plain HTML, CSS and JavaScript (charts are SVG drawn by our own code); it talks to the same
JSON API as every other client, sending the API key the user gives it. The files hold no data, so they
are served without a key; a strict Content-Security-Policy forbids loading anything from elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).resolve().parents[2] / "ui" / "static"

CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


@router.get("/ui")
def dashboard() -> FileResponse:
    """The dashboard's single page; it routes by the URL fragment (#/jobs/3)."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=HEADERS)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui")


class _Static(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


def mount(app: FastAPI) -> None:
    """Serve the dashboard page at `/ui` and its assets under `/ui/static/`."""
    app.include_router(router)
    app.mount("/ui/static", _Static(directory=STATIC_DIR), name="ui-static")
