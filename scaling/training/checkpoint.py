"""Crash-safe checkpoints: atomic save, keep-last-K, resume (auto or a path), and export to a save_pretrained dir.

Layout of a run directory:

    run_dir/checkpoints/step_00000200/     accelerator.save_state (model, optimizer, scheduler, RNG per rank; DeepSpeed
                                            shards under pytorch_model/) + trainer_state_rank<r>.json (step, data
                                            position) + ema.safetensors (when EMA is on) + COMPLETE (written last)
    run_dir/checkpoints/.tmp-step_00000400/ a save in progress: never picked, removed by the next run
    run_dir/model_config.json, tokenizer/   what `scaling export` needs to rebuild the model offline

A checkpoint is written into a `.tmp-` directory, its file manifest (`COMPLETE`, names and sizes) is written last,
then the directory is renamed into place. A kill at any moment leaves either the old set of checkpoints or the new
one, and a truncated file is caught by the manifest before any tensor is read.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from scaling.evaluation.checkpoints import write_inference_settings
from scaling.logging import get_logger

log = get_logger(__name__)

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
TMP_PREFIX = ".tmp-"
MODEL_CONFIG = "model_config.json"
TOKENIZER_DIR = "tokenizer"
EMA_FILE = "ema.safetensors"
DEEPSPEED_TAG = "pytorch_model"
"""Sub-directory (DeepSpeed checkpoint tag) that accelerator.save_state writes DeepSpeed shards into."""

class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupt, with the directory and the fix in the message."""


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def save_checkpoint(accelerator: Accelerator, run_dir: str | os.PathLike, step: int, trainer_state: dict,
                    keep_last: int, ema=None) -> Path:
    """Atomically save the full training state at optimizer step `step` (every rank calls this)."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(TMP_PREFIX + final.name)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every rank: DeepSpeed writes one shard per rank
    _write_json(tmp / f"trainer_state_rank{accelerator.process_index}.json", {**trainer_state, "step": step})
    if ema is not None and accelerator.is_main_process:
        ema.save(tmp / EMA_FILE)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_manifest(tmp, step, accelerator.num_processes)
        if final.exists():  # a step redone after a resume from an earlier checkpoint
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        prune_checkpoints(run_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


def write_manifest(directory: Path, step: int, world_size: int) -> None:
    """The completeness marker: every file with its size, written last and fsynced."""
    files = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}
    _write_json(directory / COMPLETE, {"step": step, "world_size": world_size, "time": time.time(), "files": files})


def _write_json(path: Path, data: dict) -> None:
    with path.open("w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories, oldest first (in-progress `.tmp-` directories are never listed)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Remove all but the newest `keep_last` complete checkpoints, and leftovers of interrupted saves."""
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for partial in (Path(run_dir) / CHECKPOINTS).glob(TMP_PREFIX + "*"):
        if partial.stat().st_mtime < time.time() - 1:  # not the one being renamed right now
            shutil.rmtree(partial, ignore_errors=True)


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check the manifest against the files on disk; return it, or raise CheckpointError naming what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist; give a checkpoint directory such as "
                              f"<run>/{CHECKPOINTS}/step_00000100, or train.resume=auto")
    marker = path / COMPLETE
    if not marker.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {COMPLETE} marker: the save was interrupted); "
                              "resume from an earlier checkpoint or with train.resume=auto")
    try:
        manifest = json.loads(marker.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint {path}: {COMPLETE} is not valid JSON ({err}); the directory is "
                              "damaged, delete it and resume from an earlier one") from None
    for name, size in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} is missing; delete the directory and "
                                  "resume from an earlier checkpoint")
        if file.stat().st_size != size:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} has {file.stat().st_size} bytes, the "
                                  f"manifest says {size} (truncated?); delete the directory and resume from an "
                                  "earlier checkpoint")
    return manifest


def find_resume(run_dir: str | os.PathLike, resume: str | None) -> Path | None:
    """The checkpoint to resume from: None, the newest valid one for 'auto', or the given path (verified)."""
    if resume is None:
        return None
    if resume != "auto":
        verify_checkpoint(resume)
        return Path(resume)
    for candidate in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(candidate)
            return candidate
        except CheckpointError as err:
            log.warning("skipping %s", err)
    return None


def load_checkpoint(accelerator: Accelerator, path: Path, ema=None) -> dict:
    """Restore model, optimizer, scheduler, RNG (and EMA) from `path`; return this rank's trainer state."""
    manifest = verify_checkpoint(path)
    if manifest["world_size"] != accelerator.num_processes:
        raise CheckpointError(f"checkpoint {path} was written by {manifest['world_size']} processes, this run has "
                              f"{accelerator.num_processes}; resume with the same number of processes (ZeRO shards "
                              "and per-rank data positions depend on it), or `scaling export` it and start anew")
    try:
        accelerator.load_state(str(path))
    except Exception as err:  # deep library errors become one clear message naming the checkpoint
        raise CheckpointError(f"checkpoint {path} could not be loaded: {type(err).__name__}: {err}") from err
    if ema is not None:
        ema.load(path / EMA_FILE)
    state_file = path / f"trainer_state_rank{accelerator.process_index}.json"
    return json.loads(state_file.read_text())


# ---------------------------------------------------------------------------------------------------------------------
# Export: a consolidated save_pretrained directory


def save_run_model_info(run_dir: str | os.PathLike, model_config, tokenizer) -> None:
    """Everything `scaling export` needs besides the weights: the model config and the tokenizer (rank 0)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model_config.to_json_file(run_dir / MODEL_CONFIG)
    tokenizer.save_pretrained(run_dir / TOKENIZER_DIR)


def export_from_run(accelerator: Accelerator, model, tokenizer, out_dir: str | os.PathLike, merge: bool = True) -> Path:
    """Gather the trained weights (any ZeRO stage) and write save_pretrained + tokenizer (every rank calls this).

    PEFT runs write `adapter/`, and with `merge` the merged model next to it when the adapters can be merged
    (not prefix methods, not quantised bases, not ZeRO-3 shards: use `scaling export --merge` for those).
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(TMP_PREFIX + out_dir.name)
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    peft = _is_peft(unwrapped)
    if peft:
        from scaling.adapters import save_adapter

        save_adapter(unwrapped, tmp / "adapter", accelerator.is_main_process)  # every rank: gathers under ZeRO-3
    sharded = any(getattr(p, "ds_numel", p.numel()) != p.numel() for p in unwrapped.parameters())
    merge = peft and merge and not sharded
    state_dict = accelerator.get_state_dict(model) if not peft else None  # ZeRO-3: gathered onto rank 0
    if accelerator.is_main_process:
        if merge:
            _save_merged(unwrapped, tmp)
        elif not peft:
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        _finish_export(tokenizer, tmp, out_dir)
    accelerator.wait_for_everyone()
    return out_dir


def _save_merged(model, directory: Path) -> None:
    """Fold the adapters into the base weights and save the plain model (logs why when they cannot be merged)."""
    from scaling.adapters import merge_adapters

    try:
        merged = merge_adapters(model)
    except ValueError as err:
        log.warning("exported the adapter only: %s", err)
        return
    merged.save_pretrained(directory, safe_serialization=True)


def _finish_export(tokenizer, tmp: Path, out_dir: Path) -> None:
    """Add the tokenizer and move the finished directory into place."""
    tokenizer.save_pretrained(tmp)
    write_inference_settings(tmp, out_dir.parent)  # what `scaling infer` and evaluation need: the run's prompts
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    log.info("exported %s", out_dir)


def _is_peft(model) -> bool:
    return getattr(model, "peft_args", None) is not None


def export_checkpoint(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                      checkpoint: str | os.PathLike | None = None, merge: bool = False) -> Path:
    """Offline export in one process: newest checkpoint of `run_dir` (DDP or any ZeRO stage) → save_pretrained dir.

    PEFT runs write the adapter under `adapter/`, and with `merge=True` also the merged full model.
    """
    from scaling.config import load_config
    from scaling.models.biomedgpt import BiomedGPTConfig, BiomedGPTForConditionalGeneration
    from scaling.models.biomedgpt.tokenization import load_tokenizer

    run_dir = Path(run_dir)
    path = Path(checkpoint) if checkpoint else find_resume(run_dir, "auto")
    if path is None:
        raise CheckpointError(f"{run_dir} has no complete checkpoint under {CHECKPOINTS}/; train with "
                              "train.save_every set, or pass --checkpoint")
    verify_checkpoint(path)
    cfg = load_config(run_dir / "config.yaml")
    model = BiomedGPTForConditionalGeneration(BiomedGPTConfig.from_json_file(run_dir / MODEL_CONFIG))
    if cfg.peft.enabled:
        from scaling.adapters import apply_peft

        model = apply_peft(model, cfg.peft)
    state_dict = read_checkpoint_weights(path)
    if (path / EMA_FILE).is_file():  # the run exports its EMA weights; so does the offline export
        from safetensors.torch import load_file

        state_dict.update(load_file(path / EMA_FILE))
    model.load_state_dict(_match_tied(model, state_dict), strict=True)
    out = Path(out_dir) if out_dir else run_dir / "export"
    tmp = out.with_name(TMP_PREFIX + out.name)
    shutil.rmtree(tmp, ignore_errors=True)
    if _is_peft(model):
        from scaling.adapters import save_adapter

        save_adapter(model, tmp / "adapter")
        if merge:
            _save_merged(model, tmp)
    else:
        model.save_pretrained(tmp, safe_serialization=True)
    _finish_export(load_tokenizer(run_dir / TOKENIZER_DIR), tmp, out)
    return out


def read_checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model weights of an accelerate checkpoint: model.safetensors (DDP) or fp32 from ZeRO shards."""
    if (path / DEEPSPEED_TAG).is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DEEPSPEED_TAG))
    from safetensors.torch import load_file

    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint {path} holds no model weights (model.safetensors or {DEEPSPEED_TAG}/)")
    return load_file(files[0])


def _match_tied(model, state_dict: dict) -> dict:
    """Fill tied weights (e.g. the output projection) that safetensors stored only once."""
    full = dict(state_dict)
    for name, tensor in model.state_dict().items():
        if name not in full:
            twin = next((n for n, p in model.state_dict().items()
                         if n in state_dict and p.data_ptr() == tensor.data_ptr()), None)
            if twin is not None:
                full[name] = state_dict[twin]
    return full
