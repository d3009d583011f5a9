"""recipes/finetune.py on one process (test preset, synthetic data): artifacts, loss, exact resume after a SIGKILL
at a random step, a kill in the middle of a checkpoint write, SIGTERM, the non-finite guard, determinism."""

from __future__ import annotations

import json
import random
import signal
import sys

import pytest
import torch
from recipe_runs import (
    injected,
    kill_group,
    logged_steps,
    losses,
    max_abs_diff,
    recipe_args,
    run,
    start,
    wait_for_step,
    weights,
)

from scaling.training.checkpoint import (
    COMPLETE,
    TMP_PREFIX,
    checkpoint_dir,
    find_resume,
    list_checkpoints,
    verify_checkpoint,
)

pytestmark = pytest.mark.slow
STEPS = 8  # test_finetune.yaml: max_steps 8, save_every 2, keep_last 2
PYTHON = [sys.executable]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """One uninterrupted run: the trajectory every interrupted run must reproduce exactly."""
    run_dir = tmp_path_factory.mktemp("reference")
    run(PYTHON + recipe_args(run_dir, cache))
    return run_dir


def sample_inputs(size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(4, 400, (2, 12), generator=g), "attention_mask": torch.ones(2, 12, dtype=torch.long),
            "pixel_values": torch.randn(2, 3, size, size, generator=g), "patch_masks": torch.tensor([True, False]),
            "decoder_input_ids": torch.randint(4, 400, (2, 6), generator=g)}


def test_run_writes_every_artifact_and_the_loss_falls(reference):
    assert logged_steps(reference) == list(range(1, STEPS + 1))
    curve = losses(reference)
    assert sum(curve[-2:]) / 2 < sum(curve[:2]) / 2, curve
    assert [p.name for p in list_checkpoints(reference)] == ["step_00000006", "step_00000008"]
    for name in ("config.yaml", "train.log", "loss.png", "model_config.json", "tokenizer/tokenizer.json",
                 "export/config.json", "export/model.safetensors", "export/tokenizer.json"):
        assert (reference / name).is_file(), name
    from scaling.models.biomedgpt import BiomedGPTForConditionalGeneration

    exported = BiomedGPTForConditionalGeneration.from_pretrained(reference / "export")
    trained = weights(reference, STEPS)
    state = exported.state_dict()
    assert max_abs_diff({k: state[k] for k in trained}, trained) == 0.0


def test_sigkill_at_a_random_step_then_resume_matches_the_uninterrupted_run(tmp_path, cache, reference):
    kill_at = random.Random().randint(2, STEPS - 1)
    print(f"killing at step {kill_at}")
    proc = start(PYTHON + recipe_args(tmp_path, cache), log=tmp_path / "first.log")
    wait_for_step(tmp_path, kill_at, proc)
    assert kill_group(proc) == -signal.SIGKILL
    run(PYTHON + recipe_args(tmp_path, cache, "train.resume=auto"))
    # every optimizer step exactly once in the step log, with the losses of the uninterrupted run
    assert logged_steps(tmp_path) == list(range(1, STEPS + 1))
    assert losses(tmp_path) == losses(reference)
    assert max_abs_diff(weights(tmp_path, STEPS), weights(reference, STEPS)) <= 1e-6


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_selected_and_exportable(tmp_path, cache):
    lora = ("peft.encoder=lora", "peft.decoder=lora")  # a PEFT run, so the export below merges adapters
    done = run(PYTHON + injected("kill_during_save=4") + recipe_args(tmp_path, cache, *lora),
               expect=-signal.SIGKILL)
    partial = checkpoint_dir(tmp_path, 4).with_name(TMP_PREFIX + "step_00000004")
    assert partial.is_dir() and not (partial / COMPLETE).exists(), done.stderr[-2000:]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002"]
    assert find_resume(tmp_path, "auto") == checkpoint_dir(tmp_path, 2)
    verify_checkpoint(checkpoint_dir(tmp_path, 2))

    # `scaling export --merge` takes that checkpoint: adapter/ + a merged model with the adapted model's logits
    out = tmp_path / "merged"
    run(PYTHON + ["-m", "scaling.cli", "export", str(tmp_path), "--merge", "--out", str(out)])
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    from scaling.adapters import apply_peft
    from scaling.config import load_config
    from scaling.models.biomedgpt import BiomedGPTConfig, BiomedGPTForConditionalGeneration

    adapted = BiomedGPTForConditionalGeneration(BiomedGPTConfig.from_json_file(tmp_path / "model_config.json"))
    adapted = apply_peft(adapted, load_config(tmp_path / "config.yaml").peft)
    missing, unexpected = adapted.load_state_dict(weights(tmp_path, 2), strict=False)
    assert not unexpected and all("decoder.embed_tokens" in k or "output_projection" in k for k in missing)
    merged = BiomedGPTForConditionalGeneration.from_pretrained(out)
    inputs = sample_inputs(merged.config.image_size)
    with torch.no_grad():
        assert (adapted.eval()(**inputs).logits - merged.eval()(**inputs).logits).abs().max() <= 1e-4


def test_sigterm_writes_a_final_checkpoint_and_the_same_seed_gives_the_same_curve(tmp_path, cache, reference):
    proc = start(PYTHON + recipe_args(tmp_path, cache, "train.save_every=100"), log=tmp_path / "run.log")
    wait_for_step(tmp_path, 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM, (tmp_path / "run.log").read_text()[-3000:]
    [final] = list_checkpoints(tmp_path)
    stopped_at = json.loads((final / COMPLETE).read_text())["step"]
    assert 3 <= stopped_at < STEPS and logged_steps(tmp_path) == list(range(1, stopped_at + 1))
    assert "SIGTERM received" in (tmp_path / "run.log").read_text()
    # an independent process with the same seed follows the reference loss curve exactly
    assert losses(tmp_path) == losses(reference)[:stopped_at]


def test_nonfinite_losses_are_skipped_and_counted_then_too_many_stop_the_run(tmp_path, cache):
    # the first run also switches on EMA, frozen embeddings, gradient checkpointing and tensorboard
    skipped = tmp_path / "skipped"
    features = ("train.ema_decay=0.5", "train.freeze_embeddings=true", "train.gradient_checkpointing=true",
                "logging.tensorboard=true")
    run(PYTHON + injected("nonfinite=3:2") + recipe_args(skipped, cache, "train.max_nonfinite_steps=3", *features))
    rows = [json.loads(line) for line in (skipped / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["nonfinite_skipped"] for r in rows] == [0, 0, 2, 2, 2, 2, 2, 2]
    assert all(isinstance(r["loss"], float) and r["loss"] == r["loss"] for r in rows)
    first, last = weights(skipped, 6), weights(skipped, STEPS)
    assert torch.equal(first["model.encoder.embed_tokens.weight"], last["model.encoder.embed_tokens.weight"])
    from safetensors.torch import load_file

    ema = load_file(checkpoint_dir(skipped, STEPS) / "ema.safetensors")
    exported = load_file(skipped / "export" / "model.safetensors")
    assert max_abs_diff({k: exported[k] for k in ema if k in exported}, {k: ema[k] for k in ema if k in exported}) == 0
    assert not torch.equal(ema["model.decoder.layers.0.fc1.weight"], last["model.decoder.layers.0.fc1.weight"])
    assert list((skipped / "tensorboard").rglob("events.out.tfevents*"))

    stopped = tmp_path / "stopped"
    done = run(PYTHON + injected("nonfinite=5:99") + recipe_args(stopped, cache, "train.max_nonfinite_steps=3"),
               expect=1)
    assert "3 optimizer steps in a row had a non-finite loss" in done.stderr + done.stdout
    assert logged_steps(stopped) == [1, 2, 3, 4]
    assert [p.name for p in list_checkpoints(stopped)] == ["step_00000002", "step_00000004"]
    verify_checkpoint(checkpoint_dir(stopped, 4))
    assert all(torch.isfinite(t).all() for t in weights(stopped, 4).values())
