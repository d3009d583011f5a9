"""recipes/finetune.py through a real `accelerate launch` with 2 CPU processes: DDP, ZeRO-2 (exact resume after a
SIGKILL of every rank; a non-finite micro-batch drops its whole accumulation window; a planted pickle payload is
refused), ZeRO-3 (sharded parameters, export parity), workers that stop with a killed launcher, and two machines on
127.0.0.1."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sys

import pytest
import torch
from recipe_runs import (
    ACCELERATE,
    ROOT,
    injected,
    kill_every_rank,
    launch_args,
    logged_steps,
    losses,
    max_abs_diff,
    recipe_args,
    recipe_workers,
    run,
    says,
    start,
    wait_for_step,
    wait_gone,
    weights,
)

from scaling.training.checkpoint import COMPLETE, checkpoint_dir, list_checkpoints, write_manifest
from scaling.training.tracking import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
STEPS = 6
SHORT = (f"train.max_steps={STEPS}",)
SHARE = re.compile(r"rank\s+(\d)\s+holds\s+(\d+)\s+of\s+(\d+)\s+parameter")  # rich may wrap lines


def free_port() -> int:
    return random.Random().randint(20000, 40000)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


def assert_trained(run_dir, steps=STEPS):
    assert logged_steps(run_dir) == list(range(1, steps + 1))
    curve = losses(run_dir)
    assert sum(curve[-2:]) / 2 < sum(curve[:2]) / 2, curve


def shares(output: str) -> dict[int, tuple[int, int]]:
    return {int(r): (int(local), int(total)) for r, local, total in SHARE.findall(output)}


def test_ddp_two_cpu_processes(tmp_path, cache):
    done = run(launch_args("cpu.yaml", 2, free_port()) + recipe_args(tmp_path, cache, *SHORT))
    assert_trained(tmp_path)
    held = shares(done.stdout + done.stderr)
    assert held.keys() == {0, 1} and all(local == total for local, total in held.values())


@pytest.fixture(scope="module")
def zero3(tmp_path_factory, cache):
    run_dir = tmp_path_factory.mktemp("zero3")
    done = run(launch_args("zero3.yaml", 2, free_port()) + recipe_args(run_dir, cache, *SHORT))
    return run_dir, done.stdout + done.stderr


def test_zero3_trains_with_each_rank_holding_half_of_the_parameters(zero3):
    run_dir, output = zero3
    assert_trained(run_dir)
    held = shares(output)
    assert held.keys() == {0, 1}, output[-3000:]
    total = held[0][1]
    for local, _ in held.values():
        assert 0.4 * total <= local <= 0.6 * total, held  # partitioned: ~1/2 each (+ padding of the flat shards)


def test_zero3_export_loads_in_one_process_with_the_logits_of_the_gathered_weights(zero3, tmp_path):
    run_dir, _ = zero3
    offline = tmp_path / "offline"
    run([sys.executable, "-m", "scaling.cli", "export", str(run_dir), "--out", str(offline)])
    from scaling.models.biomedgpt import BiomedGPTForConditionalGeneration

    gathered = BiomedGPTForConditionalGeneration.from_pretrained(run_dir / "export").eval()  # written in the run
    exported = BiomedGPTForConditionalGeneration.from_pretrained(offline).eval()  # from the ZeRO-3 shards
    assert (offline / "tokenizer.json").is_file()
    g = torch.Generator().manual_seed(0)
    size = gathered.config.image_size
    inputs = {"input_ids": torch.randint(4, 400, (2, 12), generator=g), "attention_mask": torch.ones(2, 12, dtype=torch.long),
              "pixel_values": torch.randn(2, 3, size, size, generator=g), "patch_masks": torch.tensor([True, False]),
              "decoder_input_ids": torch.randint(4, 400, (2, 6), generator=g)}
    with torch.no_grad():
        expected, actual = gathered(**inputs).logits, exported(**inputs).logits
    assert (expected - actual).abs().max().item() <= 1e-5


@pytest.fixture(scope="module")
def zero2_reference(tmp_path_factory, cache):
    run_dir = tmp_path_factory.mktemp("zero2")
    run(launch_args("zero2.yaml", 2, free_port()) + recipe_args(run_dir, cache, *SHORT))
    return run_dir


def test_zero2_sigkill_of_every_rank_at_a_random_step_then_resume_matches_the_uninterrupted_run(
        tmp_path, cache, zero2_reference):
    kill_at = random.Random().randint(2, STEPS - 1)
    print(f"killing at step {kill_at}")
    slow = injected("step_seconds=0.5")  # the kill must land before the run ends, however fast the host
    proc = start(launch_args("zero2.yaml", 2, free_port()) + slow + recipe_args(tmp_path, cache, *SHORT),
                 log=tmp_path / "first.log")
    wait_for_step(tmp_path, kill_at, proc)
    kill_every_rank(proc, ranks=2)  # launcher and both workers: nothing is left to finish the run
    assert max(logged_steps(tmp_path)) < STEPS and not (tmp_path / "export").exists()
    assert checkpoint_dir(tmp_path, STEPS) not in list_checkpoints(tmp_path)
    run(launch_args("zero2.yaml", 2, free_port()) + recipe_args(tmp_path, cache, *SHORT, "train.resume=auto"))
    assert logged_steps(tmp_path) == list(range(1, STEPS + 1))
    assert losses(tmp_path) == losses(zero2_reference)
    assert max_abs_diff(weights(tmp_path, STEPS), weights(zero2_reference, STEPS)) <= 1e-6


def test_workers_of_a_killed_launcher_checkpoint_and_stop(tmp_path, cache):
    proc = start(launch_args("cpu.yaml", 2, free_port()) + recipe_args(tmp_path, cache, "train.max_steps=400",
                                                                        "train.save_every=1000"),
                 log=tmp_path / "run.log")
    wait_for_step(tmp_path, 2, proc)
    workers = recipe_workers(proc.pid)
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)  # the launcher only, as an OOM killer or a lost node agent would
    proc.wait(timeout=60)
    wait_gone(workers, timeout=180)  # orphans would train all 400 steps
    [final] = list_checkpoints(tmp_path)
    stopped_at = json.loads((final / COMPLETE).read_text())["step"]
    assert 2 <= stopped_at < 400 and logged_steps(tmp_path) == list(range(1, stopped_at + 1))
    assert "SIGTERM received" in (tmp_path / "train.log").read_text()


def parameters(state: dict) -> dict:
    """Trained parameters only: BatchNorm statistics follow every forward pass, a discarded one too."""
    return {k: v for k, v in state.items() if "running_" not in k and "num_batches_tracked" not in k}


def test_zero2_a_nonfinite_micro_batch_drops_its_whole_accumulation_window(tmp_path, cache):
    steps, settings = 3, ("train.max_steps=3", "train.gradient_accumulation_steps=2", "model.dropout=0")
    reference, poisoned = tmp_path / "reference", tmp_path / "poisoned"
    # reference: the first window's two micro-batches drawn and never trained on
    run(launch_args("zero2.yaml", 2, free_port()) + injected("skip_batches=2") + recipe_args(reference, cache, *settings))
    # poisoned: the first window's second micro-batch has a NaN loss; its first, good one must not reach a step
    run(launch_args("zero2.yaml", 2, free_port()) + injected("nonfinite=2:1") + recipe_args(poisoned, cache, *settings))
    assert [r["nonfinite_skipped"] for r in read_metrics(poisoned)] == [1, 1, 1]
    assert losses(poisoned) == losses(reference)
    assert max_abs_diff(parameters(weights(poisoned, steps)), parameters(weights(reference, steps))) <= 1e-6


class CreatesFileWhenUnpickled:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant(checkpoint, shard: str, marker) -> None:
    """Add a payload to one shard and re-sign the manifest, as an attacker with write access would."""
    state = torch.load(checkpoint / "pytorch_model" / shard, weights_only=False)
    torch.save({**state, "payload": CreatesFileWhenUnpickled(marker)}, checkpoint / "pytorch_model" / shard)
    manifest = json.loads((checkpoint / COMPLETE).read_text())
    (checkpoint / COMPLETE).unlink()
    write_manifest(checkpoint, manifest["step"], 2, checkpoint.parent / manifest["parent"]["name"])


def test_a_payload_planted_in_a_zero2_shard_is_refused_by_export_and_resume(tmp_path, cache, zero2_reference):
    marker = tmp_path / "created_by_pickle"
    for shard in ("mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        run_dir = tmp_path / shard
        shutil.copytree(zero2_reference, run_dir)
        plant(checkpoint_dir(run_dir, STEPS), shard, marker)
        export = run([sys.executable, "-m", "scaling.cli", "export", str(run_dir), "--out", str(tmp_path / "out")],
                     expect=1)
        refusal = f"Refused to load {checkpoint_dir(run_dir, STEPS) / 'pytorch_model' / shard}"
        assert says(export.stderr, refusal), export.stderr[-2000:]
    resumed = run(launch_args("zero2.yaml", 2, free_port()) + recipe_args(run_dir, cache, "train.max_steps=8",
                                                                          "train.resume=auto"), expect=None)
    assert resumed.returncode != 0 and says(resumed.stderr, refusal), resumed.stderr[-3000:]
    assert not marker.exists()
    torch.load(checkpoint_dir(run_dir, STEPS) / "pytorch_model" / shard, weights_only=False)
    assert marker.exists()  # the payload was real


def test_two_machines_on_localhost(tmp_path, cache):
    port, steps = free_port(), 4
    machines = [ACCELERATE + ["--config_file", str(ROOT / "accelerate_configs" / "cpu.yaml"), "--num_machines", "2",
                              "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                              "--main_process_port", str(port)]
                + recipe_args(tmp_path, cache, f"train.max_steps={steps}") for rank in (0, 1)]
    procs = [start(cmd, log=tmp_path / f"machine{rank}.log") for rank, cmd in enumerate(machines)]
    status = [p.wait(timeout=600) for p in procs]
    assert status == [0, 0], [(tmp_path / f"machine{r}.log").read_text()[-3000:] for r in (0, 1)]
    assert logged_steps(tmp_path) == list(range(1, steps + 1))
    held = shares((tmp_path / "machine0.log").read_text() + (tmp_path / "machine1.log").read_text())
    assert held.keys() == {0, 1}
