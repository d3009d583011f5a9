"""Helpers for the recipe tests: run a recipe (plain python or `accelerate launch`), watch its step log, kill it,
read its checkpoints. The recipes always run as real subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from scaling.training.checkpoint import checkpoint_dir, read_checkpoint_weights
from scaling.training.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[2]
TEST_CONFIG = ROOT / "recipes" / "configs" / "biomedgpt" / "test_finetune.yaml"
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
INJECT_FAULT = ROOT / "tests" / "recipes" / "inject_fault.py"


def injected(*faults: str) -> list[str]:
    """Put before recipe_args(...): the recipe runs with these faults injected (see inject_fault.py)."""
    return [str(INJECT_FAULT), *faults]


def recipe_args(run_dir: Path, cache_dir: Path, *overrides: str, recipe: str = "finetune.py",
                config: Path | None = TEST_CONFIG) -> list[str]:
    """The recipe script, its config and the overrides every test run shares."""
    args = [str(ROOT / "recipes" / recipe)]
    if config is not None:
        args += ["--config", str(config)]
    return args + [f"train.output_dir={run_dir}", f"data.cache_dir={cache_dir}", *overrides]


def launch_args(accelerate_config: str, num_processes: int = 2, port: int = 29500, *extra: str) -> list[str]:
    return [*ACCELERATE, "--config_file", str(ROOT / "accelerate_configs" / accelerate_config),
            "--num_processes", str(num_processes), "--main_process_port", str(port), *extra]


def run(cmd: list[str], env: dict | None = None, timeout: int = 600, expect: int | None = 0) -> subprocess.CompletedProcess:
    """Run to completion from the repository root; on an unexpected exit status show the output."""
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if expect is not None and done.returncode != expect:
        raise AssertionError(f"exit status {done.returncode} (expected {expect}) for {' '.join(cmd)}\n"
                             f"--- stdout ---\n{done.stdout[-4000:]}\n--- stderr ---\n{done.stderr[-8000:]}")
    return done


def start(cmd: list[str], env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    """Start in its own process group, so a kill reaches the launcher and every worker."""
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Block until the step log shows `step` (the run is still going)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r.get("step", 0) >= step for r in read_metrics(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (status {proc.returncode}) before step {step}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def children() -> dict[int, list[int]]:
    """Every running process's children, from /proc."""
    found: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except OSError:  # exited meanwhile
            continue
        found.setdefault(parent, []).append(int(stat.parent.name))
    return found


def process_tree(pid: int) -> list[int]:
    """`pid` and every process it started, directly or not (torchrun's workers run in their own process groups)."""
    below, tree, todo = children(), [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += below.get(tree[-1], [])
    return tree


def alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting for its parent does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while any(alive(pid) for pid in pids):
        if time.time() > deadline:
            raise AssertionError(f"still running after {timeout}s: {[pid for pid in pids if alive(pid)]}")
        time.sleep(0.05)


def recipe_workers(pid: int) -> list[int]:
    """The processes under `pid` (itself included) that train: they run the recipe and start no process that does
    (a launcher's command line names the recipe too)."""
    def runs_recipe(p: int) -> bool:
        try:
            return "finetune.py" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")
        except OSError:
            return False

    tree = process_tree(pid)
    return [p for p in tree if runs_recipe(p) and not any(runs_recipe(c) for c in process_tree(p)[1:])]


def kill_every_rank(proc: subprocess.Popen, ranks: int) -> list[int]:
    """SIGKILL the launcher and every process it started; return the workers, checked dead."""
    tree = process_tree(proc.pid)
    workers = recipe_workers(proc.pid)
    assert len(workers) == ranks, f"expected {ranks} workers under the launcher, found {workers} in {tree}"
    for pid in tree:
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=120)
    wait_gone(tree)
    return workers


def says(output: str, text: str) -> bool:
    """Whether `output` contains `text`, ignoring whitespace (rich wraps long log lines, even inside paths)."""
    return "".join(text.split()) in "".join(output.split())


def logged_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir)]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return read_checkpoint_weights(checkpoint_dir(run_dir, step))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)
