# trainserve container image: one image for the API (`trainserve api`) and the worker (`trainserve worker`).
#
#   docker build -t trainserve .                                                   # PyPI torch (CUDA build, ~6 GB)
#   docker build -t trainserve --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .   # CPU-only, smaller
#
# Build argument TORCH_INDEX_URL: the package index torch and torchvision are installed from.
#   empty (default): PyPI's standard Linux wheels, which bundle the CUDA runtime (nvidia-* packages) and
#                    also run on machines without a GPU; needed for a GPU worker.
#   https://download.pytorch.org/whl/cpu: PyTorch's CPU-only wheels; a much smaller image that never uses a GPU.
# Everything else always comes from PyPI.
#
# The image's default command serves the API but does not migrate the database: run `trainserve migrate`
# first (docker-compose.yml runs `sh -c "trainserve migrate && exec trainserve api"`), or run `trainserve up`
# in a single container (migrate + API + workers).
#
# Layers: the dependencies (torch: gigabytes) form one layer that changes only when pyproject.toml or
# TORCH_INDEX_URL does; the project itself is a separate small layer on top, so a source edit rebuilds and
# re-ships kilobytes, not the whole virtual environment.

# ---------------------------------------------------------------------------------------------------------
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv

WORKDIR /src

# The dependencies, before any source is copied: this layer depends only on pyproject.toml (and the build
# argument). The list is read from [project].dependencies; torch and torchvision also go to a file of their
# own, installed first from TORCH_INDEX_URL when it is set (the second install then finds them satisfied).
# pip compiles the bytecode here, since the runtime image's venv is read-only.
COPY pyproject.toml ./
ARG TORCH_INDEX_URL=""
RUN python -c "import re, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; name = lambda d: re.split(r'[^A-Za-z0-9_.-]', d.strip(), maxsplit=1)[0].lower(); open('requirements.txt', 'w').write(''.join(d + '\n' for d in deps)); open('requirements-torch.txt', 'w').write(''.join(d + '\n' for d in deps if name(d) in ('torch', 'torchvision')))" \
 && pip install --upgrade pip \
 && if [ -n "$TORCH_INDEX_URL" ]; then pip install --index-url "$TORCH_INDEX_URL" -r requirements-torch.txt; fi \
 && pip install -r requirements.txt

# The project itself, as a wheel (its dependencies are all installed above). Building it does not touch
# /opt/venv, so the runtime stage's copy of the venv stays cached across source edits.
COPY . .
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------------------
FROM python:3.11-slim AS runtime

LABEL org.opencontainers.image.title="trainserve" \
      org.opencontainers.image.description="REST service that trains image classifiers in a worker process and serves their predictions"

# Non-root user; /data (the SQLite database, caches, anything else the service writes) is its only writable
# place, and its home directory.
RUN groupadd --gid 10001 trainserve \
 && useradd --uid 10001 --gid trainserve --home-dir /data --no-create-home \
            --shell /usr/sbin/nologin trainserve \
 && mkdir -p /data \
 && chown trainserve:trainserve /data \
 && chmod 0750 /data

# The dependencies, then trainserve (packages, migrations), all in /opt/venv and owned by root: read-only for
# the service's user. Nothing else comes from the builder: no compilers, no pip cache, no build files.
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /wheels /tmp/wheels
RUN PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    /opt/venv/bin/pip install --no-deps --no-index /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels \
 && /opt/venv/bin/trainserve --help >/dev/null

ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TRAINSERVE_DATABASE_URL=sqlite:////data/trainserve.db \
    TRAINSERVE_CACHE_DIR=/data/cache \
    TRAINSERVE_HOST=0.0.0.0 \
    TRAINSERVE_PORT=8000

# Declared after the chown above, so a new named volume starts out owned by `trainserve`.
VOLUME ["/data"]
WORKDIR /data
USER trainserve:trainserve

EXPOSE 8000

# slim images have no curl: ask python. Only meaningful for the API; the worker service disables it in compose
# (or run a worker with `docker run --no-healthcheck ...`).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('TRAINSERVE_PORT', '8000'), timeout=4); sys.exit(0 if r.status == 200 else 1)"]

STOPSIGNAL SIGTERM

# Exec form: trainserve is the container's main process and receives SIGTERM itself.
CMD ["trainserve", "api"]
