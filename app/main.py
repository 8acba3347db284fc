"""The FastAPI application: routers, error mapping, and the model cache that lives with the process."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from app.api.deps import require_api_key
from app.api.routes import datasets, health, jobs, models, predict
from app.core.config import Settings, get_settings
from app.core.errors import DomainError
from app.services.predictions import ModelCache, configure_torch_threads

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.api_keys:
            log.warning("TRAINSERVE_API_KEYS is not set: the API is OPEN to anyone who can reach it")
        configure_torch_threads(settings)
        yield
        app.state.predictors.close()

    app = FastAPI(
        title="trainserve",
        version="0.1.0",
        description=(
            "Upload labelled images, train image classifiers in a worker, follow the curves, predict."
        ),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.predictors = ModelCache(settings)

    @app.exception_handler(DomainError)
    async def domain_error(_request: Request, exc: DomainError) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"detail": exc.message, **exc.extra})

    protected = [Depends(require_api_key)]
    app.include_router(health.router)
    for router in (datasets.router, jobs.router, predict.router, models.router):
        app.include_router(router, dependencies=protected)
    return app
