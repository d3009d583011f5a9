"""Rank-zero logging: rich on the console, a plain-text `train.log` in the run directory.

Only the main process prints (global rank 0, read from RANK or else LOCAL_RANK); a message that every rank should
print passes `extra={"all_ranks": True}` to the log call.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler

ROOT = "scaling"
console = Console(stderr=True)


def is_main_process() -> bool:
    """True on global rank 0 (also when no launcher set RANK)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


class _RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return is_main_process() or getattr(record, "all_ranks", False)


def _root() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not root.handlers:
        handler = RichHandler(console=console, show_path=False, rich_tracebacks=False, markup=False)
        handler.addFilter(_RankZeroFilter())
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return root


def get_logger(name: str) -> logging.Logger:
    """A child of the `scaling` logger; messages reach the console on rank 0 only."""
    _root()
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")


def setup_logging(run_dir: str | os.PathLike | None = None, level: str = "info") -> logging.Logger:
    """Set the level and, on rank 0, add a plain log file `run_dir/train.log` (idempotent)."""
    root = _root()
    root.setLevel(level.upper())
    if run_dir is not None and is_main_process():
        path = Path(run_dir) / "train.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve()
                   for h in root.handlers):
            handler = logging.FileHandler(path)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            root.addHandler(handler)
    return root
