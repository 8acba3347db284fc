"""Terminal output for the client commands (rich): job tables, epoch rows, a live progress bar."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table

STATUS_STYLE = {
    "queued": "yellow",
    "running": "cyan",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "magenta",
}

EPOCH_COLUMNS = [
    ("epoch", "epoch", "{}"),
    ("train_loss", "train loss", "{:.4f}"),
    ("train_acc", "train acc", "{:.2%}"),
    ("val_loss", "val loss", "{:.4f}"),
    ("val_acc", "val acc", "{:.2%}"),
    ("val_f1", "val F1", "{:.3f}"),
    ("lr", "lr", "{:.2e}"),
    ("seconds", "s", "{:.1f}"),
    ("images_per_second", "img/s", "{:.0f}"),
]


def fmt(value: Any, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def status_text(status: str) -> str:
    return f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]"


def epoch_table(rows: list[dict[str, Any]], *, title: str | None = None, best: int | None = None) -> Table:
    table = Table(title=title, header_style="bold")
    for _, header, _ in EPOCH_COLUMNS:
        table.add_column(header, justify="right")
    for row in rows:
        style = "bold green" if best is not None and row["epoch"] == best else None
        table.add_row(*(fmt(row.get(key), pattern) for key, _, pattern in EPOCH_COLUMNS), style=style)
    return table


def epoch_line(row: dict[str, Any], epochs: int | None) -> str:
    of = f"/{epochs}" if epochs else ""
    return (
        f"epoch {row['epoch']}{of}: train loss {fmt(row.get('train_loss'), '{:.4f}')} "
        f"acc {fmt(row.get('train_acc'), '{:.2%}')} | val loss {fmt(row.get('val_loss'), '{:.4f}')} "
        f"acc {fmt(row.get('val_acc'), '{:.2%}')} | lr {fmt(row.get('lr'), '{:.2e}')} | "
        f"{fmt(row.get('seconds'), '{:.1f}')} s"
    )


def progress_cell(job: dict[str, Any]) -> str:
    progress = job.get("progress") or {}
    fraction = progress.get("fraction")
    epochs = progress.get("epochs") or job.get("spec", {}).get("epochs")
    if job["status"] == "succeeded":
        fraction = 1.0 if fraction is None else fraction
    if fraction is None:
        return f"{progress.get('phase', job['status'])}"
    width = 12
    filled = round(fraction * width)
    bar = "█" * filled + "░" * (width - filled)
    epoch = progress.get("epoch")
    where = f" epoch {epoch}/{epochs}" if epoch else ""
    return f"{bar} {fraction:4.0%}{where}"


def jobs_table(jobs: list[dict[str, Any]]) -> Table:
    table = Table(header_style="bold")
    for header in ("id", "status", "model", "dataset", "progress", "best", "created"):
        table.add_column(header, justify="right" if header == "id" else "left")
    for job in jobs:
        best = job.get("best")
        table.add_row(
            str(job["id"]),
            status_text(job["status"]),
            str(job["spec"].get("model")),
            str(job["dataset_id"]),
            progress_cell(job),
            f"{best['metric']} {best['value']:.4f} (epoch {best['epoch']})" if best else "-",
            str(job["created_at"])[:19].replace("T", " "),
        )
    return table


def scores_table(prediction: dict[str, Any], top: int) -> Table:
    table = Table(header_style="bold")
    table.add_column("class")
    table.add_column("probability", justify="right")
    table.add_column("")
    ranked = sorted(prediction["scores"].items(), key=lambda item: item[1], reverse=True)[:top]
    for name, score in ranked:
        table.add_row(name, f"{score:.2%}", "█" * round(score * 30))
    return table


class Follower:
    """Turns a job's events into a progress bar (epoch, batch, ETA, img/s) with epoch rows above it."""

    def __init__(self, console: Console, *, show_logs: bool = False) -> None:
        self.console = console
        self.show_logs = show_logs
        self.rows: list[dict[str, Any]] = []
        self.job: dict[str, Any] = {}
        self.evaluation: dict[str, Any] | None = None
        self.end: dict[str, Any] | None = None
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[detail]}"),
            console=console,
            transient=True,
        )
        self.task = self.progress.add_task("waiting", total=1.0, detail="")

    def __enter__(self) -> Follower:
        self.progress.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.progress.stop()

    @property
    def epochs(self) -> int | None:
        spec = self.job.get("spec") or {}
        return (self.job.get("progress") or {}).get("epochs") or spec.get("epochs")

    def handle(self, name: str, data: Any) -> None:
        if name == "status":
            previous = self.job.get("status")
            self.job = data
            if data["status"] != previous:
                self.console.print(f"job {data['id']}: {status_text(data['status'])}")
            self._show_progress(data.get("progress") or {}, data["status"])
        elif name == "progress":
            self._show_progress(data, data.get("status", self.job.get("status", "")))
        elif name == "epoch":
            self.rows.append(data)
            self.console.print(epoch_line(data, self.epochs))
        elif name == "log" and self.show_logs:
            self.console.print(f"[dim]{data['created_at'][11:19]} {data['level']} {data['message']}[/]")
        elif name == "evaluation":
            self.evaluation = data
            accuracy = fmt(data.get("accuracy"), "{:.2%}")
            self.console.print(
                f"test evaluation (best epoch {data['epoch']}, {data['num_samples']} images): "
                f"accuracy {accuracy}, macro F1 {fmt(data.get('macro_f1'), '{:.3f}')}"
            )
        elif name == "end":
            self.end = data

    def _show_progress(self, progress: dict[str, Any], status: str) -> None:
        phase = progress.get("phase", status)
        epoch, epochs = progress.get("epoch"), progress.get("epochs") or self.epochs
        description = f"{phase} epoch {epoch}/{epochs}" if epoch else str(phase)
        details = []
        if progress.get("batches"):
            details.append(f"batch {progress.get('batch', 0)}/{progress['batches']}")
        if phase == "caching" and progress.get("total"):
            details.append(f"{progress.get('done', 0)}/{progress['total']} images")
        if progress.get("eta_seconds") is not None:
            details.append(f"ETA {duration(progress['eta_seconds'])}")
        if progress.get("images_per_second"):
            details.append(f"{progress['images_per_second']:.0f} img/s")
        self.progress.update(
            self.task,
            description=description,
            completed=float(progress.get("fraction") or 0.0),
            detail="  ".join(details),
        )
