"""The API docs (`/docs`, Swagger UI) from pinned local assets, never from a CDN.

FastAPI's own pages load unpinned scripts from a CDN into the origin where the dashboard keeps the API
key: whoever serves that script could read it. Here the scripts come from the `fastapi-offline`
package (pinned in pyproject.toml, so an upgrade is a reviewed change), Swagger UI's online validator
is off, and a Content-Security-Policy forbids anything from elsewhere. `/redoc` is off: Redoc's page
loads its logo from the vendor's CDN whatever it is told.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from starlette.responses import HTMLResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

ASSETS_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"
ASSETS_URL = "/docs/assets"
FAVICON_URL = "/ui/static/favicon.svg"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"

# The page carries one inline script (FastAPI's initialisation of Swagger UI).
CSP = (
    "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}

router = APIRouter(include_in_schema=False)


def _with_headers(response: HTMLResponse) -> HTMLResponse:
    response.headers.update(HEADERS)
    return response


@router.get("/docs")
def swagger_ui() -> HTMLResponse:
    return _with_headers(
        get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="trainserve - Swagger UI",
            oauth2_redirect_url=OAUTH2_REDIRECT_URL,
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=FAVICON_URL,
            # The default validator badge is an image from validator.swagger.io that sends it the spec.
            swagger_ui_parameters={"validatorUrl": None},
        )
    )


@router.get(OAUTH2_REDIRECT_URL)
def swagger_ui_redirect() -> HTMLResponse:
    return _with_headers(get_swagger_ui_oauth2_redirect_html())


class _Assets(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update({"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})
        return response


def mount(app: FastAPI) -> None:
    """Serve the docs page and its assets (create the app with `docs_url=None, redoc_url=None`)."""
    app.include_router(router)
    app.mount(ASSETS_URL, _Assets(directory=ASSETS_DIR), name="docs-assets")
