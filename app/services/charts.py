"""Training curves and confusion matrices as CSV and PNG (matplotlib's Agg backend, no pyplot).

Each chart is its own `Figure` rendered by its own `FigureCanvasAgg`, so no global pyplot state is
involved; matplotlib still does not promise thread safety, so rendering is serialised by a lock (the
API runs sync routes in a thread pool). A chart takes tens of milliseconds.
"""

from __future__ import annotations

import csv
import io
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from app.schemas.jobs import EpochMetricRead

# Confusion matrices with more classes than this get no count written in their cells.
MAX_ANNOTATED_CLASSES = 30
# Beyond this many classes only every k-th class name is written on the axes.
MAX_TICK_LABELS = 60
# A learning rate that varies by more than this factor is drawn on a log scale.
LOG_LR_RATIO = 10.0

_DPI = 100
_RENDER_LOCK = threading.Lock()


@contextmanager
def _rendering() -> Iterator[None]:
    """One chart at a time, with every string drawn as plain text: class names and titles come from
    clients, and matplotlib would parse `$...$` in them as mathtext (`$^^$` was a 500)."""
    with _RENDER_LOCK, rc_context({"text.parse_math": False}):
        yield


CSV_FIELDS: tuple[str, ...] = tuple(EpochMetricRead.model_fields)


def metrics_csv(rows: Sequence[EpochMetricRead]) -> str:
    """Every field of `EpochMetricRead`, one line per epoch; None is an empty cell."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for row in rows:
        values = row.model_dump()
        writer.writerow(["" if values[name] is None else values[name] for name in CSV_FIELDS])
    return buffer.getvalue()


def metrics_png(rows: Sequence[EpochMetricRead], *, title: str, best_epoch: int | None = None) -> bytes:
    """Loss and accuracy (train vs val) per epoch, with the learning rate in a small panel below.

    Missing values (None, or not finite) leave gaps; a series with no value at all is left out.
    `best_epoch`, when given, is marked with a dotted vertical line. Zero rows give a placeholder image.
    """
    with _rendering():
        if not rows:
            figure = Figure(figsize=(10, 4), dpi=_DPI, layout="constrained")
            figure.suptitle(title)
            axes = figure.add_subplot()
            axes.set_axis_off()
            axes.text(0.5, 0.5, "no finished epoch yet", ha="center", va="center", fontsize=16, color="0.4")
            return _render(figure)

        epochs = [row.epoch for row in rows]
        figure = Figure(figsize=(12, 7.5), dpi=_DPI, layout="constrained")
        figure.suptitle(title)
        grid = figure.add_gridspec(2, 2, height_ratios=[3, 1.2])
        loss_axes = figure.add_subplot(grid[0, 0])
        acc_axes = figure.add_subplot(grid[0, 1])
        lr_axes = figure.add_subplot(grid[1, :])
        marker_size = 5 if len(rows) <= 30 else 2.5 if len(rows) <= 200 else 1

        def series(
            axes: Axes, label: str, pick: Callable[[EpochMetricRead], float | None], **style: object
        ) -> bool:
            values = [_finite(pick(row)) for row in rows]
            if all(math.isnan(v) for v in values):
                return False
            axes.plot(epochs, values, marker="o", markersize=marker_size, label=label, **style)  # type: ignore[arg-type]
            return True

        drawn = [
            series(loss_axes, "train", lambda r: r.train_loss, color="tab:blue"),
            series(loss_axes, "val", lambda r: r.val_loss, color="tab:orange"),
        ]
        _finish(loss_axes, "loss", drawn, epochs, best_epoch)

        drawn = [
            series(acc_axes, "train", lambda r: r.train_acc, color="tab:blue"),
            series(acc_axes, "val", lambda r: r.val_acc, color="tab:orange"),
        ]
        _finish(acc_axes, "accuracy", drawn, epochs, best_epoch)
        if any(drawn):
            acc_axes.set_ylim(0, 1.02)
            acc_axes.yaxis.set_major_formatter(PercentFormatter(xmax=1))

        drawn = [series(lr_axes, "lr", lambda r: r.lr, color="tab:green")]
        _finish(lr_axes, "learning rate", drawn, epochs, best_epoch, legend=False)
        positive = [r.lr for r in rows if _finite_value(r.lr) and r.lr > 0]
        if len(positive) >= 2 and max(positive) / min(positive) > LOG_LR_RATIO:
            lr_axes.set_yscale("log")
        lr_axes.set_xlabel("epoch")
        return _render(figure)


def confusion_png(classes: Sequence[str], matrix: Sequence[Sequence[int]], *, title: str) -> bytes:
    """Heat map of a confusion matrix (rows: true class, columns: predicted) with counts in its cells.

    Counts are left out above `MAX_ANNOTATED_CLASSES` classes, where they would not be readable. Classes
    are numbered when `classes` does not hold one name per row.
    """
    n = len(matrix)
    if any(len(line) != n for line in matrix):
        raise ValueError(
            f"confusion matrix must be square, got {n} rows of lengths {[len(x) for x in matrix]}"
        )
    if len(classes) != n:  # names missing or stale: number the classes instead of failing
        classes = [str(i) for i in range(n)]
    with _rendering():
        annotated = n <= MAX_ANNOTATED_CLASSES
        side = min(16.0, max(5.0, 2.5 + (0.4 if annotated else 0.22) * n))  # inches
        figure = Figure(figsize=(side + 1.2, side), dpi=_DPI, layout="constrained")
        figure.suptitle(title)
        axes = figure.add_subplot()
        if n == 0:
            axes.set_axis_off()
            axes.text(0.5, 0.5, "no classes", ha="center", va="center", fontsize=16, color="0.4")
            return _render(figure)

        peak = max(1, max(max(line) for line in matrix))
        image = axes.imshow(
            [list(line) for line in matrix], cmap="Blues", vmin=0, vmax=peak, interpolation="nearest"
        )
        colorbar = figure.colorbar(image, ax=axes, shrink=0.8, label="images")
        colorbar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("predicted")
        axes.set_ylabel("true")

        step = max(1, math.ceil(n / MAX_TICK_LABELS))
        ticks = list(range(0, n, step))
        names = [_short(classes[i]) for i in ticks]
        font_size = 10 if n <= 15 else 8 if n <= 30 else 7
        axes.set_xticks(
            ticks, names, fontsize=font_size, rotation=45 if n > 6 else 0, ha="right" if n > 6 else "center"
        )
        axes.set_yticks(ticks, names, fontsize=font_size)

        if annotated:
            cell_font = 10 if n <= 10 else 8 if n <= 20 else 6
            for i, line in enumerate(matrix):
                for j, count in enumerate(line):
                    axes.text(
                        j,
                        i,
                        str(count),
                        ha="center",
                        va="center",
                        fontsize=cell_font,
                        color="white" if count > peak / 2 else "black",
                    )
        return _render(figure)


def _finish(
    axes: Axes,
    name: str,
    drawn: list[bool],
    epochs: list[int],
    best_epoch: int | None,
    *,
    legend: bool = True,
) -> None:
    axes.set_title(name)
    axes.set_ylabel(name)
    axes.grid(True, alpha=0.3)
    first, last = min(epochs), max(epochs)
    if last - first < 12:  # MaxNLocator falls back to fractions when a span holds too few integers
        axes.set_xticks(range(first, last + 1))
    else:
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlim(first - 0.5, last + 0.5)
    if best_epoch is not None and first <= best_epoch <= last:
        axes.axvline(best_epoch, color="0.5", linestyle=":", linewidth=1, label=f"best (epoch {best_epoch})")
    if not any(drawn):
        axes.text(0.5, 0.5, "no values", ha="center", va="center", transform=axes.transAxes, color="0.4")
    elif legend:
        axes.legend(loc="best")


def _finite_value(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _finite(value: float | None) -> float:
    """NaN (a gap in the line) for a missing or infinite value."""
    return value if value is not None and math.isfinite(value) else math.nan


def _short(name: str, limit: int = 24) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _render(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()
