"""Settings: one pydantic-settings class, read from `TRAINSERVE_*` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Every limit and address the service uses; the defaults suit one machine."""

    model_config = SettingsConfigDict(env_prefix="TRAINSERVE_", extra="ignore")

    database_url: str = "sqlite:///./var/trainserve.db"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    workers: int = Field(default=1, ge=0, le=64, description="worker processes that `trainserve up` starts")
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda|cuda:\d+|mps)$")
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    cors_allow_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated origins a browser may call the API from; empty: CORS off",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated host names the API answers to (the Host header, port ignored; "
        "`*.example.com` matches subdomains, `*` turns the check off); default: the bound address and "
        "localhost, 127.0.0.1, ::1. Refusing other names stops DNS rebinding",
    )
    log_level: str = "INFO"

    # Uploads.
    max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1, description="largest single image file")
    max_files_per_request: int = Field(default=1000, ge=1)
    max_archive_bytes: int = Field(default=1024 * 1024 * 1024, ge=1, description="largest zip upload")
    max_archive_entries: int = Field(default=200_000, ge=1)
    max_archive_uncompressed_bytes: int = Field(default=4 * 1024 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(default=89_478_485, ge=1, description="Pillow's decompression-bomb limit")
    max_label_length: int = Field(default=100, ge=1)
    max_request_bytes: int = Field(
        default=512 * 1024 * 1024, ge=1, description="largest body of one image-upload request"
    )
    max_body_bytes: int = Field(
        default=1024 * 1024, ge=1, description="largest body of every other request (JSON, forms)"
    )
    max_form_field_bytes: int = Field(default=64 * 1024, ge=1, description="largest non-file form field")
    max_weights_bytes: int = Field(
        default=512 * 1024 * 1024, ge=1, description="largest weights file for POST /weights"
    )
    max_weights_expanded_bytes: int = Field(
        default=1024 * 1024 * 1024,
        ge=1,
        description="largest size of an uploaded file's tensors once each is its own contiguous copy (as "
        "stored); checked from the shapes before anything is copied",
    )
    max_weights_expansion: float = Field(
        default=4.0,
        ge=1,
        description="the tensors of an uploaded weights file may expand to at most this multiple of the "
        "file's size (shared storage and views legitimately expand a little; stride-0 views by millions)",
    )
    max_weights_tensors: int = Field(default=100_000, ge=1, description="most tensors in one weights file")
    max_weights_metadata_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1,
        description="largest safetensors header or PyTorch pickle in a weights file (it alone decides how "
        "many objects reading the file creates)",
    )

    # Slow clients (a header or body that trickles in holds a connection and its memory).
    header_read_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="a request's head (request line and headers) must arrive "
        "within this time of the connection opening or the request beginning; else 408 and closed",
    )
    body_read_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="while a request body streams in, the longest gap between "
        "two of its chunks; else 408 and closed",
    )

    thumbnail_concurrency: int = Field(
        default=2,
        ge=1,
        le=64,
        description="thumbnails decoded at once per API process (each costs up to "
        "its image's decoded size while it is made)",
    )
    thumbnail_wait_seconds: float = Field(
        default=10.0,
        ge=0,
        le=600,
        description="how long a thumbnail request waits for a free decoder before a 503 with Retry-After",
    )

    # Jobs and workers.
    worker_poll_seconds: float = Field(default=0.5, gt=0)
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    lease_timeout_seconds: float = Field(default=120.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    progress_interval_seconds: float = Field(default=1.0, gt=0)
    sqlite_busy_timeout_seconds: float = Field(default=30.0, gt=0)

    # Live progress, server-sent events and job logs.
    events_poll_seconds: float = Field(
        default=0.5, gt=0, le=60, description="how often a `/jobs/{id}/events` stream polls the database"
    )
    events_keepalive_seconds: float = Field(
        default=15.0, gt=0, description="an SSE comment after this long without an event keeps proxies open"
    )
    events_max_streams: int = Field(
        default=200, ge=1, description="event streams one API process keeps open in all; past it 503"
    )
    events_max_streams_per_client: int = Field(
        default=20, ge=1, description="event streams one client address may hold open; past it 429"
    )
    busy_retry_after_seconds: int = Field(
        default=5, ge=1, le=3600, description="the Retry-After of a 429 or 503 for a busy resource"
    )
    job_log_max_lines: int = Field(default=2000, ge=1, description="log lines kept per job (oldest dropped)")
    job_log_max_line_chars: int = Field(default=4000, ge=80, description="longer log lines are truncated")
    job_log_flush_seconds: float = Field(default=1.0, gt=0, description="worker log lines are batched")
    job_log_level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")

    # Distributed (multi-process, multi-node) jobs.
    max_job_devices: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="most processes per node a job may ask for (`devices`); default: what the live workers "
        "report, or this machine's CPU count while no worker has reported",
    )
    max_job_nodes: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="most workers one job may ask for (`nodes`); default: the live workers that report they "
        "can serve the job's `devices` (no bound while no worker has reported)",
    )
    gang_slot_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description="a worker holding a slot of a multi-node job releases it when the other slots are not "
        "all held within this time (so two half-gathered jobs never deadlock each other)",
    )
    advertise_host: str | None = Field(
        default=None,
        description="host name or address other machines reach this worker at (the rendezvous endpoint a "
        "multi-node job's slot-0 worker publishes); default: this machine's host name",
    )
    rendezvous_timeout_seconds: float = Field(
        default=120.0, gt=0, description="how long the nodes of a started multi-node job may take to join"
    )
    rank_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch threads per rank of a distributed job on the CPU; default: the cores divided by "
        "the node's ranks (set it when several workers share one machine)",
    )
    collective_timeout_seconds: float = Field(
        default=300.0, gt=0, description="torch.distributed timeout for one collective (a stuck peer)"
    )

    # Training data.
    cache_dir: Path = Field(
        default=Path("./var/cache"),
        description="where workers keep decoded images, one memory-mapped file per (dataset contents, "
        "image size, channels); local disk, rebuilt when missing",
    )
    cache_max_bytes: int = Field(
        default=20 * 1024**3, ge=0, description="least recently used cache entries go beyond this size"
    )
    cache_build_processes: int = Field(
        default=0, ge=0, le=256, description="decoding processes for a cache build; 0: one per CPU core"
    )
    cache_pool_min_images: int = Field(
        default=4096, ge=1, description="smaller datasets are decoded in the worker itself, no process pool"
    )
    worker_malloc_arenas: int = Field(
        default=2,
        ge=0,
        le=1024,
        description="glibc malloc arenas in a worker process (0: glibc's default of 8 per core); fewer "
        "arenas keep a job's peak memory lower at the same speed",
    )
    cpu_autotune_seconds: float = Field(
        default=3.0,
        ge=0,
        le=600,
        description="on the CPU, time spent timing a few training steps in each memory layout (and in bf16 "
        "where the CPU has it and mixed_precision is auto) to train in the fastest; 0 turns it off",
    )
    device_data_fraction: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="the whole dataset moves to the GPU when it takes at most this share of its free memory",
    )

    # Prediction.
    predict_cache_size: int = Field(default=8, ge=1, description="models kept loaded for /predict")
    predict_cache_max_bytes: int = Field(
        default=2 * 1024**3, ge=1, description="weights kept loaded, in bytes (the newest model always stays)"
    )
    predict_refresh_seconds: float = Field(
        default=1.0,
        ge=0,
        description="a cached model is re-checked against the database at most this often: a newer best "
        "checkpoint is served within this time (0: check on every request)",
    )
    predict_max_batch_size: int = Field(
        default=32,
        ge=1,
        le=4096,
        description="images per forward pass at most; on the CPU the load-time plan may choose fewer",
    )
    predict_plan_seconds: float = Field(
        default=2.0,
        ge=0,
        le=600,
        description="on the CPU, time spent when a model loads timing its forward pass in each memory "
        "layout and at growing batch sizes, to serve in the faster layout and never batch past the best "
        "size; 0 turns it off",
    )
    predict_max_wait_ms: float = Field(
        default=5.0,
        ge=0,
        le=1000,
        description="with predict_concurrency > 1: how long a free forward slot waits for a fuller batch "
        "while another pass runs (an idle model never waits)",
    )
    predict_concurrency: int = Field(default=1, ge=1, le=64, description="forward passes in flight per model")
    predict_torch_threads: int = Field(
        default=0, ge=0, le=256, description="torch threads per API process (0: the cores / api_processes)"
    )
    predict_max_files: int = Field(default=64, ge=1, description="files per POST /predict/batch")
    api_processes: int = Field(
        default=1, ge=1, le=64, description="API server processes (each has its own model cache)"
    )

    @field_validator("api_keys", "cors_allow_origins", "allowed_hosts", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @property
    def effective_allowed_hosts(self) -> frozenset[str]:
        """`allowed_hosts` in lower case, or by default the bound address and the localhost names."""
        if self.allowed_hosts:
            return frozenset(host.lower() for host in self.allowed_hosts)
        return frozenset({"localhost", "127.0.0.1", "::1", self.host.strip("[]").lower()})

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings; tests clear the cache after changing the environment."""
    return Settings()
