"""A small HTTP client for the trainserve API, and a resumable reader of a job's event stream."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


class ApiError(Exception):
    """The server said no (4xx/5xx) or could not be reached; `str()` is a sentence for a person."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


def _describe(detail: Any) -> str:
    """FastAPI's `detail` (a string, or a list of validation errors) as one readable line each."""
    if isinstance(detail, list):
        parts = []
        for error in detail:
            loc = ".".join(str(p) for p in error.get("loc", []) if p not in ("body", "query", "path"))
            parts.append(f"{loc}: {error.get('msg')}" if loc else str(error.get("msg")))
        return "; ".join(parts)
    return str(detail)


@dataclass(frozen=True)
class ServerEvent:
    event: str
    data: Any
    id: str | None


def parse_event_stream(lines: Iterator[str]) -> Iterator[ServerEvent]:
    """Server-sent events from the stream's lines (the WHATWG format: fields until a blank line)."""
    event, data, event_id = "message", [], None
    for raw in lines:
        line = raw.rstrip("\r")
        if not line:
            if data:
                text = "\n".join(data)
                try:
                    payload: Any = json.loads(text)
                except ValueError:
                    payload = text
                yield ServerEvent(event=event, data=payload, id=event_id)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            event_id = value


class TrainserveClient:
    """The endpoints the command line uses. Every error becomes an `ApiError` with the server's words."""

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> TrainserveClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiError(f"cannot reach {self.url}: {exc}") from None
        self._raise_for_status(response)
        return response

    def _raise_for_status(self, response: httpx.Response) -> None:
        if response.is_success:
            return
        try:
            detail = _describe(response.json().get("detail"))
        except ValueError:
            detail = response.text[:300]
        if response.status_code == 401:
            detail += " (give a key with --api-key or TRAINSERVE_API_KEY)"
        raise ApiError(f"{response.status_code}: {detail}", response.status_code)

    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.request("POST", "/jobs", json=spec, headers=headers).json()  # type: ignore[no-any-return]

    def jobs(self, *, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit, **({"status": status} if status else {})}
        return self.request("GET", "/jobs", params=params).json()  # type: ignore[no-any-return]

    def job(self, job_id: int) -> dict[str, Any]:
        return self.request("GET", f"/jobs/{job_id}").json()  # type: ignore[no-any-return]

    def metrics(self, job_id: int) -> list[dict[str, Any]]:
        return self.request("GET", f"/jobs/{job_id}/metrics").json()["epochs"]  # type: ignore[no-any-return]

    def logs(self, job_id: int, limit: int | None = None) -> list[dict[str, Any]]:
        params = {"limit": limit} if limit else {}
        return self.request("GET", f"/jobs/{job_id}/logs", params=params).json()["lines"]  # type: ignore[no-any-return]

    def predict(self, job_id: int, image: Path) -> dict[str, Any]:
        files = {"file": (image.name, image.read_bytes(), "application/octet-stream")}
        return self.request("POST", "/predict", data={"job_id": str(job_id)}, files=files).json()  # type: ignore[no-any-return]

    def events(
        self, job_id: int, *, last_event_id: str | None = None, max_retries: int = 30
    ) -> Iterator[ServerEvent]:
        """The job's events until `end`. A dropped connection is reopened with `Last-Event-ID`, so
        nothing is missed or repeated; gives up after `max_retries` failed reconnects in a row."""
        failures = 0
        while True:
            headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
            try:
                with self.http.stream(
                    "GET",
                    f"/jobs/{job_id}/events",
                    headers=headers,
                    timeout=httpx.Timeout(10.0, read=90.0),  # the server comments every 15 s
                ) as response:
                    if not response.is_success:
                        response.read()
                        self._raise_for_status(response)
                    failures = 0
                    for event in parse_event_stream(response.iter_lines()):
                        if event.id:
                            last_event_id = event.id
                        yield event
                        if event.event == "end":
                            return
            except httpx.TransportError as exc:
                failures += 1
                if failures > max_retries:
                    raise ApiError(f"lost the event stream of job {job_id}: {exc}") from None
            time.sleep(min(0.5 + failures, 5.0))
