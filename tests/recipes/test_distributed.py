"""recipes/finetune.py through a real `accelerate launch` with 2 CPU processes: DDP, ZeRO-2 (exact resume after a
SIGKILL), ZeRO-3 (sharded parameters, export parity) and two machines on 127.0.0.1."""

from __future__ import annotations

import random
import re
import signal
import sys

import pytest
import torch
from recipe_runs import (
    ACCELERATE,
    ROOT,
    kill_group,
    launch_args,
    logged_steps,
    losses,
    max_abs_diff,
    recipe_args,
    run,
    start,
    wait_for_step,
    weights,
)

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


def test_zero2_sigkill_at_a_random_step_then_resume_matches_the_uninterrupted_run(tmp_path, cache):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    run(launch_args("zero2.yaml", 2, free_port()) + recipe_args(reference, cache, *SHORT))
    kill_at = random.Random().randint(2, STEPS - 1)
    print(f"killing at step {kill_at}")
    proc = start(launch_args("zero2.yaml", 2, free_port()) + recipe_args(interrupted, cache, *SHORT),
                 log=tmp_path / "first.log")
    wait_for_step(interrupted, kill_at, proc)
    assert kill_group(proc) == -signal.SIGKILL
    run(launch_args("zero2.yaml", 2, free_port()) + recipe_args(interrupted, cache, *SHORT, "train.resume=auto"))
    assert logged_steps(interrupted) == list(range(1, STEPS + 1))
    assert losses(interrupted) == losses(reference)
    assert max_abs_diff(weights(interrupted, STEPS), weights(reference, STEPS)) <= 1e-6


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
