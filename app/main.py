"""The FastAPI application: routers, error mapping, and the model cache that lives with the process."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from app.api.body_limits import BodyLimitMiddleware
from app.api.deps import require_api_key
from app.api.event_watch import JobWatcher
from app.api.origins import HostOriginMiddleware
from app.api.routes import datasets, docs, events, health, images, jobs, models, predict, ui, weights
from app.api.stream_slots import StreamSlots
from app.core.config import Settings, get_settings
from app.core.errors import Busy, DomainError
from app.schemas.common import error_responses
from app.services.predictions import ModelCache, configure_torch_threads
from app.services.thumbnails import ThumbnailSlots

log = logging.getLogger(__name__)


def finite(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by its name, so it can be sent as JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [finite(item) for item in value]
    return value


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.api_keys:
            log.warning(
                "!!! TRAINSERVE_API_KEYS is not set: the API is OPEN, anyone who can reach it may upload, "
                "train and download. Set TRAINSERVE_API_KEYS=<key>[,<key>...] to require a bearer key. !!!"
            )
        else:
            # How many, never which: keys are not logged anywhere.
            count = len(settings.api_keys)
            log.info("API keys required on every endpoint but /health and the docs (%d key(s))", count)
        configure_torch_threads(settings)
        yield
        await app.state.job_watcher.close()
        app.state.predictors.close()

    app = FastAPI(
        title="trainserve",
        version="0.1.0",
        description=(
            "Upload labelled images, train image classifiers in a worker, follow the curves, predict."
        ),
        lifespan=lifespan,
        docs_url=None,  # FastAPI's pages load scripts from a CDN; app.api.routes.docs serves them locally
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.predictors = ModelCache(settings)
    app.state.stream_slots = StreamSlots.from_settings(settings)
    app.state.job_watcher = JobWatcher(settings)
    app.state.thumbnail_slots = ThumbnailSlots(
        concurrency=settings.thumbnail_concurrency,
        wait_seconds=settings.thumbnail_wait_seconds,
        retry_after_seconds=settings.busy_retry_after_seconds,
    )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the input, and JSON cannot carry NaN or Infinity (a body may
        # hold them: Python's JSON parser accepts both), so rendering them was a 500.
        return JSONResponse(status_code=422, content={"detail": finite(jsonable_encoder(exc.errors()))})

    @app.exception_handler(DomainError)
    async def domain_error(_request: Request, exc: DomainError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Busy) else None
        return JSONResponse(
            status_code=exc.status_code, content={"detail": exc.message, **exc.extra}, headers=headers
        )

    protected = [Depends(require_api_key)]
    errors = error_responses(400, 401, 404, 409, 413, 422)
    app.include_router(health.router, responses=error_responses(400, 413))
    for router in (datasets.router, jobs.router, predict.router, models.router, weights.router):
        app.include_router(router, dependencies=protected, responses=errors)
    # Live progress, logs and image browsing, and the dashboard's static page (no data in it).
    for router in (events.router, images.router):
        app.include_router(router, dependencies=protected, responses=errors)
    ui.mount(app)
    docs.mount(app)

    # Middleware added last runs first: the Host and Origin checks refuse what no browser page of
    # another site may do; CORS answers preflights and decorates every response, 413s included; the
    # body limits then check the key and the size before any route reads the body.
    app.add_middleware(BodyLimitMiddleware, settings=settings)
    if settings.cors_allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_allow_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
        )
    app.add_middleware(HostOriginMiddleware, settings=settings)
    return app
