"""Domain errors raised by services; `app.main` maps them to HTTP statuses in one place."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """Base of the errors a client can cause; `extra` is merged into the JSON error body."""

    status_code = 400

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra


class NotFound(DomainError):
    status_code = 404


class Conflict(DomainError):
    status_code = 409


class Invalid(DomainError):
    """Well-formed request whose content cannot be used (not an image, not a zip)."""

    status_code = 422


class TooLarge(DomainError):
    status_code = 413


class Busy(DomainError):
    """A bounded resource is full; the client should retry after `retry_after` seconds."""

    status_code = 503

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after
