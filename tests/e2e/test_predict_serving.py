"""The prediction server for real: `trainserve api` with two processes and an API key, hit over loopback
by many concurrent clients mixing good images with every kind of bad input."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.core.config import Settings
from models.predictor import Predictor
from models.preprocessing import decode_image
from tests.checkpoints import claim_with_best, queued_job
from tests.conftest import make_settings
from tests.e2e.processes import environment, free_port
from tests.factories import encode, noise_png, png_declaring

pytestmark = pytest.mark.e2e

KEY = "e2e-secret"


def start_api(settings: Settings, log: Path, port: int) -> subprocess.Popen[bytes]:
    env = environment(
        settings.database_url,
        TRAINSERVE_PORT=str(port),
        TRAINSERVE_API_PROCESSES="2",
        TRAINSERVE_API_KEYS=KEY,
    )
    with open(log, "wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "app.cli", "api"], env=env, stdout=handle, stderr=subprocess.STDOUT
        )


def test_concurrent_good_and_bad_requests_on_two_api_processes(database_url: str, tmp_path: Path) -> None:
    settings = make_settings(database_url)
    port, log = free_port(), tmp_path / "api.log"
    process = start_api(settings, log, port)
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            queued_job(client)
            job = claim_with_best(settings, epoch=2, seed=3)
            predictor = Predictor(job.weights)

        goods = [noise_png(seed, size=(20 + seed, 28), mode="RGB" if seed % 2 else "L") for seed in range(40)]
        bad_files = [
            b"plain text",
            b"",
            encode(decode_image(noise_png(1, size=(64, 64))), "PNG")[:150],
            png_declaring(30000, 30000),
        ]

        async def hammer() -> list[tuple[str, object, httpx.Response]]:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:

                async def send(
                    kind: str, payload: object, **kwargs: object
                ) -> tuple[str, object, httpx.Response]:
                    return kind, payload, await http.post("/predict", **kwargs)  # type: ignore[arg-type]

                form = {"job_id": str(job.job_id)}
                calls = [
                    send("good", d, data=form, files={"file": ("g.png", d)}, headers=headers) for d in goods
                ]
                calls += [
                    send("bad", d, data=form, files={"file": ("b.png", d)}, headers=headers)
                    for d in bad_files
                ]
                calls += [send("no job", None, files={"file": ("g.png", goods[0])}, headers=headers)]
                calls += [send("no key", None, data=form, files={"file": ("g.png", goods[0])})]
                unknown = {"job_id": "4242"}
                calls += [
                    send(
                        "unknown job",
                        None,
                        data=unknown,
                        files={"file": ("g.png", goods[0])},
                        headers=headers,
                    )
                ]
                order = calls[::3] + calls[1::3] + calls[2::3]  # bad ones spread among the good
                return list(await asyncio.gather(*order))

        outcomes = asyncio.run(hammer())
        expected_status = {"bad": 422, "no job": 422, "no key": 401, "unknown job": 404}
        for kind, payload, response in outcomes:
            if kind == "good":
                assert response.status_code == 200, response.text
                body = response.json()
                assert (body["job_id"], body["epoch"]) == (job.job_id, 2)
                expected = predictor.predict(decode_image(payload))  # type: ignore[arg-type]
                assert body["scores"] == pytest.approx(expected, abs=1e-5)
            else:
                assert response.status_code == expected_status[kind], (kind, response.text)
                assert response.json()["detail"]

        batch = httpx.post(
            f"http://127.0.0.1:{port}/predict/batch",
            data={"job_id": str(job.job_id)},
            files=[
                ("files", ("a.png", goods[1])),
                ("files", ("b.png", b"nope")),
                ("files", ("c.png", goods[2])),
            ],
            headers=headers,
            timeout=60,
        )
        assert [r["status_code"] for r in batch.json()["results"]] == [200, 422, 200]
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    output = log.read_text()
    assert "Traceback" not in output, output
    assert process.returncode == 0, output
