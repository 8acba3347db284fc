"""The prediction benchmark still runs end to end (tiny configuration, no timing assertions): it trains
through the worker, starts trainserve and the naive baseline as processes, loads them and reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def test_prediction_benchmark_runs_in_a_tiny_configuration(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    argv = [
        sys.executable, str(ROOT / "bench" / "predict_throughput.py"), "--models", "simple_cnn",
        "--clients", "1,4", "--seconds", "1", "--warmup", "0.5", "--servers", "trainserve,naive,ceiling",
        "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())
    served = [r for r in rows if r["server"] != "ceiling"]
    assert {(r["server"], r["clients"]) for r in served} == {
        (s, n) for s in ("trainserve", "naive") for n in (1, 4)
    }
    for row in served:
        assert row["requests"] > 0 and row["errors"] == 0, row
        assert row["p50_ms"] <= row["p99_ms"]
    ceiling = next(r for r in rows if r["server"] == "ceiling")
    assert ceiling["img_per_s"] > 0 and ceiling["per_setup"][ceiling["setup"]] == ceiling["img_per_s"]
    assert ceiling["img_per_s"] == max(ceiling["per_setup"].values())
    assert any(setup.startswith("channels_last") for setup in ceiling["per_setup"])
    assert "simple_cnn @ 4 clients: trainserve =" in done.stdout
