"""scripts/audit_deps.py: the CVE floors fail on vulnerable pins, and pip-audit's silent skips are caught."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "audit_deps.py"


@pytest.fixture(scope="module")
def audit() -> ModuleType:
    spec = importlib.util.spec_from_file_location("audit_deps", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vulnerable_pins_are_named_with_their_advisory(audit: ModuleType, tmp_path: Path) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(
        "torch==2.5.1\npython-multipart==0.0.17  # old\nStarlette==0.40.0\nnumpy==2.0.0\n"
    )
    problems = audit.floor_problems(audit.pinned_versions(requirements))
    assert len(problems) == 3
    assert any(p.startswith("torch 2.5.1 is older than 2.10") and "CVE-2025-32434" in p for p in problems)
    assert any(p.startswith("python-multipart 0.0.17") for p in problems)
    assert any(p.startswith("starlette 0.40.0") for p in problems)


def test_fixed_versions_pass(audit: ModuleType) -> None:
    fixed = {name: version for name, (version, _) in audit.FLOORS.items()}
    assert audit.floor_problems(fixed) == []


def test_this_environment_and_pyproject_are_past_every_floor(audit: ModuleType) -> None:
    assert audit.floor_problems(audit.installed_versions()) == []
    assert audit.pyproject_problems() == []


def fake_pip_audit(monkeypatch: pytest.MonkeyPatch, audit: ModuleType, report: dict[str, Any]) -> None:
    def run(*_args: Any, **_kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess([], 1, stdout=json.dumps(report), stderr="")

    monkeypatch.setattr(audit.subprocess, "run", run)
    monkeypatch.setattr(audit, "service_reachable", lambda: None)


def test_online_findings_are_reported(monkeypatch: pytest.MonkeyPatch, audit: ModuleType) -> None:
    report = {
        "dependencies": [
            {
                "name": "jinja2",
                "version": "2.10",
                "vulns": [{"id": "PYSEC-2019-217", "fix_versions": ["2.10.1"]}],
            },
            {"name": "trainserve", "skip_reason": "distribution marked as editable"},
        ]
    }
    fake_pip_audit(monkeypatch, audit, report)
    found, skipped, unavailable = audit.online_audit(None)
    assert found == ["jinja2 2.10: PYSEC-2019-217 (fixed in 2.10.1)"]
    assert skipped == []
    assert unavailable is None


def test_a_service_that_answers_for_nothing_is_not_a_pass(
    monkeypatch: pytest.MonkeyPatch, audit: ModuleType
) -> None:
    reason = "Dependency not found on PyPI and could not be audited: torch (2.15.0)"
    fake_pip_audit(monkeypatch, audit, {"dependencies": [{"name": "torch", "skip_reason": reason}]})
    found, skipped, unavailable = audit.online_audit(None)
    assert found == []
    assert skipped == [f"torch: {reason}"]
    assert unavailable == "the vulnerability service answered for none of the packages"


def test_an_unreachable_service_is_said_at_once(monkeypatch: pytest.MonkeyPatch, audit: ModuleType) -> None:
    def never(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("pip-audit must not be started when PyPI cannot be reached")

    monkeypatch.setattr(audit.subprocess, "run", never)
    monkeypatch.setattr(audit, "service_reachable", lambda: "PyPI is unreachable (no route)")
    assert audit.online_audit(None) == ([], [], "PyPI is unreachable (no route)")
