"""Predictions: a small LRU of ready models keyed by checkpoint, so weights load once, not per request."""

from __future__ import annotations

import threading
from collections import OrderedDict

from sqlalchemy.orm import Session

from app.core.errors import Invalid
from app.schemas.predict import PredictionRead
from app.services.jobs import best_checkpoint
from models.predictor import Predictor
from models.preprocessing import ImageDecodeError, decode_image


class PredictorCache:
    """Up to `capacity` loaded models; a newer best checkpoint of a job replaces the cached one."""

    def __init__(self, capacity: int, device: str = "cpu") -> None:
        self.capacity = capacity
        self.device = device
        self._items: OrderedDict[int, tuple[tuple[object, ...], Predictor]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, session: Session, job_id: int) -> tuple[int, Predictor]:
        checkpoint = best_checkpoint(session, job_id, with_weights=False)
        # SQLite may reuse a replaced row's id, so the version is the whole identity, not the id alone.
        version = (checkpoint.id, checkpoint.epoch, checkpoint.created_at)
        with self._lock:
            cached = self._items.get(job_id)
            if cached is not None and cached[0] == version:
                self._items.move_to_end(job_id)
                return checkpoint.epoch, cached[1]
        full = best_checkpoint(session, job_id, with_weights=True)
        predictor = Predictor(full.weights, device=self.device)
        with self._lock:
            self._items[job_id] = ((full.id, full.epoch, full.created_at), predictor)
            self._items.move_to_end(job_id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return full.epoch, predictor


def predict_image(
    session: Session, *, cache: PredictorCache, job_id: int, data: bytes, max_pixels: int
) -> PredictionRead:
    """Softmax over all the job's classes for one image of any size and mode."""
    epoch, predictor = cache.get(session, job_id)
    try:
        image = decode_image(data, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        raise Invalid(f"file: {exc}") from None
    scores = predictor.predict(image)
    label = max(scores, key=scores.__getitem__)
    return PredictionRead(job_id=job_id, epoch=epoch, label=label, score=scores[label], scores=scores)
