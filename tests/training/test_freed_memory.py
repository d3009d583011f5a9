"""keep_freed_memory (called by build_accelerator on CPU hosts): a large tensor freed and allocated again reuses the
process's memory instead of mapping and page-faulting fresh pages. Each case runs in its own interpreter, since the
setting is process-wide. Measured as a training loop sees it: after a few warm-up steps (the heap settles within two
cycles: a small allocation may take the start of the first freed block), over several more."""

from __future__ import annotations

import os
import subprocess
import sys

PAGES_OF_64_MIB = (64 << 20) // 4096

WARM_UP, MEASURED = 4, 8
PROBE = f"""
import resource, sys, torch
from scaling.training.distributed import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
def step():
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)  # allocated, touched, freed
for _ in range({WARM_UP}):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({MEASURED}):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // {MEASURED})
"""


def page_faults_per_allocation(mode: str, env: dict | None = None) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


def test_a_freed_large_tensor_is_reused_without_new_page_faults():
    assert page_faults_per_allocation("default") >= PAGES_OF_64_MIB  # glibc maps it afresh by default
    assert page_faults_per_allocation("keep") < PAGES_OF_64_MIB // 10


def test_the_users_own_malloc_tuning_wins():
    # mapping every tensor of 1 MiB or more is what the memory measurements of the scale tests ask for
    assert page_faults_per_allocation("keep", {"MALLOC_MMAP_THRESHOLD_": str(2**20)}) >= PAGES_OF_64_MIB
