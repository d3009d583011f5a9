"""Atomic checkpoints: keep-last-K, the manifest (sizes, checksums, lineage), corrupt/partial detection, fallback
along the live line, foreign directories, a full disk, and the state round trip."""

import json
import os
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
    prune_checkpoints,
    replace_atomically,
    resume_candidates,
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


def _save_line(accelerator, run_dir, steps, parent=None, keep_last=10):
    """Checkpoints at `steps`, each the parent of the next, as the training loop writes them."""
    for step in steps:
        parent = save_checkpoint(accelerator, run_dir, step, {"data": {"pos": step}}, keep_last, parent=parent)
    return parent


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_keeps_the_last_k_complete_checkpoints(tmp_path, accelerator):
    model, opt, sched = _setup(accelerator)
    parent = None
    for step in range(1, 5):
        _train_step(model, opt, sched)
        parent = save_checkpoint(accelerator, tmp_path, step, {"data": {"pos": step}}, keep_last=2, parent=parent)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    manifest = json.loads((checkpoint_dir(tmp_path, 4) / COMPLETE).read_text())
    assert manifest["step"] == 4 and manifest["serial"] == 4
    assert manifest["parent"] == {"name": "step_00000003", "serial": 3}
    assert set(manifest["files"]["model.safetensors"]) == {"bytes", "sha256"}


def test_partial_and_corrupt_checkpoints_are_never_picked(tmp_path, accelerator):
    _setup(accelerator)
    _save_line(accelerator, tmp_path, (1, 2))
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
    # nothing usable left: auto stops instead of silently starting again at step 0
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        find_resume(tmp_path, "auto")


def test_same_size_corruption_is_caught_by_the_checksum_and_auto_falls_back_with_a_warning(tmp_path, accelerator,
                                                                                           caplog):
    _setup(accelerator)
    _save_line(accelerator, tmp_path, (2, 4))
    weights = checkpoint_dir(tmp_path, 4) / "model.safetensors"
    size = weights.stat().st_size
    _flip_a_byte(weights)
    assert weights.stat().st_size == size  # the size check alone would pass it
    with pytest.raises(CheckpointError, match=r"SHA-256 of model.safetensors differs"):
        verify_checkpoint(checkpoint_dir(tmp_path, 4))
    with caplog.at_level("WARNING", logger="scaling"):
        assert find_resume(tmp_path, "auto") == checkpoint_dir(tmp_path, 2)
    assert "falling back to the previous checkpoint" in caplog.text
    # a damaged manifest: the checkpoint is skipped, its parent taken
    _save_line(accelerator, tmp_path, (6,), parent=checkpoint_dir(tmp_path, 4))
    (checkpoint_dir(tmp_path, 6) / COMPLETE).write_text('{"step": 6, "fil')
    assert find_resume(tmp_path, "auto") == checkpoint_dir(tmp_path, 2)


def test_auto_follows_the_live_line_not_an_abandoned_higher_step(tmp_path, accelerator):
    _setup(accelerator)
    _save_line(accelerator, tmp_path, (2, 4, 6, 8))
    # a manual resume from step 4, then a kill after the new line saved step 6 (replacing the old step 6)
    _save_line(accelerator, tmp_path, (6,), parent=checkpoint_dir(tmp_path, 4))
    assert checkpoint_dir(tmp_path, 8).is_dir()  # the abandoned trajectory's higher step is still there
    assert find_resume(tmp_path, "auto") == checkpoint_dir(tmp_path, 6)
    assert resume_candidates(tmp_path, "auto") == [checkpoint_dir(tmp_path, s) for s in (6, 4, 2)]
    # pruning keeps the most recently written checkpoints, so the abandoned step 8 ages out
    _save_line(accelerator, tmp_path, (7, 8), parent=checkpoint_dir(tmp_path, 6), keep_last=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000006", "step_00000007", "step_00000008"]
    assert json.loads((checkpoint_dir(tmp_path, 8) / COMPLETE).read_text())["parent"]["name"] == "step_00000007"


def test_foreign_directories_under_checkpoints_break_nothing(tmp_path, accelerator):
    _setup(accelerator)
    _save_line(accelerator, tmp_path, (2, 4))
    root = tmp_path / "checkpoints"
    shutil.copytree(checkpoint_dir(tmp_path, 4), root / "step_00000004.bak")
    (root / "notes").mkdir()
    (root / "step_final").mkdir()
    (root / "step_00000009").write_text("a file, not a checkpoint")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000004"]
    assert find_resume(tmp_path, "auto") == checkpoint_dir(tmp_path, 4)
    prune_checkpoints(tmp_path, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004"]
    assert (root / "step_00000004.bak").is_dir() and (root / "notes").is_dir()  # not ours to delete


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


def test_a_full_disk_names_the_space_needed_removes_the_partial_save_and_keeps_the_previous(tmpfs, accelerator):
    tmpfs.resize(2 * 2**20)
    disk = tmpfs.path
    torch.manual_seed(0)
    model = accelerator.prepare(torch.nn.Linear(256, 256))  # ~260 KB of weights, ~790 KB with AdamW moments
    opt = accelerator.prepare(torch.optim.AdamW(model.parameters()))
    model(torch.randn(2, 256)).sum().backward()
    opt.step()
    first = save_checkpoint(accelerator, disk, 1, {"data": {}}, keep_last=3)
    (disk / "ballast").write_bytes(os.urandom(2**20 - 200_000))  # what else fills the disk
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(accelerator, disk, 2, {"data": {}}, keep_last=3, parent=first)
    message = str(info.value)
    assert message.startswith(f"no space left on {disk / 'checkpoints'}: 1 MiB needed"), message
    assert "step_00000001 stays the newest complete checkpoint" in message
    assert not list((disk / "checkpoints").glob(TMP_PREFIX + "*"))
    assert find_resume(disk, "auto") == first


def test_export_cli_explains_a_run_without_checkpoints(tmp_path, capsys):
    from scaling.cli import main

    assert main(["export", str(tmp_path)]) == 1
    assert "has no complete checkpoint" in capsys.readouterr().err


def test_a_run_file_is_replaced_in_one_rename_and_an_identical_copy_is_left_alone(tmp_path):
    target = tmp_path / "tokenizer"
    replace_atomically(target, lambda d: (d.mkdir(), (d / "vocab.json").write_text("v1")))
    first = (target / "vocab.json").stat()

    def fails_halfway(directory):
        directory.mkdir()
        (directory / "vocab.json").write_text("v2")
        raise OSError("disk full")

    with pytest.raises(OSError):
        replace_atomically(target, fails_halfway)
    assert (target / "vocab.json").read_text() == "v1"  # the old copy is whole
    replace_atomically(target, lambda d: (d.mkdir(), (d / "vocab.json").write_text("v1")))
    assert (target / "vocab.json").stat().st_mtime_ns == first.st_mtime_ns  # identical: not rewritten
    replace_atomically(target, lambda d: (d.mkdir(), (d / "vocab.json").write_text("v2")))
    assert (target / "vocab.json").read_text() == "v2" and not list(tmp_path.glob(".tmp-*"))


def test_the_tied_embeddings_save_without_a_warning_and_resume_tied(tmp_path, caplog):
    """accelerate leaves the model's tied embeddings out of the safetensors file with a "Removed shared tensor"
    warning on every save; they are aliases by design, so the note is dropped and the resume restores them tied."""
    from accelerate.utils.other import clean_state_dict_for_safetensors

    from scaling.models.biomedgpt import BiomedGPTConfig, BiomedGPTForConditionalGeneration

    torch.manual_seed(0)
    model = BiomedGPTForConditionalGeneration(BiomedGPTConfig.from_preset("test", vocab_size=64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    accelerator = Accelerator(cpu=True)  # its own: the module's accelerator saves every model it prepared
    model, opt = accelerator.prepare(model, opt)
    with caplog.at_level("WARNING"):
        save_checkpoint(accelerator, tmp_path, 1, {}, keep_last=1)
    assert "Removed shared tensor" not in caplog.text
    stored = (checkpoint_dir(tmp_path, 1) / "model.safetensors").read_bytes()
    assert b"model.encoder.embed_tokens.weight" in stored and b"output_projection" not in stored  # it was left out

    with torch.no_grad():
        model.model.encoder.embed_tokens.weight.add_(1.0)
    load_checkpoint(accelerator, checkpoint_dir(tmp_path, 1))
    decoder = model.model.decoder
    assert decoder.output_projection.weight is model.model.encoder.embed_tokens.weight is decoder.embed_tokens.weight
    assert torch.equal(decoder.output_projection.weight, model.model.encoder.embed_tokens.weight)

    shared = torch.zeros(2)
    with caplog.at_level("WARNING"):  # the control: any other alias is still reported
        clean_state_dict_for_safetensors({"a.weight": torch.ones(2), "c.weight": shared, "d.weight": shared})
    assert "Removed shared tensor {'d.weight'}" in caplog.text


def test_a_compiled_model_exports_under_its_own_names(tmp_path, accelerator):
    """Under train.compile accelerate hands back torch.compile's wrapper, whose state dict says `_orig_mod.<name>`:
    the export must not (a model loaded from it would come up with fresh weights)."""
    from scaling.models.biomedgpt import BiomedGPTConfig, BiomedGPTForConditionalGeneration
    from scaling.models.biomedgpt.tokenization import train_bpe_tokenizer
    from scaling.training.checkpoint import export_from_run

    torch.manual_seed(0)
    plain = BiomedGPTForConditionalGeneration(BiomedGPTConfig.from_preset("test", vocab_size=300))
    model = torch.compile(plain, backend="eager")  # prepare()'s wrapper under train.compile; nothing runs the model
    assert any(name.startswith("_orig_mod.") for name in accelerator.get_state_dict(model))
    tokenizer = train_bpe_tokenizer(["is there a lesion? yes no"] * 20, vocab_size=300, num_codes=0, num_bins=0)

    export_from_run(accelerator, model, tokenizer, tmp_path / "export")

    exported = BiomedGPTForConditionalGeneration.from_pretrained(tmp_path / "export").state_dict()
    assert not [name for name, tensor in exported.items() if tensor.is_meta], "weights missing from the export"
    assert all(torch.equal(exported[name], tensor) for name, tensor in plain.state_dict().items())
