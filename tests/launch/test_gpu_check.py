"""launch/gpu_check.sh in its CPU dry run: every step (launch check, QLoRA under ZeRO-2, benchmark, memory probe
beside the planner, the offloaded optimizer step) runs with tiny shapes and lands in the summary. On a GPU host the
same script runs the real shapes; CI has no GPU, so this is as far as it can be tested here."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.heavy]


def test_gpu_check_dry_run_runs_every_step_and_writes_the_summary(tmp_path):
    out = tmp_path / "gpu_check"
    done = subprocess.run(["bash", str(ROOT / "launch" / "gpu_check.sh"), str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=3600, env={**os.environ, "DRY_RUN": "1"})
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == dict.fromkeys(
        ["benchmark_mini", "cpu_adam", "launch_check", "memory_test_finetune", "qlora"], 0)
    assert summary["launch_check"]["tests"] == 1 and summary["launch_check"]["failures"] == 0
    assert summary["benchmark_mini"]["mfu_of_matmul_peak"] > 0
    assert [row["file"] for row in summary["memory"]] == ["memory_rank0.json", "memory_rank1.json"]
    assert all(row["measured"] > 0 and row["planned"] > 0 for row in summary["memory"])
    assert summary["cpu_adam"]["fused_over_cpu_adam"] > 0
    assert "| test_finetune | 0 |" in (out / "summary.md").read_text()
