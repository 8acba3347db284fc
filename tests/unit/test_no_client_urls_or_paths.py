"""The audit of issue 7, kept true: no code fetches a URL or opens a file named by a client.

Everything stored is addressed by server-made ids, so the service code needs no HTTP client and opens no
file but the few below, whose paths come from the operator's settings or the model registry.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICE_PACKAGES = ("app", "models", "workers")
NETWORK_MODULES = {"httpx", "requests", "urllib", "urllib3", "aiohttp", "http", "socket", "ftplib", "smtplib"}
FILE_CALLS = {
    "open",
    "write_bytes",
    "write_text",
    "read_bytes",
    "read_text",
    "extract",
    "extractall",
    "load_state_dict_from_url",
    "download_url_to_file",
    "urlretrieve",
    "mkdir",
    "load",
}
# file -> the calls it may make, and why they are safe.
ALLOWED = {
    # the SQLite file's folder, from TRAINSERVE_DATABASE_URL (the operator's setting)
    "app/db/engine.py": {"mkdir"},
    # zip members opened by their ZipInfo, in memory: never a path on disk
    "app/services/archives.py": {"open"},
    # torch.load of the torchvision file named by the model registry (weights_only)
    "models/pretrained.py": {"load"},
    # torch.load(BytesIO(upload), weights_only=True), and the upload's own zip members opened by their
    # ZipInfo to measure them first: bytes in memory, never a path
    "models/weights_file.py": {"load", "open"},
    # Image.open(BytesIO(...)); image.load() decodes the bytes in memory
    "models/preprocessing.py": {"open", "load"},
    "models/imaging.py": {"open", "load"},
    # the decoded-image cache: files under TRAINSERVE_CACHE_DIR (the operator's setting), named by a hash
    # of the dataset's contents, never by anything a client sent
    "workers/cache.py": {"mkdir", "open", "read_text"},
    "workers/data.py": {"open"},  # CacheEntry.open(): the memory map of one cache entry
    # safetensors / json loads of bytes in memory
    "models/checkpoint.py": {"load"},
    "workers/resume.py": {"load"},
    # the stop file of a distributed job's ranks, in a temporary directory the worker made
    "workers/distributed.py": {"write_text", "read_text"},
}


# The terminal client (`trainserve submit/jobs/predict`) runs on the user's machine: it is an HTTP client
# of the URL its user gives and reads the spec and image files its user names. The server never runs it.
CLIENT_PACKAGE = ROOT / "app" / "client"


def python_files() -> list[Path]:
    return sorted(
        path
        for package in SERVICE_PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if CLIENT_PACKAGE not in path.parents
    )


def test_the_server_never_imports_the_terminal_client() -> None:
    for path in python_files():
        if path == ROOT / "app" / "cli.py":
            continue  # the command line dispatches to the client's subcommands
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("app.client"), f"{path} imports the terminal client"
            elif isinstance(node, ast.Import):
                assert all(not a.name.startswith("app.client") for a in node.names), path


@pytest.mark.parametrize("path", python_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_network_client_and_no_unlisted_file_access(path: Path) -> None:
    relative = str(path.relative_to(ROOT))
    tree = ast.parse(path.read_text(), filename=relative)
    imported: set[str] = set()
    calls: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call):
            func = node.func
            name = (
                func.attr
                if isinstance(func, ast.Attribute)
                else func.id
                if isinstance(func, ast.Name)
                else ""
            )
            if name in FILE_CALLS:
                calls.add(name)
    if relative == "workers/loop.py":
        imported -= {"socket"}  # socket.gethostname() names the worker; no connection is made
    if relative == "workers/distributed.py":
        # the host name and a free local port for the rendezvous the worker itself hosts; torch.distributed
        # connects only to the address a peer worker published in the database, never a client's
        imported -= {"socket"}
    if relative == "app/processes.py":
        imported -= {"socket"}  # the API's own listening sockets, on the operator's host and port; no client
    assert imported & NETWORK_MODULES == set(), f"{relative} imports a network client"
    assert calls - ALLOWED.get(relative, set()) == set(), f"{relative} touches files: {sorted(calls)}"
