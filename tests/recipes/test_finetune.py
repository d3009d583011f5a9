"""recipes/finetune.py on one process (test preset, synthetic data): artifacts, loss, exact resume after a SIGKILL
at a random step, a kill in the middle of a checkpoint write, SIGTERM (also through a single-process `accelerate
launch`), one live run per directory, a full disk, unreadable training images, new settings on resume, a planted
pickle payload, the non-finite guard, determinism."""

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
from PIL import Image
from recipe_runs import (
    ACCELERATE,
    injected,
    kill_every_rank,
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

from scaling.training.checkpoint import (
    COMPLETE,
    TMP_PREFIX,
    checkpoint_dir,
    directory_bytes,
    find_resume,
    list_checkpoints,
    verify_checkpoint,
    write_manifest,
)
from scaling.training.optim import lr_lambda
from scaling.training.tracking import read_metrics

pytestmark = pytest.mark.slow
STEPS = 8  # test_finetune.yaml: max_steps 8, save_every 2, keep_last 2
SLOW = "step_seconds=0.5"  # a run stopped after step N must not finish first on a fast host
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
    proc = start(PYTHON + injected(SLOW) + recipe_args(tmp_path, cache), log=tmp_path / "first.log")
    wait_for_step(tmp_path, kill_at, proc)
    kill_every_rank(proc, ranks=1)
    assert max(logged_steps(tmp_path)) < STEPS and not (tmp_path / "export").exists()  # really interrupted
    tokenizer = (tmp_path / "tokenizer" / "tokenizer.json").stat()
    run(PYTHON + recipe_args(tmp_path, cache, "train.resume=auto"))
    after = (tmp_path / "tokenizer" / "tokenizer.json").stat()
    assert (after.st_ino, after.st_mtime_ns) == (tokenizer.st_ino, tokenizer.st_mtime_ns)  # written once per run
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
    out = tmp_path.parent / f"{tmp_path.name}-merged"  # outside the run directory: the run's settings still travel
    run(PYTHON + ["-m", "scaling.cli", "export", str(tmp_path), "--merge", "--out", str(out)])
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "inference.json").read_text())["prompt_type"] == "prev_output"
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
    proc = start(PYTHON + injected(SLOW) + recipe_args(tmp_path, cache, "train.save_every=100"),
                 log=tmp_path / "run.log")
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
    message = done.stderr + done.stdout
    assert says(message, "3 optimizer steps in a row had a non-finite loss")
    assert logged_steps(stopped) == [1, 2, 3, 4]
    assert [p.name for p in list_checkpoints(stopped)] == ["step_00000002", "step_00000004"]
    verify_checkpoint(checkpoint_dir(stopped, 4))
    assert all(torch.isfinite(t).all() for t in weights(stopped, 4).values())
    # the advice fits the run: clipping is on already (train.max_grad_norm=1), the intact checkpoint is named
    assert says(message, "step_00000004, holds the last good state") and says(message, "lower train.lr (now 0.002)")
    assert not says(message, "max_grad_norm") and not says(message, "bf16")


def test_the_nonfinite_stop_says_so_when_no_checkpoint_exists_yet(tmp_path, cache):
    done = run(PYTHON + injected("nonfinite=1:99") + recipe_args(tmp_path, cache, "train.max_nonfinite_steps=2",
                                                                  "train.max_grad_norm=0"), expect=1)
    message = done.stderr + done.stdout
    assert says(message, "No checkpoint was written yet (train.save_every=2)") and says(message, "start the run again")
    assert says(message, "set train.max_grad_norm (e.g. 1.0)") and not says(message, "holds the last good state")
    assert not list_checkpoints(tmp_path)


# ---- one live run per run directory; a launcher's SIGTERM reaches its worker --------------------------------------


def test_a_second_run_on_the_directory_of_a_live_run_is_refused_naming_the_holder(tmp_path, cache):
    first = start(PYTHON + recipe_args(tmp_path, cache, "train.max_steps=400", "train.save_every=1000"),
                  log=tmp_path / "first.log")
    wait_for_step(tmp_path, 2, first)
    [holder] = recipe_workers(first.pid)
    second = run(PYTHON + recipe_args(tmp_path, cache, "train.resume=auto"), expect=2)
    assert says(second.stderr, f"{tmp_path} is in use by another live run (pid {holder} on host"), second.stderr
    assert "Traceback" not in second.stderr
    wait_for_step(tmp_path, 3, first)  # the refused run left the live one training
    kill_every_rank(first, ranks=1)
    steps_before = logged_steps(tmp_path)
    # the lock dies with its holder: the next run starts (and SIGKILL left no lock behind)
    run(PYTHON + recipe_args(tmp_path, cache, "train.max_steps=2"))
    assert max(steps_before) > 2 and logged_steps(tmp_path) == [1, 2]


def test_sigterm_to_a_single_process_accelerate_launch_reaches_the_run(tmp_path, cache):
    launch = [*ACCELERATE, "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    proc = start(launch + recipe_args(tmp_path, cache, "train.max_steps=400", "train.save_every=1000"),
                 log=tmp_path / "launch.log")
    wait_for_step(tmp_path, 2, proc)
    [worker] = recipe_workers(proc.pid)
    assert worker != proc.pid
    os.kill(proc.pid, signal.SIGTERM)  # as `docker stop` does: the launcher only
    proc.wait(timeout=60)
    wait_gone([worker], timeout=120)  # the orphaned worker would otherwise train all 400 steps
    [final] = list_checkpoints(tmp_path)
    stopped_at = json.loads((final / COMPLETE).read_text())["step"]
    assert 2 <= stopped_at < 400 and logged_steps(tmp_path) == list(range(1, stopped_at + 1))
    assert "SIGTERM received" in (tmp_path / "train.log").read_text()


# ---- a full disk ----------------------------------------------------------------------------------------------------


def test_a_full_disk_stops_with_the_space_needed_and_resume_continues_exactly(tmpfs, cache, reference):
    run_dir = tmpfs.path / "run"
    checkpoint = directory_bytes(checkpoint_dir(reference, 6))
    # room for the run's small files and one checkpoint, not for the second one
    tmpfs.resize(directory_bytes(reference / "tokenizer") + checkpoint + checkpoint // 2 + 2**20)
    done = run(PYTHON + recipe_args(run_dir, cache), expect=1)
    needed = f"no space left on {run_dir / 'checkpoints'}: {checkpoint / 2**20:.0f} MiB needed"
    assert says(done.stderr, needed), done.stderr[-3000:]
    assert says(done.stderr, "step_00000002 stays the newest complete checkpoint") and "Traceback" not in done.stderr
    assert not list((run_dir / "checkpoints").glob(TMP_PREFIX + "*"))
    assert find_resume(run_dir, "auto") == checkpoint_dir(run_dir, 2)
    tmpfs.resize(64 * 2**20)  # space freed
    run(PYTHON + recipe_args(run_dir, cache, "train.resume=auto"))
    assert losses(run_dir) == losses(reference)
    assert max_abs_diff(weights(run_dir, STEPS), weights(reference, STEPS)) <= 1e-6


# ---- unreadable training images ----------------------------------------------------------------------------------


def vqa_rad_with_a_corrupt_image(root, corrupt: int):
    """A VQA-RAD release of 6 images, the first `corrupt` of them not decodable (the loader only checks they exist)."""
    images = root / "images"
    images.mkdir(parents=True)
    rows = []
    for i in range(6):
        if i < corrupt:
            (images / f"{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        else:
            Image.new("RGB", (40, 40), (40 * i, 100, 200 - 30 * i)).save(images / f"{i}.jpg")
        rows += [{"qid": f"{i}-{q}", "image_name": f"{i}.jpg", "phrase_type": "freeform", "question": question,
                  "answer": answer, "answer_type": "CLOSED", "image_organ": "CHEST", "question_type": "PRES"}
                 for q, (question, answer) in enumerate([("is it normal?", "yes"), ("is there a mass?", "no")])]
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    return f"data.sources=[{{name: vqa_rad, path: {root}, split: train}}]"


def test_an_unreadable_training_image_is_skipped_counted_and_resumed_exactly(tmp_path, cache):
    source = vqa_rad_with_a_corrupt_image(tmp_path / "vqa_rad", corrupt=1)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    done = run(PYTHON + recipe_args(whole, cache, source))
    skipped = [r["images_skipped"] for r in read_metrics(whole)]
    assert skipped[-1] > 0 and skipped == sorted(skipped), skipped  # drawn and dropped, not a crash
    log = "".join((done.stderr + (whole / "train.log").read_text()).split())
    annotations = "".join(str(tmp_path / "vqa_rad" / "VQA_RAD Dataset Public.json").split())
    assert re.search(rf"of{re.escape(annotations)}\(record[01]\)", log)
    assert says(log, f"{tmp_path / 'vqa_rad' / 'images' / '0.jpg'}: cannot decode image")
    run(PYTHON + injected("kill_during_save=6") + recipe_args(resumed, cache, source), expect=-signal.SIGKILL)
    run(PYTHON + recipe_args(resumed, cache, source, "train.resume=auto"))  # from step 4
    assert read_metrics(resumed)[-1]["images_skipped"] == skipped[-1]
    assert losses(resumed) == losses(whole)


def test_too_many_unreadable_training_images_stop_the_run_with_a_clear_message(tmp_path, cache):
    source = vqa_rad_with_a_corrupt_image(tmp_path / "vqa_rad", corrupt=5)
    done = run(PYTHON + recipe_args(tmp_path / "run", cache, source), expect=2)
    assert says(done.stderr, "training images drawn could not be decoded (more than 1%)")
    assert says(done.stderr, "--verify-images")
    assert "Traceback" not in done.stderr


# ---- settings changed on resume ------------------------------------------------------------------------------------


def test_resume_applies_a_new_lr_and_records_it_and_refuses_a_changed_batch_size(tmp_path, cache, reference):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    done = run(PYTHON + recipe_args(run_dir, cache, f"train.resume={checkpoint_dir(run_dir, 6)}", "train.lr=1e-3"))
    rows = {r["step"]: r for r in read_metrics(run_dir)}
    warmup = int(0.1 * STEPS)  # test_finetune.yaml: warmup_ratio 0.1
    assert [rows[s]["lr"] for s in (7, 8)] == [1e-3 * lr_lambda(s, warmup, STEPS, "cosine") for s in (7, 8)]
    assert "lr: 0.001" in (run_dir / "config.yaml").read_text()
    assert says(done.stderr, "train.lr=0.001 (checkpoint step_00000006 was trained with 0.002)")

    refused = run(PYTHON + recipe_args(run_dir, cache, "train.resume=auto", "train.batch_size=8"), expect=2)
    assert says(refused.stderr, "train.resume: train.batch_size was 4"), refused.stderr[-2000:]


# ---- a pickle payload planted in a checkpoint ---------------------------------------------------------------------


class CreatesFileWhenUnpickled:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_refuses_a_checkpoint_with_a_planted_payload_before_running_it(tmp_path, cache, reference):
    run_dir, marker = tmp_path / "run", tmp_path / "created_by_pickle"
    shutil.copytree(reference, run_dir)
    target = checkpoint_dir(run_dir, STEPS)
    optimizer = torch.load(target / "optimizer.bin", weights_only=False)
    torch.save({**optimizer, "payload": CreatesFileWhenUnpickled(marker)}, target / "optimizer.bin")
    (target / COMPLETE).unlink()
    write_manifest(target, STEPS, 1, checkpoint_dir(run_dir, 6))  # re-signed, as an attacker with write access would
    done = run(PYTHON + recipe_args(run_dir, cache, "train.resume=auto", "train.max_steps=10"), expect=2)
    assert says(done.stderr, f"Refused to load {target / 'optimizer.bin'}") and says(done.stderr, "io.open")
    assert not marker.exists()
    torch.load(target / "optimizer.bin", weights_only=False)
    assert marker.exists()  # the payload was real
