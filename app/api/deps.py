"""Dependencies shared by the routes: settings, a transactional session, API-key auth."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.security import key_matches
from app.db.session import read_scope, session_scope


# The cheap dependencies are `async def`: FastAPI runs a plain `def` dependency in a worker thread,
# a hop that cost more than the whole prediction of a small model (profiled under bench/).
async def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_session(request: Request, settings: SettingsDep) -> Iterator[Session]:
    """One transaction per request: committed when the route returns, rolled back when it raises.
    GET requests only read, so they take no write lock and never wait behind a training worker."""
    scope = read_scope if request.method in {"GET", "HEAD"} else session_scope
    with scope(settings) as session:
        yield session


# scope="function": the transaction commits when the route returns, before the response is sent, so a
# client that reads right after a 201 always finds what it created (the default scope commits after).
SessionDep = Annotated[Session, Depends(get_session, scope="function")]

# Ids are 32-bit INTEGER columns (int4 on PostgreSQL): a larger number is a 422 here, never an
# overflow in the database driver (a 500).
MAX_ID = 2**31 - 1
IdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="A server-made id.")]

_bearer = HTTPBearer(auto_error=False)


async def require_api_key(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """With TRAINSERVE_API_KEYS set, every protected route needs `Authorization: Bearer <key>`."""
    if not settings.api_keys:
        return
    if not credentials or not key_matches(credentials.credentials, settings.api_keys):
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid API key"
            if credentials
            else "missing API key (Authorization: Bearer <key>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
