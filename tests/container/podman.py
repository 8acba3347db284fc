"""Podman and podman-compose for the container test: build the image, run a compose project, clean up.

Everything goes through the real command-line tools, as a user would type them; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The tag the test builds and runs; rebuilding it leaves the previous image untagged, and prune_images()
# removes it (and the stale intermediate images of earlier builds) by the label every stage carries.
IMAGE = "localhost/trainserve:container-test"
PROJECT_LABEL = "org.opencontainers.image.title=trainserve"


def missing_tools() -> list[str]:
    return [tool for tool in ("podman", "podman-compose") if shutil.which(tool) is None]


def run(
    args: list[str], *, timeout: float, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output; a failure shows the command and the end of its output."""
    result = subprocess.run(
        args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited with {result.returncode}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def build_image(log: Path, timeout: float = 1800) -> float:
    """`podman build --format docker` (the OCI format would drop the HEALTHCHECK); returns its seconds."""
    started = time.monotonic()
    with open(log, "w") as handle:
        result = subprocess.run(
            ["podman", "build", "--format", "docker", "--tag", IMAGE, "."],
            cwd=ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    if result.returncode != 0:
        raise AssertionError(f"podman build failed ({result.returncode}):\n{log.read_text()[-5000:]}")
    return time.monotonic() - started


def prune_images() -> None:
    """Remove this project's dangling images (earlier builds of the tag, stale intermediate stages)."""
    run(["podman", "image", "prune", "--force", "--filter", f"label={PROJECT_LABEL}"], timeout=300)


def image_config(image: str = IMAGE) -> dict:  # type: ignore[type-arg]
    out = run(["podman", "image", "inspect", image], timeout=60).stdout
    return json.loads(out)[0]  # type: ignore[no-any-return]


@dataclass
class ComposeProject:
    """A docker-compose.yml project under its own name, publishing the API on `port`, with its own settings
    file (never the developer's .env)."""

    name: str
    port: int
    env_file: Path

    def environment(self) -> dict[str, str]:
        keep = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("TRAINSERVE_", "COMPOSE_", "POSTGRES_")) and k != "TORCH_INDEX_URL"
        }
        return {
            **keep,
            "TRAINSERVE_IMAGE": IMAGE,
            "TRAINSERVE_PUBLISH": f"127.0.0.1:{self.port}",
            "TRAINSERVE_ENV_FILE": str(self.env_file),
        }

    def compose(
        self, *args: str, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        command = [
            "podman-compose",
            "--project-name",
            self.name,
            "--env-file",
            str(self.env_file),
            "--file",
            str(ROOT / "docker-compose.yml"),
            *args,
        ]
        return run(command, timeout=timeout, env=self.environment(), check=check)

    def containers(self, service: str, *, running_only: bool = True) -> list[str]:
        args = ["podman", "ps", "--format", "{{.Names}}"]
        args += [] if running_only else ["--all"]
        args += ["--filter", f"label=io.podman.compose.project={self.name}"]
        args += ["--filter", f"label=io.podman.compose.service={service}"]
        return sorted(run(args, timeout=60).stdout.split())

    def hostname(self, container: str) -> str:
        return run(
            ["podman", "inspect", "--format", "{{.Config.Hostname}}", container], timeout=60
        ).stdout.strip()

    def wait_healthy(self, timeout: float = 240) -> float:
        """Run the api container's own health check until it passes (Podman 4.3 schedules health checks
        through systemd timers, which this machine may lack, so the test runs it); returns the seconds."""
        started = time.monotonic()
        deadline = started + timeout
        while True:
            (api,) = self.containers("api", running_only=False)
            if run(["podman", "healthcheck", "run", api], timeout=30, check=False).returncode == 0:
                return time.monotonic() - started
            state = run(["podman", "inspect", "--format", "{{.State.Status}}", api], timeout=30).stdout
            if time.monotonic() > deadline:
                logs = run(["podman", "logs", api], timeout=30, check=False)
                raise AssertionError(
                    f"api not healthy after {timeout}s ({state.strip()}):\n{logs.stderr[-3000:]}"
                )
            time.sleep(1)

    def logs(self, container: str) -> str:
        result = run(["podman", "logs", container], timeout=60, check=False)
        return result.stdout + result.stderr

    def remove(self) -> None:
        """`down --volumes`, then anything a failed run may have left behind (containers, pod, volumes,
        network), found by the project's labels and names."""
        self.compose("down", "--volumes", timeout=300, check=False)
        label = f"label=io.podman.compose.project={self.name}"
        for container in run(["podman", "ps", "-aq", "--filter", label], timeout=60).stdout.split():
            run(["podman", "rm", "--force", "--time", "0", container], timeout=120, check=False)
        run(["podman", "pod", "rm", "--force", "--ignore", f"pod_{self.name}"], timeout=120, check=False)
        for volume in run(["podman", "volume", "ls", "-q", "--filter", label], timeout=60).stdout.split():
            run(["podman", "volume", "rm", "--force", volume], timeout=120, check=False)
        run(["podman", "network", "rm", "--force", f"{self.name}_default"], timeout=120, check=False)
