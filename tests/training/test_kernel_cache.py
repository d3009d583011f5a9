"""keep_compiled_kernels (called by build_accelerator on CPU hosts): oneDNN keeps the kernels of more matmul shapes
than its default 1,024, so the shapes of a padded batch stream are compiled once, not at every return. Each case runs
in its own interpreter (the capacity is read once per process) and reads oneDNN's own account of every kernel it
creates: a cache hit or a miss."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from scaling.training.distributed import ONEDNN_CACHE

PROBE = """
import sys, torch
from scaling.training.distributed import keep_compiled_kernels
mode, shapes = sys.argv[1], int(sys.argv[2])
if mode == "keep":
    keep_compiled_kernels()
weight = torch.randn(64, 64, dtype=torch.bfloat16)
def matmuls(rows):
    for n in rows:
        torch.mm(torch.randn(n, 64, dtype=torch.bfloat16), weight)
with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON_CREATION):
    matmuls(range(16, 16 + shapes))
    print("RETURN", flush=True)
    matmuls(range(16, 26))  # the first ten shapes again
"""


def kernels_found_again(mode: str, shapes: int, env: dict | None = None) -> tuple[int, int]:
    """(cache hits, misses) when the first ten of `shapes` matmul shapes come back."""
    inherited = {k: v for k, v in os.environ.items() if k != ONEDNN_CACHE}  # an in-process Accelerator sets it
    done = subprocess.run([sys.executable, "-c", PROBE, mode, str(shapes)], capture_output=True, text=True,
                          timeout=300, env={**inherited, **(env or {})})
    assert done.returncode == 0, done.stderr[-2000:]
    if "create:cache_" not in done.stdout:
        pytest.skip("bf16 matmuls do not go through oneDNN on this CPU")
    returned = done.stdout.split("RETURN", 1)[1]
    return returned.count("create:cache_hit"), returned.count("create:cache_miss")


def test_kernels_of_1100_shapes_are_all_kept_where_the_default_cache_evicts_them():
    assert kernels_found_again("default", 1100) == (0, 10)  # oneDNN's 1,024 entries: compiled again
    assert kernels_found_again("keep", 1100) == (10, 0)


def test_the_users_own_capacity_wins():
    assert kernels_found_again("keep", 20, env={ONEDNN_CACHE: "8"}) == (0, 10)
