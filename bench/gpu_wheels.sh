#!/usr/bin/env bash
# Wheels for bench/gpu_check.sh on a GPU machine that reaches no package index, such as one whose image
# already holds Python 3.12 with torch, torchvision, numpy, scikit-learn, matplotlib and pytest (docs/gpu.md):
# the project's other dependencies, LitServe and pytest with everything they need, for CPython 3.12 on
# manylinux x86_64, into .whl/ (git-ignored: send it along with the copy of the repository). gpu_check.sh
# installs from it with --no-index whenever the folder exists, and pip takes from it only what the machine
# lacks. Versions are the ones this environment runs (.venv), the newest where it has none.
#
#   bash bench/gpu_wheels.sh        # GPU_WHEELS_PYTHON_VERSION=3.11 for another interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${GPU_CHECK_WHEELS:-.whl}
PYVER=${GPU_WHEELS_PYTHON_VERSION:-3.12}
PY=${GPU_WHEELS_PYTHON:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python3
# Large, and in the GPU image already: left out (with what only they need).
EXCLUDE="torch torchvision torchmetrics numpy matplotlib scikit-learn psutil safetensors"

mapfile -t requirements < <("$PY" - "$EXCLUDE" <<'PYEOF'
import re
import sys
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
excluded = set(sys.argv[1].split())
for requirement in [*project["dependencies"], *project["optional-dependencies"]["bench"]]:
    if re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower() not in excluded:
        print(requirement)
for extra in ("pytest>=8", "pytest-timeout>=2.3", "setuptools>=69", "wheel"):
    print(extra)
PYEOF
)
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$PY" -m pip freeze --exclude-editable | grep '==' >"$constraints" || true
mkdir -p "$DEST"
"$PY" -m pip download --quiet --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -c "$constraints" -d "$DEST" \
    "${requirements[@]}"
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
