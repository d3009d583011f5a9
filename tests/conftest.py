"""Fixtures shared across the test tiers."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


class Tmpfs:
    """A small tmpfs: writes beyond its size fail with a real ENOSPC, and `resize` frees (or takes) space."""

    def __init__(self, path: Path):
        self.path = path

    def resize(self, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Tmpfs]:
    """A 64 MiB tmpfs under tmp_path (needs root and mount; skipped elsewhere)."""
    path = tmp_path / "disk"
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", f"scaling-{uuid.uuid4().hex[:8]}", str(path)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); needs root")
    yield Tmpfs(path)
    subprocess.run(["umount", "-l", str(path)], check=False)
