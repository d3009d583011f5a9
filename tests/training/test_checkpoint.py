"""Atomic checkpoints: keep-last-K, the completeness manifest, corrupt/partial detection, state round trip."""

import json
import shutil

import pytest
import torch
from accelerate import Accelerator

from scaling.training.checkpoint import (
    COMPLETE,
    TMP_PREFIX,
    CheckpointError,
    checkpoint_dir,
    find_resume,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from scaling.training.ema import EMA


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def _setup(accelerator):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    return accelerator.prepare(model, opt, sched)


def _train_step(model, opt, sched):
    loss = model(torch.randn(3, 4)).pow(2).mean()
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_keeps_the_last_k_complete_checkpoints(tmp_path, accelerator):
    model, opt, sched = _setup(accelerator)
    for step in range(1, 5):
        _train_step(model, opt, sched)
        save_checkpoint(accelerator, tmp_path, step, {"data": {"pos": step}}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    manifest = json.loads((checkpoint_dir(tmp_path, 4) / COMPLETE).read_text())
    assert manifest["step"] == 4 and "model.safetensors" in manifest["files"]


def test_partial_and_corrupt_checkpoints_are_never_picked(tmp_path, accelerator):
    model, opt, sched = _setup(accelerator)
    for step in (1, 2):
        save_checkpoint(accelerator, tmp_path, step, {"data": {}}, keep_last=3)
    # an interrupted save: files but no marker, under the temporary name
    partial = checkpoint_dir(tmp_path, 3).with_name(TMP_PREFIX + "step_00000003")
    shutil.copytree(checkpoint_dir(tmp_path, 2), partial)
    (partial / COMPLETE).unlink()
    assert find_resume(tmp_path, "auto") == checkpoint_dir(tmp_path, 2)
    # the newest one truncated after the fact: auto falls back, an explicit path is refused with the reason
    weights = checkpoint_dir(tmp_path, 2) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert find_resume(tmp_path, "auto") == checkpoint_dir(tmp_path, 1)
    with pytest.raises(CheckpointError, match=r"model.safetensors has 100 bytes.*truncated"):
        verify_checkpoint(checkpoint_dir(tmp_path, 2))
    with pytest.raises(CheckpointError, match="does not exist"):
        find_resume(tmp_path, str(tmp_path / "nope"))
    (checkpoint_dir(tmp_path, 1) / COMPLETE).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        find_resume(tmp_path, str(checkpoint_dir(tmp_path, 1)))


def test_load_restores_weights_optimizer_schedule_rng_and_ema(tmp_path, accelerator):
    model, opt, sched = _setup(accelerator)
    ema = EMA(model, 0.9)
    for _ in range(3):
        _train_step(model, opt, sched)
        ema.update(model)
    save_checkpoint(accelerator, tmp_path, 3, {"data": {"pos": 7}}, keep_last=1, ema=ema)
    expected_next = torch.rand(3)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved_ema = {k: v.clone() for k, v in ema.shadow.items()}
    for _ in range(2):
        _train_step(model, opt, sched)
        ema.update(model)
    state = load_checkpoint(accelerator, checkpoint_dir(tmp_path, 3), ema)
    assert state == {"data": {"pos": 7}, "step": 3}
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(saved_ema[k], v) for k, v in ema.shadow.items())
    assert sched.scheduler.last_epoch == 3
    assert torch.equal(torch.rand(3), expected_next)  # RNG continues exactly where the checkpoint was taken


def test_a_checkpoint_from_another_world_size_is_refused(tmp_path, accelerator):
    model, opt, sched = _setup(accelerator)
    path = save_checkpoint(accelerator, tmp_path, 1, {"data": {}}, keep_last=1)
    manifest = json.loads((path / COMPLETE).read_text())
    (path / COMPLETE).write_text(json.dumps({**manifest, "world_size": 8}))
    with pytest.raises(CheckpointError, match="written by 8 processes"):
        load_checkpoint(accelerator, path)


def test_export_cli_explains_a_run_without_checkpoints(tmp_path, capsys):
    from scaling.cli import main

    assert main(["export", str(tmp_path)]) == 1
    assert "has no complete checkpoint" in capsys.readouterr().err
