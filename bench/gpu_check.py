"""The parts of bench/gpu_check.sh after the install, and its summary (docs/gpu.md).

Each part is its own process group under a time budget, cut to what is left of the whole run's deadline;
a part that fails or runs out of time prints its error and the next part runs. The summary is one table
(and the same as JSON under $OUT when OUT is set). Standard library only at the top level, so the summary
is printed even when the install failed. `--e2e JSON` runs the end-to-end part itself: a `devices: 1`
job through `trainserve up` on the GPU (upload, train 2 epochs, predict).

    python bench/gpu_check.py --work /tmp/w --deadline $(( $(date +%s) + 460 ))   # what gpu_check.sh runs
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_RESERVE_SECONDS = 10  # kept back from every part for the summary
MIN_PART_SECONDS = 15  # a part given less than this is not started
KILL_GRACE_SECONDS = 25  # after SIGTERM: the benches stop their servers, then SIGKILL

# The targets of issue 26 (docs/gpu.md).
TRAIN_B_OVER_C = 0.9
SERVE_OVER_CEILING = 0.9


@dataclass
class Outcome:
    part: str
    status: str  # ok, failed, timed out, skipped, not run
    seconds: float = 0.0
    note: str = ""
    numbers: dict[str, Any] = field(default_factory=dict)


@dataclass
class Part:
    name: str
    budget: float
    argv: list[str]
    result: Path | None  # the JSON file the part writes
    describe: Callable[[Any], tuple[str, dict[str, Any]]]  # its JSON -> (table note, numbers)
    env: dict[str, str] = field(default_factory=dict)  # added to this environment


# --- the parts' numbers -------------------------------------------------------------------------


def describe_train(result: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    keys = ("tutorial", "job", "ceiling", "ceiling_plain_fp32", "b_over_a", "b_over_c", "data_seconds",
            "epoch_seconds", "device", "image_size", "data_placement", "mixed_precision", "channels_last",
            "images", "batch_size")  # fmt: skip
    numbers = {key: result.get(key) for key in keys}
    note = (
        f"b/c {result['b_over_c']:.2f} (job {result['job']:,.0f}, ceiling {result['ceiling']:,.0f} img/s), "
        f"b/a {result['b_over_a']:.2f}; data {result.get('data_placement')}; "
        f"{result.get('mixed_precision')}, channels_last {result.get('channels_last')}"
    )
    return note, numbers


def describe_predict(rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    def rps(server: str, clients: int) -> float | None:
        for row in rows:
            if row["server"] == server and row.get("clients") == clients:
                return float(row["rps"])
        return None

    top = next((row for row in rows if row["server"] == "ceiling"), None)
    numbers: dict[str, Any] = {
        "ceiling_img_per_s": top["img_per_s"] if top else None,
        "ceiling_setup": top["setup"] if top else None,
        "errors": sum(int(row.get("errors", 0)) for row in rows if row["server"] != "ceiling"),
    }
    parts = []
    for clients in (1, 32):
        ours, theirs = rps("trainserve", clients), rps("litserve-gpu", clients)
        numbers[f"trainserve_{clients}"], numbers[f"litserve_gpu_{clients}"] = ours, theirs
        text = f"{clients} client{'s' * (clients > 1)}: trainserve {fmt(ours, 0)} req/s"
        if ours and top:
            numbers[f"over_ceiling_{clients}"] = ours / top["img_per_s"]
            text += f" = {ours / top['img_per_s']:.2f}x ceiling"
        if ours and theirs:
            numbers[f"over_litserve_{clients}"] = ours / theirs
            text += f", {ours / theirs:.2f}x litserve-gpu ({theirs:,.0f})"
        parts.append(text)
    ceiling = f"ceiling {fmt(numbers['ceiling_img_per_s'], 0)} img/s ({numbers['ceiling_setup']})"
    return "; ".join([*parts, ceiling, f"errors {numbers['errors']}"]), numbers


def describe_e2e(result: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    note = (
        f"job {result['job_id']} {result['status']} on {result.get('device')}, {result['epochs']} epochs, "
        f"val_acc {fmt(result.get('val_acc'), 3)}; data {result.get('data_placement')}; "
        f"/predict {result['predicted_right']}/{result['predicted']} held-out digits right"
    )
    return note, result


def pytest_note(tail: list[str]) -> tuple[str, dict[str, Any]]:
    for line in reversed(tail):
        if re.search(r"\d+ (passed|failed|skipped|errors?|deselected)", line):
            return line.strip("= "), {}
    return "", {}


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


# --- running a part -----------------------------------------------------------------------------


def run_part(part: Part, deadline: float, banked: float = 0.0) -> Outcome:
    """Run one part for its budget plus the time earlier parts left unused (`banked`), and never past
    what is left of the whole run after this part's stop (SIGTERM, grace, SIGKILL) and the summary."""
    left = deadline - time.time() - SUMMARY_RESERVE_SECONDS - KILL_GRACE_SECONDS - 10
    limit = min(part.budget + banked, left)
    if limit < MIN_PART_SECONDS:
        print(f"== {part.name}: not run: the whole run's time budget is spent", flush=True)
        return Outcome(part.name, "not run", note="the whole run's time budget was spent")
    print(f"== {part.name} (budget {limit:.0f} s): {' '.join(part.argv)}", flush=True)
    started = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=40)
    process = subprocess.Popen(
        part.argv,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,  # its own process group: a timeout stops everything it started
        env={**os.environ, **part.env},
    )
    reader = threading.Thread(target=_echo, args=(process, tail), daemon=True)
    reader.start()
    timed_out = False
    try:
        returncode = process.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        timed_out = True
        returncode = _stop_group(process)
    reader.join(timeout=5)
    seconds = time.monotonic() - started
    if timed_out:
        print(f"== {part.name}: TIMED OUT after {limit:.0f} s", flush=True)
        return Outcome(part.name, "timed out", seconds, f"timed out after {limit:.0f} s; {last_line(tail)}")
    if returncode != 0:
        print(f"== {part.name}: FAILED (exit {returncode}); its last lines:", flush=True)
        print("\n".join(f"   {line}" for line in list(tail)[-12:]), flush=True)
        return Outcome(part.name, "failed", seconds, f"exit {returncode}: {last_line(tail)}")
    try:
        if part.result is None:
            note, numbers = pytest_note(list(tail))
        else:
            note, numbers = part.describe(json.loads(part.result.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"== {part.name}: FAILED: its results could not be read: {exc!r}", flush=True)
        return Outcome(part.name, "failed", seconds, f"results unreadable: {exc!r}")
    print(f"== {part.name}: ok in {seconds:.0f} s", flush=True)
    return Outcome(part.name, "ok", seconds, note, numbers)


def _echo(process: subprocess.Popen[str], tail: collections.deque[str]) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        tail.append(line.rstrip())


def _stop_group(process: subprocess.Popen[str]) -> int:
    """SIGTERM to the part's process group (the benches then stop the servers they started), SIGKILL
    to whatever is left after the grace period."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_SECONDS), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            return process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return process.wait()


def last_line(tail: collections.deque[str]) -> str:
    lines = [line for line in tail if line.strip()]
    errors = [line for line in lines if re.match(r"^\w*(Error|Exception|Expired)\b|^E\s", line.strip())]
    return (errors or lines or ["no output"])[-1].strip()[:160]


# --- the machine ----------------------------------------------------------------------------------

TORCH_INFO = """
import json, torch
info = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda": torch.cuda.is_available()}
if info["cuda"]:
    info.update(devices=torch.cuda.device_count(), name=torch.cuda.get_device_name(0),
                capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                bf16=torch.cuda.is_bf16_supported(), cudnn=torch.backends.cudnn.version())
print(json.dumps(info))
"""


def machine(python: str) -> dict[str, Any]:
    info: dict[str, Any] = {"cores": os.cpu_count(), "python": python}
    try:
        done = subprocess.run(
            [python, "-c", TORCH_INFO], capture_output=True, text=True, timeout=120, cwd=ROOT
        )
        info.update(json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {})
        if done.returncode != 0:
            info["torch_error"] = (done.stderr.strip().splitlines() or ["?"])[-1]
    except (subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        info["torch_error"] = repr(exc)
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        info["nvidia_smi"] = smi.stdout.strip().splitlines() if smi.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired):
        info["nvidia_smi"] = []
    return info


def describe_machine(info: dict[str, Any]) -> str:
    torch = f"torch {info['torch']} (CUDA {info.get('cuda_build')})" if "torch" in info else "no torch"
    if info.get("cuda"):
        gpu = (f"{info['devices']} x {info['name']} (sm {info['capability']}, {info['memory_gib']} GiB, "
               f"bf16 {info['bf16']}, cuDNN {info['cudnn']})")  # fmt: skip
    else:
        gpu = "no CUDA GPU" + (f" ({info['torch_error']})" if "torch_error" in info else "")
    smi = "; nvidia-smi: " + " | ".join(info["nvidia_smi"]) if info.get("nvidia_smi") else ""
    return f"{info['cores']} cores, {info['python']}, {torch}, {gpu}{smi}"


# --- the plan -------------------------------------------------------------------------------------


def plan(python: str, work: Path) -> list[Part]:
    bench = ROOT / "bench"

    def train(model: str, budget: float, *options: str) -> Part:
        out = work / f"train_{model}.json"
        argv = [python, str(bench / "train_throughput.py"), "--device", "cuda", "--model", model,
                *options, "--json", str(out)]  # fmt: skip
        return Part(f"train {model}", budget, argv, out, describe_train)

    predict_out = work / "predict.json"
    api_processes = os.environ.get("GPU_CHECK_API_PROCESSES", "4")
    e2e_out = work / "e2e.json"
    # Other test modules import what only `make test` installs (playwright, schemathesis): collect the
    # GPU tests' folder alone, where every test marked gpu lives. Only pytest-timeout of the plugins
    # installed: a GPU image's own (xdist, cov, benchmark...) may not suit its pytest.
    pytest_argv = [python, "-m", "pytest", "-m", "gpu", "tests/gpu", "-p", "pytest_timeout", "-p",
                   "no:cacheprovider", "-q", "--timeout", "120"]  # fmt: skip
    no_plugins = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    predict_argv = [python, str(bench / "predict_throughput.py"), "--device", "cuda", "--models", "resnet18",
                    "--clients", "1,32", "--servers", "trainserve,litserve-gpu,ceiling", "--ceiling-batches",
                    "1,8,32", "--seconds", "3", "--warmup", "3", "--trainserve-env",
                    f"TRAINSERVE_API_PROCESSES={api_processes}", "--json", str(predict_out)]  # fmt: skip
    e2e_argv = [python, __file__, "--e2e", str(e2e_out)]
    return [
        Part("pytest -m gpu", 85, pytest_argv, None, pytest_note, no_plugins),
        train("resnet18", 95, "--image-size", "224", "--images", "10000", "--batch-size", "128"),
        train("simple_cnn", 65, "--images", "30000", "--batch-size", "128"),
        Part("predict resnet18", 95, predict_argv, predict_out, describe_predict),
        Part("trainserve up, devices 1", 50, e2e_argv, e2e_out, describe_e2e),
    ]


GPU_PARTS = {"train resnet18", "train simple_cnn", "predict resnet18", "trainserve up, devices 1"}


def targets(outcomes: dict[str, Outcome]) -> list[dict[str, Any]]:
    resnet = outcomes.get("train resnet18")
    serve = outcomes.get("predict resnet18")
    train_bc = resnet.numbers.get("b_over_c") if resnet and resnet.status == "ok" else None
    served = serve.numbers if serve and serve.status == "ok" else {}
    over_ceiling, over_litserve = served.get("over_ceiling_32"), served.get("over_litserve_32")
    errors = served.get("errors")

    def row(target: str, measured: float | None, met: bool | None, text: str) -> dict[str, Any]:
        return {"target": target, "measured": measured, "met": met, "text": text}

    return [
        row(f"GPU training b/c >= {TRAIN_B_OVER_C} (resnet18, 224 px)", train_bc,
            None if train_bc is None else train_bc >= TRAIN_B_OVER_C, fmt(train_bc, 2)),
        row(f"GPU serving at 32 clients >= {SERVE_OVER_CEILING}x the in-process GPU ceiling", over_ceiling,
            None if over_ceiling is None else over_ceiling >= SERVE_OVER_CEILING, times(over_ceiling)),
        row("GPU serving at 32 clients above LitServe's GPU setup", over_litserve,
            None if over_litserve is None else over_litserve > 1, times(over_litserve)),
        row("zero request errors (prediction bench)", errors, None if errors is None else errors == 0,
            fmt(errors, 0)),
    ]  # fmt: skip


def summarize(info: dict[str, Any], outcomes: list[Outcome], started: float) -> dict[str, Any]:
    by_name = {o.part: o for o in outcomes}
    rows = targets(by_name)
    gpu = info.get("name") or "no CUDA GPU"
    print(f"\n== gpu check summary: {gpu}, torch {info.get('torch', '?')}, {info['cores']} cores; "
          f"{time.time() - started:.0f} s in all")  # fmt: skip
    print("| part | result | seconds | numbers |")
    print("| --- | --- | ---: | --- |")
    for outcome in outcomes:
        print(f"| {outcome.part} | {outcome.status} | {outcome.seconds:.0f} | {outcome.note} |")
    for target in rows:
        met = {True: "target met", False: "target MISSED", None: "not measured"}[target["met"]]
        print(f"| target: {target['target']} | {met} | | {target['text']} |")
    failed = [o.part for o in outcomes if o.status in {"failed", "timed out", "not run"}]
    summary = {
        "machine": info,
        "seconds": round(time.time() - started, 1),
        "parts": [asdict(o) for o in outcomes],
        "targets": rows,
        "failed": failed,
        "exit_code": 1 if failed else 0,
    }
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'no part failed'}", flush=True)
    return summary


def run_all(args: argparse.Namespace) -> int:
    started = args.started or time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    info = machine(args.python)
    print(f"== machine: {describe_machine(info)}", flush=True)
    install = _install_outcome(args)
    outcomes = [install]
    cuda = bool(info.get("cuda"))
    if not cuda and info.get("nvidia_smi"):
        reason = f"nvidia-smi lists {info['nvidia_smi']} but torch.cuda.is_available() is False"
        print(f"== cuda: FAILED: {reason}", flush=True)
        outcomes.append(Outcome("cuda", "failed", note=reason + f" ({info.get('torch_error', '')})"))
    banked = max(0.0, args.install_budget - args.install_seconds)  # unused time passes on
    for part in plan(args.python, args.work):
        if part.name in GPU_PARTS and not cuda:
            line = "skipped: no CUDA GPU (torch.cuda.is_available() is False)"
            print(f"== {part.name}: {line}", flush=True)
            outcomes.append(Outcome(part.name, "skipped", note=line))
            continue
        outcome = run_part(part, args.deadline, banked)
        banked = max(0.0, banked + part.budget - outcome.seconds)
        outcomes.append(outcome)
    summary = summarize(info, outcomes, started)
    (args.work / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_check.json").write_text(json.dumps(summary, indent=2))
        print(f"written: {out}/gpu_check.json")
    return int(summary["exit_code"])


def _install_outcome(args: argparse.Namespace) -> Outcome:
    mode = "?"
    with contextlib.suppress(OSError, ValueError, KeyError):
        mode = json.loads((args.work / "install.json").read_text())["mode"]
    if args.install_rc == 0:
        return Outcome("install", "ok", args.install_seconds, mode)
    if args.install_rc == 124:
        return Outcome("install", "timed out", args.install_seconds, f"{mode}: over {args.install_budget} s")
    return Outcome("install", "failed", args.install_seconds, f"{mode}: exit {args.install_rc} (see above)")


# --- the end-to-end part --------------------------------------------------------------------------

E2E_KEY = "gpu-check"
HELD_OUT = 50  # digits kept out of the dataset and sent to /predict


def digits_upload() -> tuple[bytes, list[tuple[str, bytes]]]:
    """scikit-learn's digits as a zip in the ImageFolder layout, and the last few held out."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    files = []
    for array, target in zip(data.images, data.target, strict=True):
        buffer = io.BytesIO()
        Image.fromarray((array * 255 / 16).astype(np.uint8), "L").save(buffer, "PNG")
        files.append((str(int(target)), buffer.getvalue()))
    kept, held_out = files[:-HELD_OUT], files[-HELD_OUT:]
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zipped:
        for i, (label, png) in enumerate(kept):
            zipped.writestr(f"{label}/{i:04d}.png", png)
    return archive.getvalue(), held_out


def end_to_end(out: Path, *, device: str = "cuda", model: str = "resnet18", timeout: float = 300) -> None:
    """A `devices: 1` job through `trainserve up` on the GPU: upload, train 2 epochs, predict."""
    import httpx

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still stops `trainserve up`
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="gpu-check-e2e-") as tmp:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TRAINSERVE_")},
            "TRAINSERVE_DATABASE_URL": f"sqlite:///{tmp}/e2e.db",
            "TRAINSERVE_CACHE_DIR": f"{tmp}/cache",
            "TRAINSERVE_DEVICE": device,
            "TRAINSERVE_PORT": str(port),
            "TRAINSERVE_WORKERS": "1",
            "TRAINSERVE_API_KEYS": E2E_KEY,
            "TRAINSERVE_WORKER_POLL_SECONDS": "0.2",
        }
        command = Path(sys.executable).with_name("trainserve")
        argv = [str(command)] if command.exists() else [sys.executable, "-m", "app.cli"]
        up = subprocess.Popen([*argv, "up"], env=env, cwd=tmp)
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {E2E_KEY}"}, timeout=120
        )
        try:
            result = _drive(client, up, deadline, model)
        finally:
            client.close()
            up.terminate()  # `up` passes SIGTERM on to the API and the worker and waits for them
            try:
                up.wait(timeout=60)
            except subprocess.TimeoutExpired:
                up.kill()
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    if result["status"] != "succeeded" or result["predict_errors"]:
        raise SystemExit(f"end to end: job {result['status']}, {result['predict_errors']} /predict errors")


def _drive(client: Any, up: subprocess.Popen[bytes], deadline: float, model: str) -> dict[str, Any]:
    import httpx

    while True:
        if up.poll() is not None:
            raise RuntimeError(f"trainserve up exited with {up.returncode}")
        try:
            if client.get("/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("trainserve up did not answer /health")
        time.sleep(0.3)
    archive, held_out = digits_upload()
    dataset_id = client.post("/datasets", json={"name": "digits"}).raise_for_status().json()["id"]
    added = client.post(
        f"/datasets/{dataset_id}/archive", files={"file": ("digits.zip", archive, "application/zip")}
    ).raise_for_status()
    print(f"uploaded: {added.json()}", flush=True)
    spec = {"dataset_id": dataset_id, "model": model, "epochs": 2, "devices": 1, "batch_size": 128}
    job_id = client.post("/jobs", json=spec).raise_for_status().json()["id"]
    started = time.monotonic()
    while (job := client.get(f"/jobs/{job_id}").json())["status"] not in {"succeeded", "failed", "cancelled"}:
        if up.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} did not finish: {job['status']} {job.get('progress')}")
        time.sleep(0.5)
    job_seconds = time.monotonic() - started
    epochs = client.get(f"/jobs/{job_id}/metrics").json()["epochs"]
    right, errors, answers = 0, 0, []
    if job["status"] == "succeeded":
        for label, png in held_out:
            response = client.post(
                "/predict", data={"job_id": str(job_id)}, files={"file": ("digit.png", png, "image/png")}
            )
            if response.status_code != 200:
                errors += 1
                answers.append(f"{response.status_code}: {response.text[:200]}")
                continue
            right += response.json()["label"] == label
    info = job.get("info") or {}
    return {
        "job_id": job_id,
        "model": model,
        "status": job["status"],
        "error": job.get("error"),
        "seconds": round(job_seconds, 1),
        "epochs": len(epochs),
        "val_acc": epochs[-1]["val_acc"] if epochs else None,
        "epoch_images_per_second": [row["images_per_second"] for row in epochs],
        "device": info.get("device"),
        "data_placement": info.get("data_placement"),
        "mixed_precision": info.get("mixed_precision"),
        "channels_last": info.get("channels_last"),
        "world_size": info.get("world_size"),
        "predicted": len(held_out) if job["status"] == "succeeded" else 0,
        "predicted_right": right,
        "predict_errors": errors,
        "predict_error_samples": answers[:3],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "gpu-check")
    parser.add_argument("--deadline", type=float, default=time.time() + 460, help="epoch seconds")
    parser.add_argument("--started", type=float, default=None, help="epoch seconds the run began")
    parser.add_argument("--python", default=sys.executable, help="the interpreter the parts run with")
    parser.add_argument("--install-rc", type=int, default=0)
    parser.add_argument("--install-seconds", type=float, default=0.0)
    parser.add_argument("--install-budget", type=float, default=0.0)
    parser.add_argument("--e2e", type=Path, metavar="JSON", help="run only the end-to-end part")
    parser.add_argument("--e2e-device", default="cuda", help="its device (cpu for a dry run)")
    parser.add_argument("--e2e-model", default="resnet18", help="its network")
    args = parser.parse_args()
    if args.e2e:
        end_to_end(args.e2e, device=args.e2e_device, model=args.e2e_model)
        return 0
    return run_all(args)


if __name__ == "__main__":
    raise SystemExit(main())
