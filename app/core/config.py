"""Settings: one pydantic-settings class, read from `TRAINSERVE_*` environment variables."""

from __future__ import annotations

from functools import lru_cache
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
    log_level: str = "INFO"

    # Uploads.
    max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1, description="largest single image file")
    max_files_per_request: int = Field(default=1000, ge=1)
    max_archive_bytes: int = Field(default=1024 * 1024 * 1024, ge=1, description="largest zip upload")
    max_archive_entries: int = Field(default=200_000, ge=1)
    max_archive_uncompressed_bytes: int = Field(default=4 * 1024 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(default=89_478_485, ge=1, description="Pillow's decompression-bomb limit")
    max_label_length: int = Field(default=100, ge=1)

    # Jobs and workers.
    worker_poll_seconds: float = Field(default=1.0, gt=0)
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    lease_timeout_seconds: float = Field(default=120.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    progress_interval_seconds: float = Field(default=1.0, gt=0)
    sqlite_busy_timeout_seconds: float = Field(default=30.0, gt=0)

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
    predict_max_batch_size: int = Field(default=32, ge=1, le=4096, description="images per forward pass")
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

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings; tests clear the cache after changing the environment."""
    return Settings()
