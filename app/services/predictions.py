"""Predictions: ready models kept in an LRU cache, each behind a dynamic batcher.

The hot path of a cached, fresh model touches no database and no lock held across I/O: the request
joins its model's batcher, and the batch thread decodes, preprocesses and runs the forward pass.
A cached model is re-checked with one light query (checkpoint id and epoch, no weights) at most every
`predict_refresh_seconds`; only a newer best checkpoint loads weights again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import Conflict, DomainError, Invalid
from app.db.session import read_scope
from app.db.tables import Checkpoint, CheckpointKind
from app.schemas.predict import LabelScore, PredictionRead
from app.services.batching import DynamicBatcher
from app.services.jobs import best_checkpoint, get_job
from app.services.serving_plan import plan_serving
from models.predictor import Predictor
from models.preprocessing import ImageDecodeError, decode_image, to_uint8

log = logging.getLogger(__name__)

# What identifies a stored best checkpoint: SQLite may reuse a replaced row's id, so not the id alone.
Version = tuple[int, int, datetime]


@dataclass(frozen=True)
class PredictItem:
    """One image to score, and how many top classes its answer lists."""

    data: bytes
    top_k: int | None = None


@dataclass(frozen=True)
class Scored:
    label: str
    score: float
    scores: dict[str, float]
    top: list[tuple[str, float]] | None


def score_batch(
    predictor: Predictor, items: list[PredictItem], *, max_pixels: int, threads: int | None = None
) -> list[Scored | DomainError]:
    """Decode, preprocess and score a batch in one forward pass; a bad file fails only its own slot."""
    results: list[Scored | DomainError | None] = [None] * len(items)
    tensors: list[torch.Tensor] = []
    positions: list[int] = []
    for index, item in enumerate(items):
        try:
            tensors.append(to_uint8(decode_image(item.data, max_pixels=max_pixels), predictor.preprocessing))
            positions.append(index)
        except ImageDecodeError as exc:
            results[index] = Invalid(f"file: {exc}")
        except Exception as exc:  # Pillow raises more than it documents on hostile files
            log.warning("could not decode an uploaded image: %r", exc)
            results[index] = Invalid(f"file: could not be decoded as an image ({type(exc).__name__})")
    if tensors:
        use_threads(threads)
        rows = predictor.probabilities_of(tensors).tolist()
        classes = predictor.classes
        for index, row in zip(positions, rows, strict=True):
            scores = dict(zip(classes, row, strict=True))
            best = max(range(len(row)), key=row.__getitem__)
            top_k = items[index].top_k
            top = None
            if top_k is not None:
                order = sorted(range(len(row)), key=row.__getitem__, reverse=True)[:top_k]
                top = [(classes[i], row[i]) for i in order]
            results[index] = Scored(label=classes[best], score=row[best], scores=scores, top=top)
    return [result for result in results if result is not None]


@dataclass
class ServedModel:
    """A loaded best checkpoint of one job and the batcher in front of it."""

    job_id: int
    version: Version
    predictor: Predictor
    batcher: DynamicBatcher[PredictItem, Scored]
    size_bytes: int
    checked_at: float = field(default_factory=time.monotonic)

    @property
    def epoch(self) -> int:
        return self.version[1]

    def to_read(self, scored: Scored) -> PredictionRead:
        return PredictionRead(
            job_id=self.job_id,
            epoch=self.epoch,
            label=scored.label,
            score=scored.score,
            scores=scored.scores,
            top=None if scored.top is None else [LabelScore(label=n, score=s) for n, s in scored.top],
        )


def checkpoint_version(session: Session, job_id: int) -> Version:
    """The job's best checkpoint identity in one light query (no weights); 404/409 as for /predict."""
    row = session.execute(
        select(Checkpoint.id, Checkpoint.epoch, Checkpoint.created_at).where(
            Checkpoint.job_id == job_id, Checkpoint.kind == CheckpointKind.best
        )
    ).first()
    if row is None:
        job = get_job(session, job_id)  # 404 for an unknown job
        raise Conflict(f"job {job_id} has no checkpoint yet (status: {job.status.value})")
    return (row.id, row.epoch, row.created_at)


class ModelCache:
    """Ready models by job, least recently used evicted first under a count and a memory bound."""

    def __init__(self, settings: Settings, *, device: str | None = None) -> None:
        self.settings = settings
        self.device = device or serving_device(settings.device)
        self._items: OrderedDict[int, ServedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loads: dict[int, Future[ServedModel]] = {}
        # Loads and freshness checks never wait behind forward passes, and the reverse.
        self._loader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="predict-load")
        self._forward = ThreadPoolExecutor(
            max_workers=max(2, 2 * settings.predict_concurrency), thread_name_prefix="predict-batch"
        )

    def __len__(self) -> int:
        return len(self._items)

    def peek(self, job_id: int) -> ServedModel | None:
        """The cached model of a job, if any, without touching its recency or freshness."""
        with self._lock:
            return self._items.get(job_id)

    def cached_jobs(self) -> list[int]:
        """Job ids, least recently used first."""
        with self._lock:
            return list(self._items)

    async def get(self, job_id: int) -> ServedModel:
        """The job's model, checked against the database at most every `predict_refresh_seconds`."""
        with self._lock:
            entry = self._items.get(job_id)
            if (
                entry is not None
                and time.monotonic() - entry.checked_at < self.settings.predict_refresh_seconds
            ):
                self._items.move_to_end(job_id)
                return entry
            pending = self._loads.get(job_id)
            started = pending is None
            if pending is None:  # one check or load per job at a time; concurrent requests share it
                pending = self._loader.submit(self._refresh, job_id, entry)
                self._loads[job_id] = pending
        if started:
            # Outside the lock: a load that has already finished runs the callback right here, and
            # the callback takes the lock.
            pending.add_done_callback(lambda done: self._forget_load(job_id, done))
        # Shielded: a client that disconnects must not cancel a load other requests are waiting for.
        return await asyncio.shield(asyncio.wrap_future(pending))

    def _forget_load(self, job_id: int, done: Future[ServedModel]) -> None:
        with self._lock:
            if self._loads.get(job_id) is done:
                del self._loads[job_id]

    def _refresh(self, job_id: int, entry: ServedModel | None) -> ServedModel:
        """Runs in a loader thread: keep the cached model if still the best, else load the new one."""
        checked_at = time.monotonic()
        try:
            with read_scope(self.settings) as session:
                version = checkpoint_version(session, job_id)
                if entry is not None and entry.version == version:
                    entry.checked_at = checked_at
                    return entry
                checkpoint = best_checkpoint(session, job_id, with_weights=True)
                version = (checkpoint.id, checkpoint.epoch, checkpoint.created_at)
                weights = checkpoint.weights
        except DomainError:
            with self._lock:  # the job or its checkpoint is gone: so is the cached model
                self._items.pop(job_id, None)
            raise
        except Exception:
            if entry is None:
                raise
            # The database is unreachable for a moment: the model we have is still a real checkpoint
            # of this job, so keep answering with it and try again after the next interval.
            log.warning(
                "could not re-check job %d's checkpoint; serving the cached one", job_id, exc_info=True
            )
            entry.checked_at = checked_at
            return entry
        predictor = Predictor(weights, device=self.device, serialize=self.settings.predict_concurrency == 1)
        use_threads(threads_for(self.settings, 2))  # the threads a batch will run with
        plan = plan_serving(
            predictor,
            max_batch_size=self.settings.predict_max_batch_size,
            budget_seconds=self.settings.predict_plan_seconds,
        )
        served = ServedModel(
            job_id=job_id,
            version=version,
            predictor=predictor,
            batcher=DynamicBatcher(
                lambda items: score_batch(
                    predictor,
                    items,
                    max_pixels=self.settings.max_image_pixels,
                    threads=threads_for(self.settings, len(items)),
                ),
                executor=self._forward,
                max_batch_size=plan.max_batch_size,
                max_wait_seconds=self.settings.predict_max_wait_ms / 1000,
                concurrency=self.settings.predict_concurrency,
            ),
            size_bytes=predictor.size_bytes,
            checked_at=checked_at,
        )
        log.info(
            "loaded job %d's best checkpoint (epoch %d, %d bytes); serving %s",
            job_id,
            version[1],
            served.size_bytes,
            plan.summary(),
        )
        with self._lock:
            self._items[job_id] = served
            self._items.move_to_end(job_id)
            self._evict()
        return served

    def _evict(self) -> None:
        """Drop least recently used models until both bounds hold; the newest always stays."""
        limit_count, limit_bytes = self.settings.predict_cache_size, self.settings.predict_cache_max_bytes
        while len(self._items) > 1 and (
            len(self._items) > limit_count or sum(m.size_bytes for m in self._items.values()) > limit_bytes
        ):
            job_id, _ = self._items.popitem(last=False)
            log.info("evicted job %d's model from the prediction cache", job_id)

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)
        self._forward.shutdown(wait=False, cancel_futures=True)


async def predict_one(cache: ModelCache, *, job_id: int, data: bytes, top_k: int | None) -> PredictionRead:
    """Softmax over all the job's classes for one image of any size and mode."""
    model = await cache.get(job_id)
    return model.to_read(await model.batcher.submit(PredictItem(data, top_k)))


async def predict_many(
    cache: ModelCache, *, job_id: int, files: list[bytes | DomainError], top_k: int | None
) -> tuple[ServedModel, list[PredictionRead | DomainError]]:
    """One result per file, in order; files already rejected (too large) keep their error."""
    model = await cache.get(job_id)
    wanted = [(i, data) for i, data in enumerate(files) if not isinstance(data, DomainError)]
    scored = await model.batcher.submit_many([PredictItem(data, top_k) for _, data in wanted])
    results: list[PredictionRead | DomainError | bytes] = list(files)  # errors stay; bytes are replaced
    for (index, _), result in zip(wanted, scored, strict=True):
        if isinstance(result, DomainError):
            results[index] = result
        elif isinstance(result, BaseException):
            raise result
        else:
            results[index] = model.to_read(result)
    return model, [r for r in results if not isinstance(r, bytes)]


def serving_device(setting: str) -> str:
    """`auto` serves on the GPU when there is one, like the workers train."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def configure_torch_threads(settings: Settings) -> None:
    """A fixed `predict_torch_threads` for the whole API process; 0 leaves it to `threads_for`."""
    if settings.predict_torch_threads:
        torch.set_num_threads(settings.predict_torch_threads)


def threads_for(settings: Settings, batch_size: int) -> int | None:
    """Intra-op threads for one forward pass (None: keep what is set).

    Adaptive by default: a lone image (the model is otherwise idle) gets every core, for the lowest
    latency; a batch (the server is busy) gets cores / (api_processes x predict_concurrency), so passes
    running side by side do not fight over cores and OpenMP threads do not spin against each other.
    """
    if settings.predict_torch_threads:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return (
        cores if batch_size == 1 else max(1, cores // (settings.api_processes * settings.predict_concurrency))
    )


def use_threads(threads: int | None) -> None:
    """Set the calling thread's intra-op thread count (OpenMP's setting is per calling thread)."""
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
