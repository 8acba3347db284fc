# trainserve: `make run` serves the whole loop, `make test` runs every test. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint audit format migrate clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall when pyproject.toml changes; the stamp files record what was installed.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/trainserve up

migrate: $(VENV)/.installed
	$(BIN)/trainserve migrate

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed-test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Offline CVE floors always; pip-audit online when its service answers (see scripts/audit_deps.py).
audit: $(VENV)/.installed-test
	$(BIN)/python scripts/audit_deps.py

test: lint audit
	$(BIN)/python -m pytest

# The image, docker-compose.yml and a model trained inside containers, with podman (tests/container/).
# Skips, saying why, where podman or podman-compose is not installed.
.PHONY: test-container
test-container: $(VENV)/.installed-test
	$(BIN)/python -m pytest tests/container -v -s

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache *.egg-info
