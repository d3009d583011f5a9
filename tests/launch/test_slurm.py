"""The Slurm scripts on a real single-node cluster (slurm-wlm + munge, started and stopped by the test).

Needs root and `apt-get install -y slurm-wlm munge`; skips with the reason otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scaling.training.checkpoint import list_checkpoints
from scaling.training.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "launch" / "local_cluster.sh"
pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_scripts_parse_and_defer_the_machine_rank_to_each_node():
    for script in ("slurm_single_node.sbatch", "slurm_multi_node.sbatch"):
        subprocess.run(["bash", "-n", str(ROOT / "launch" / script)], check=True)
    multi = (ROOT / "launch" / "slurm_multi_node.sbatch").read_text()
    # escaped: expands inside each srun task (0, 1, ...), not once on the batch host
    assert "--machine_rank \\$SLURM_PROCID" in multi
    assert "scontrol show hostnames" in multi and "--ntasks-per-node=1" in multi


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = [exe for exe in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol") if shutil.which(exe) is None]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing): apt-get install -y slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("starting slurmd needs root")
    state = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", str(HARNESS), "start", str(state)], capture_output=True, text=True, timeout=120)
    if started.returncode != 0:
        subprocess.run(["bash", str(HARNESS), "stop", str(state)], timeout=60)
        pytest.skip(f"the local Slurm cluster did not start: {started.stderr.strip()[-500:]}")
    yield {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}
    subprocess.run(["bash", str(HARNESS), "stop", str(state)], timeout=60)


def test_single_node_script_runs_finetune_on_two_cpu_processes(cluster, tmp_path):
    run_dir, steps = tmp_path / "run", 4
    env = {**cluster, "ACCELERATE_CONFIG": "accelerate_configs/cpu.yaml", "PROCESSES_PER_NODE": "2",
           "REPO_DIR": str(ROOT), "VENV": sys.prefix, "MAIN_PORT": "29611"}
    submitted = subprocess.run(
        ["sbatch", "--wait", "--parsable", "--output", str(tmp_path / "job.out"), "--time=00:15:00",
         str(ROOT / "launch" / "slurm_single_node.sbatch"), "recipes/finetune.py",
         "--config", "recipes/configs/biomedgpt/test_finetune.yaml", f"train.output_dir={run_dir}",
         f"data.cache_dir={tmp_path / 'cache'}", f"train.max_steps={steps}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert submitted.returncode == 0, f"{submitted.stderr}\n{log[-4000:]}"
    job_id = submitted.stdout.strip().split(";")[0]
    info = subprocess.run(["scontrol", "show", "job", job_id], env=cluster, capture_output=True, text=True).stdout
    assert re.search(r"JobState=COMPLETED", info) and "ExitCode=0:0" in info, info
    assert "2 processes" in log
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, steps + 1))
    assert list_checkpoints(run_dir)[-1].name == f"step_{steps:08d}"
    assert (run_dir / "export" / "model.safetensors").is_file()
