#!/usr/bin/env bash
# The GPU check (docs/gpu.md): from a clean copy, in under 8 minutes, install trainserve, run
# `pytest -m gpu`, the training and prediction benchmarks on the GPU and a `devices: 1` job end to end
# through `trainserve up`; print one summary table, and write it to $OUT/gpu_check.json when OUT is set
# (the whole log to $OUT/gpu_check.log). Without CUDA each GPU part prints one line saying it was skipped
# and the script exits 0. It exits 1 when a part failed or ran out of time.
#
#   bash bench/gpu_check.sh                  # python3 on PATH; PyPI, or the wheels in .whl/
#   bash bench/gpu_wheels.sh                 # first, where the GPU machine has no package index
#
# Settings (environment): GPU_CHECK_PYTHON (default python3), GPU_CHECK_SECONDS (whole-run budget,
# default 465), GPU_CHECK_VENV (default .gpu-venv), GPU_CHECK_WHEELS (default .whl).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

if [[ -n "${OUT:-}" && -z "${GPU_CHECK_LOGGING:-}" ]]; then
    mkdir -p "$OUT"
    GPU_CHECK_LOGGING=1 bash "$0" "$@" 2>&1 | tee "$OUT/gpu_check.log"
    exit "${PIPESTATUS[0]}"
fi

export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
started=$(date +%s)
deadline=$((started + ${GPU_CHECK_SECONDS:-465}))
PY=${GPU_CHECK_PYTHON:-python3}
VENV=${GPU_CHECK_VENV:-.gpu-venv}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
VPY="$VENV/bin/python"

echo "== gpu check: $(date -u +%FT%TZ), $(nproc) cores, $("$PY" --version 2>&1) at $(command -v "$PY")"

# A venv layered on the interpreter's own packages: on a GPU image that already holds torch and its CUDA
# libraries (and can reach no package index) they are used as they are; pip adds only what is missing.
make_venv() {
    # Kept when it exists for the same interpreter: an install cut short by its time limit goes on where
    # it stopped next run.
    local base site
    base=$("$PY" -c 'import sys; print(sys.executable)') || return 1
    if [[ ! -x "$VPY" || "$(cat "$VENV/.gpu-check-base" 2>/dev/null)" != "$base" ]]; then
        "$PY" -m venv --clear --without-pip "$VENV" || return 1
        echo "$base" >"$VENV/.gpu-check-base"
    fi
    site=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
    "$PY" - "$site/_gpu_check_base.pth" <<'EOF'
import sys
from pathlib import Path

dirs = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
Path(sys.argv[1]).write_text("".join(f"import site; site.addsitedir({d!r})\n" for d in dirs))
EOF
}

install() {
    local stamp
    stamp=$(cat pyproject.toml <(command -v "$PY") <(ls "$WHEELS" 2>/dev/null) | sha256sum | cut -c1-16)
    if [[ -f "$VENV/.gpu-check-installed" && $(cat "$VENV/.gpu-check-installed") == "$stamp" ]]; then
        echo "install: $VENV is already installed for this pyproject.toml"
        echo '{"mode": "reused"}' >"$WORK/install.json"
        return 0
    fi
    make_venv || return 1
    local extras=(-e ".[bench]" "pytest>=8" "pytest-timeout>=2.3")
    if [[ -d "$WHEELS" ]]; then
        echo "install: offline, from the wheels in $WHEELS (no package index)"
        echo '{"mode": "offline wheels"}' >"$WORK/install.json"
        local offline=(--no-index --find-links "$WHEELS")
        # The editable build runs without isolation, so with these build requirements (no-ops when the
        # layered interpreter has them).
        "$VPY" -m pip install -q "${offline[@]}" "setuptools>=69" wheel || return 1
        "$VPY" -m pip install -q "${offline[@]}" --no-build-isolation "${extras[@]}" || return 1
    else
        echo "install: from the package index"
        echo '{"mode": "package index"}' >"$WORK/install.json"
        "$VPY" -m pip install -q "${extras[@]}" || return 1
    fi
    echo "$stamp" >"$VENV/.gpu-check-installed"
}

echo "== install"
budget=$((deadline - $(date +%s) - 300))  # leave the GPU parts at least 5 minutes
((budget > 240)) && budget=240
[[ -d "$WHEELS" ]] && ((budget > 75)) && budget=75
((budget < 30)) && budget=30
export -f install make_venv
export PY VENV WHEELS WORK VPY
install_started=$(date +%s)
timeout --kill-after=10 "$budget" bash -c install
install_rc=$?
install_seconds=$(($(date +%s) - install_started))
if ((install_rc == 124)); then
    echo "install: timed out after ${budget} s"
elif ((install_rc != 0)); then
    echo "install: FAILED (exit $install_rc)"
fi

# The parts and the summary: stdlib only, so they run (and report) even when the install failed.
runner="$VPY"
[[ -x "$runner" ]] || runner="$PY"
"$runner" bench/gpu_check.py --work "$WORK" --started "$started" --deadline "$deadline" --python "$runner" \
    --install-rc "$install_rc" --install-seconds "$install_seconds" --install-budget "$budget"
