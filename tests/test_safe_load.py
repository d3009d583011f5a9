"""Safe checkpoint loading: fairseq allowlist, refusal of code-running pickles, clear errors on damaged files."""

import argparse
import datetime
import json
import logging
import os
import pickle
import re
import shutil
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from scaling.safe_load import CheckpointLoadError, load_pickle_checkpoint, load_state_dict_file


class CreatesFileWhenUnpickled:
    """A pickle payload whose loading opens (creates) a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class RunsShellWhenUnpickled:
    """A pickle payload whose loading runs a shell command that creates a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def fairseq_checkpoint() -> dict:
    """The structure fairseq's Trainer.state_dict writes (legacy `args` Namespace, numpy scalars, EMA copy)."""
    model = OrderedDict(w=torch.arange(6.0).reshape(2, 3), n=torch.tensor(3))
    return {
        "args": argparse.Namespace(arch="ofa_base", lr=[5e-5], freeze_encoder_embedding=True, ans2label_file=None),
        "cfg": None,
        "model": model,
        "optimizer_history": [{"criterion_name": "AdjustLabelSmoothedCrossEntropyCriterion", "num_updates": 10}],
        "extra_state": {
            "train_iterator": {"epoch": 2, "iterations_in_epoch": 0, "version": 2},
            "val_loss": np.float64(0.25),
            "best": np.float32(71.6),
            "ema": OrderedDict(w=torch.full((2, 3), 0.5, dtype=torch.float16), n=torch.tensor(3)),
            "ema_fp32_params": OrderedDict(w=torch.full((2, 3), 0.5)),
        },
    }


def test_fairseq_checkpoint_loads_with_allowlist(tmp_path):
    path = tmp_path / "checkpoint_best.pt"
    torch.save(fairseq_checkpoint(), path)
    checkpoint = load_pickle_checkpoint(path)
    assert checkpoint["args"].arch == "ofa_base"
    assert checkpoint["extra_state"]["best"] == np.float32(71.6)
    model = load_state_dict_file(path)
    assert torch.equal(model["w"], torch.arange(6.0).reshape(2, 3))
    ema = load_state_dict_file(path, weights="ema")
    assert ema["w"].dtype == torch.float32 and torch.equal(ema["w"], torch.full((2, 3), 0.5))
    assert torch.equal(ema["n"], torch.tensor(3))


def test_missing_ema_is_a_clear_error(tmp_path):
    path = tmp_path / "no_ema.pt"
    checkpoint = fairseq_checkpoint()
    del checkpoint["extra_state"]["ema"]
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointLoadError, match=r"no_ema\.pt has no EMA weights"):
        load_state_dict_file(path, weights="ema")


@pytest.mark.parametrize("payload", [CreatesFileWhenUnpickled, RunsShellWhenUnpickled])
def test_code_running_pickle_is_refused_and_creates_nothing(tmp_path, payload):
    marker = tmp_path / "created_by_pickle"
    path = tmp_path / "malicious.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "payload": payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(
        CheckpointLoadError, match=r"Refused to load .*malicious\.pt.*(io\.open|posix\.system).*--trust-pickle"
    ):
        load_state_dict_file(path)
    assert not marker.exists()


def test_trust_pickle_is_the_explicit_way_around_and_warns(tmp_path, caplog):
    path = tmp_path / "dated.pt"
    torch.save({"model": {"w": torch.ones(1)}, "saved_on": datetime.date(2024, 5, 1)}, path)
    with pytest.raises(CheckpointLoadError, match="datetime.date"):
        load_pickle_checkpoint(path)
    logging.getLogger("scaling").addHandler(caplog.handler)
    try:
        checkpoint = load_pickle_checkpoint(path, trust_pickle=True)
    finally:
        logging.getLogger("scaling").removeHandler(caplog.handler)
    assert checkpoint["saved_on"] == datetime.date(2024, 5, 1)
    assert any("unrestricted pickle" in record.getMessage() for record in caplog.records)


def test_truncated_torch_zip_gives_clear_error(tmp_path):
    path = tmp_path / "half.pt"
    torch.save(fairseq_checkpoint(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointLoadError, match=r"Cannot read .*half\.pt .*truncated or corrupt.*Copy or download it again"
    ):
        load_state_dict_file(path)


def test_truncated_safetensors_gives_clear_error(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(256)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointLoadError, match=r"Cannot read .*model\.safetensors .*truncated or corrupt"):
        load_state_dict_file(path)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(CheckpointLoadError, match="Checkpoint file not found"):
        load_state_dict_file(tmp_path / "absent.pt")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(CheckpointLoadError, match=r"Unknown checkpoint type .*weights\.npz"):
        load_state_dict_file(tmp_path / "weights.npz")


def test_save_pretrained_directories_single_and_sharded(tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    single.mkdir()
    sharded.mkdir()
    save_file({"a": torch.ones(2), "b": torch.zeros(3)}, single / "model.safetensors")
    save_file({"a": torch.ones(2)}, sharded / "model-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(3)}, sharded / "model-00002-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for directory in (single, sharded):
        state_dict = load_state_dict_file(directory)
        assert sorted(state_dict) == ["a", "b"] and torch.equal(state_dict["b"], torch.zeros(3))
    with pytest.raises(CheckpointLoadError, match="EMA weights live only in fairseq"):
        load_state_dict_file(single / "model.safetensors", weights="ema")
    with pytest.raises(CheckpointLoadError, match=r"No model weights in .*expected one of model\.safetensors"):
        load_state_dict_file(tmp_path)


def test_omegaconf_config_loads_when_omegaconf_is_installed(tmp_path):
    omegaconf = pytest.importorskip("omegaconf", reason="omegaconf is optional; its allowlist entries need it")
    cfg = omegaconf.OmegaConf.create({"model": {"arch": "ofa_base", "layers": [6, 6]}, "task": {"name": "vqa_gen"}})
    path = tmp_path / "hydra.pt"
    torch.save({"cfg": cfg, "model": {"w": torch.ones(1)}}, path)
    loaded = load_pickle_checkpoint(path)["cfg"]
    assert omegaconf.OmegaConf.to_container(loaded) == {
        "model": {"arch": "ofa_base", "layers": [6, 6]},
        "task": {"name": "vqa_gen"},
    }


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory):
    """A real accelerate checkpoint (weights, AdamW, LambdaLR, RNG states) written by the toolkit's save."""
    from accelerate import Accelerator

    from scaling.training.checkpoint import save_checkpoint

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    path = save_checkpoint(accelerator, tmp_path_factory.mktemp("run"), 1, {"data": {}}, keep_last=1)
    return accelerator, path


def plant(file, payload, raw: bool = False) -> None:
    """Replace a checkpoint file by one that also holds `payload`, and re-sign the manifest as an attacker would."""
    from scaling.training.checkpoint import COMPLETE, write_manifest

    original = torch.load(file, weights_only=False)
    if raw:
        file.write_bytes(pickle.dumps({"state": original, "payload": payload}))
    else:
        torch.save({**original, "payload": payload} if isinstance(original, dict) else [original, payload], file)
    (file.parent / COMPLETE).unlink()
    write_manifest(file.parent, 1, 1)


@pytest.mark.parametrize("name,raw", [("optimizer.bin", False), ("scheduler.bin", False),
                                      ("random_states_0.pkl", False), ("random_states_0.pkl", True)])
def test_a_payload_planted_in_a_training_checkpoint_is_refused_before_anything_is_unpickled(
        tmp_path, training_checkpoint, name, raw):
    from scaling.training.checkpoint import load_checkpoint, verify_checkpoint

    accelerator, original = training_checkpoint
    checkpoint = tmp_path / original.name
    shutil.copytree(original, checkpoint)
    marker = tmp_path / "created_by_pickle"
    plant(checkpoint / name, RunsShellWhenUnpickled(marker), raw)
    verify_checkpoint(checkpoint)  # the manifest was re-signed: only the allowlist stands in the way
    refusal = r"posix\.system" if not raw else r"not a torch\.save archive"
    with pytest.raises(CheckpointLoadError, match=rf"Refused to load {re.escape(str(checkpoint / name))}.*{refusal}"):
        load_checkpoint(accelerator, checkpoint)
    assert not marker.exists()


def test_the_planted_payload_really_runs_under_an_unrestricted_load(tmp_path, training_checkpoint):
    _, original = training_checkpoint
    checkpoint = tmp_path / original.name
    shutil.copytree(original, checkpoint)
    marker = tmp_path / "created_by_pickle"
    plant(checkpoint / "optimizer.bin", RunsShellWhenUnpickled(marker))
    torch.load(checkpoint / "optimizer.bin", weights_only=False)
    assert marker.exists()  # so its absence above means the loader refused it


def test_infer_refuses_a_model_directory_whose_weights_hold_a_payload(tmp_path, capsys):
    from scaling.cli import main
    from scaling.models.biomedgpt import BiomedGPTConfig, BiomedGPTForConditionalGeneration
    from scaling.models.biomedgpt.tokenization import train_bpe_tokenizer

    model_dir, marker = tmp_path / "model", tmp_path / "created_by_pickle"
    tokenizer = train_bpe_tokenizer(["is there a lesion", "yes", "no"] * 20, vocab_size=300, num_codes=0, num_bins=0)
    model = BiomedGPTForConditionalGeneration(BiomedGPTConfig.from_preset("test", vocab_size=len(tokenizer)))
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (model_dir / "model.safetensors").unlink()  # the weights as a pickle, with a payload
    torch.save({**model.state_dict(), "payload": RunsShellWhenUnpickled(marker)}, model_dir / "pytorch_model.bin")
    status = main(["infer", "--checkpoint", str(model_dir), "--question", "is there a lesion?", "--task", "qa",
                   "--context", "none"])
    assert status == 1 and not marker.exists()
    assert "scaling infer:" in capsys.readouterr().err
