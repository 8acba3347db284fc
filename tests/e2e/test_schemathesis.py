"""Schemathesis against the live OpenAPI schema of a real `trainserve up` over loopback.

Every operation gets a bounded number of generated requests (valid and invalid data, derandomised, so
CI sees the same cases every run); every response must not be a 5xx and must conform to the schema:
documented status code, content type, headers and body.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.checks import negative_data_rejection

from app.main import create_app
from tests.conftest import make_settings
from tests.e2e.databases import KINDS, fresh_database
from tests.e2e.processes import trainserve_up
from tests.factories import noise_png

pytestmark = pytest.mark.e2e

EXAMPLES_PER_OPERATION = 30
API_KEY = "schemathesis-key"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module", params=KINDS)
def live_api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The API (no worker: jobs stay queued) with a dataset of two classes and a job, so that ids 1
    exist and generated requests reach the routes' real logic, not only their 404s. On SQLite, and on
    PostgreSQL too where one is configured (it refuses some strings SQLite stores, NUL for one)."""
    folder = tmp_path_factory.mktemp("schemathesis")
    with (
        fresh_database(request.param, folder) as database,
        trainserve_up(database, folder / "up.log", workers=0, TRAINSERVE_API_KEYS=API_KEY) as (client, _),
    ):
        client.headers["Authorization"] = f"Bearer {API_KEY}"
        dataset = client.post("/datasets", json={"name": "seed"}).json()["id"]
        for label, seeds in {"a": (1, 2, 3), "b": (4, 5, 6)}.items():
            files = [("files", (f"{s}.png", noise_png(s), "image/png")) for s in seeds]
            assert (
                client.post(f"/datasets/{dataset}/images", data={"label": label}, files=files).status_code
                == 201
            )
        assert client.post("/jobs", json={"dataset_id": dataset, "model": "lenet"}).status_code == 201
        live = client.get("/openapi.json").json()
        assert live == SPEC, "the live server serves the schema the cases were generated from"
        yield str(client.base_url)
        log = (folder / "up.log").read_text()
        assert "Traceback" not in log, log[-5000:]


# The schema is built here, at collection, from the same application the live server runs (the
# fixture checks that the server serves exactly it); the requests all go to the live server.
SPEC = create_app(make_settings("sqlite://")).openapi()
schema = schemathesis.openapi.from_dict(SPEC)
# The key goes in through the config, so schemathesis can still leave it out on purpose (expecting 401).
schema.config.update(headers={"Authorization": f"Bearer {API_KEY}"})
# Unknown query parameters are ignored, as by nearly every HTTP API; they are not a schema violation.
schema.config.generation.update(allow_extra_parameters=False)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_schema(case: schemathesis.Case, live_api: str) -> None:
    case.call_and_validate(base_url=live_api, checks=CHECKS, timeout=30)
