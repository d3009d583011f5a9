"""What a run reports while it trains: a JSONL step log, a rich progress bar, a loss-curve PNG at the end.

`metrics.jsonl` holds one line per completed optimizer step (`{"step": 12, "loss": ..., "lr": ..., ...}`). On resume
the lines after the checkpoint's step are dropped first, so the file always describes the trajectory the weights
actually followed: every step exactly once.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from accelerate.tracking import GeneralTracker
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from scaling.logging import console

METRICS_FILE = "metrics.jsonl"


class MetricsLog(GeneralTracker):
    """Accelerate tracker writing one JSON object per `accelerator.log` call to `run_dir/metrics.jsonl` (rank 0)."""

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, run_dir: str | os.PathLike):
        super().__init__()
        self.path = Path(run_dir) / METRICS_FILE

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        """The resolved config is saved as config.yaml by the recipe; nothing to add here."""

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        """Append one line and flush it to disk, so a killed run loses no completed step."""
        row = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def truncate_metrics(run_dir: str | os.PathLike, step: int) -> int:
    """Drop step lines after `step` (the steps a resumed run will redo); return how many were dropped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return 0
    rows = read_metrics(run_dir)
    kept = [r for r in rows if r.get("step") is None or r["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)
    return len(rows) - len(kept)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """All complete lines of the step log (a torn last line from a kill is ignored)."""
    path = Path(run_dir) / METRICS_FILE
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _plain(value):
    """Tensors and numpy scalars to Python numbers for JSON."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class TrainingProgress:
    """Rich progress bar (rank 0 only): step, loss, lr, samples/s and ETA."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]} samples/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, disable=not enabled, transient=False,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step,
                                           loss="-", lr="-", speed="-")
        self._last = time.perf_counter()

    def __enter__(self) -> TrainingProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def update(self, step: int, loss: float, lr: float, samples: int) -> float:
        """Advance to `step`; return samples/s since the previous update."""
        now = time.perf_counter()
        speed = samples / max(now - self._last, 1e-9)
        self._last = now
        self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.2e}", speed=f"{speed:.1f}")
        return speed


def plot_loss(run_dir: str | os.PathLike, out_name: str = "loss.png") -> Path | None:
    """Loss (and learning rate) against step from metrics.jsonl, written as a PNG (matplotlib Agg, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(run_dir) if isinstance(r.get("loss"), (int, float))]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="tab:blue", label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    if all("lr" in r for r in rows):
        lr_ax = ax.twinx()
        lr_ax.plot([r["step"] for r in rows], [r["lr"] for r in rows], color="tab:orange", alpha=0.6, label="lr")
        lr_ax.set_ylabel("learning rate")
    ax.set_title(Path(run_dir).name)
    fig.tight_layout()
    path = Path(run_dir) / out_name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def finish_trackers(accelerator) -> None:
    """Close this run's trackers but keep the process group, unlike `end_training` (a sweep trains several runs in
    one launch, and DeepSpeed cannot join a second process group)."""
    for tracker in accelerator.trackers:
        tracker.finish()
