"""Crash-safe checkpoints: atomic save with checksums and lineage, keep-last-K, resume (auto or a path), export.

Layout of a run directory:

    run_dir/checkpoints/step_00000200/     accelerator.save_state (model, optimizer, scheduler, RNG per rank; DeepSpeed
                                            shards under pytorch_model/) + trainer_state_rank<r>.json (step, data
                                            position, resolved config) + ema.safetensors (when EMA is on) + COMPLETE
    run_dir/checkpoints/.tmp-step_00000400/ a save in progress: never picked, removed by the next run
    run_dir/model_config.json, tokenizer/   what `scaling export` needs to rebuild the model offline

A checkpoint is written into a `.tmp-` directory; its manifest (`COMPLETE`: every file's size and SHA-256, the step,
the save's serial number in this run directory and the checkpoint it descends from) is written last, then the
directory is renamed into place. A kill at any moment leaves either the old set of checkpoints or the new one, and a
truncated or altered file is caught by the manifest before any tensor is read. Pickled files are checked against the
allowlist of `scaling.safe_load` and read weights-only.

`train.resume=auto` follows the live line: the most recently written checkpoint and, when that one is damaged, its
parent, then the parent's parent (with a warning each time). A resume from an older step starts a new line, so the
checkpoints of the abandoned trajectory are never picked again, even at higher steps.
"""

from __future__ import annotations

import ast
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from scaling.evaluation.checkpoints import write_inference_settings
from scaling.logging import get_logger
from scaling.models.biomedgpt.modeling import BiomedGPTForConditionalGeneration
from scaling.safe_load import check_pickles, weights_only_loads
from scaling.training.distributed import unwrapped

log = get_logger(__name__)

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
TMP_PREFIX = ".tmp-"
MODEL_CONFIG = "model_config.json"
TOKENIZER_DIR = "tokenizer"
EMA_FILE = "ema.safetensors"
DEEPSPEED_TAG = "pytorch_model"
"""Sub-directory (DeepSpeed checkpoint tag) that accelerator.save_state writes DeepSpeed shards into."""
STEP_NAME = re.compile(r"step_(\d+)")
MiB = 2**20
NEARLY_FULL = 4 * MiB
"""Free space below which a failed write is reported as a full disk (whatever error the writer raised)."""


class TiedWeightsNote(logging.Filter):
    """Drops accelerate's note on each safetensors checkpoint that it left out "shared tensors" when those are the
    model's tied embeddings: they are aliases by design, and safetensors' load_model restores them on resume. A note
    naming any other tensor still shows."""

    NOTE = re.compile(r"Removed shared tensor (\{.*?\}) while saving")
    TIED = tuple(BiomedGPTForConditionalGeneration._tied_weights_keys)  # names end so under DDP or PEFT wrappers too

    def filter(self, record: logging.LogRecord) -> bool:
        note = self.NOTE.search(record.getMessage())
        return note is None or not all(name.endswith(self.TIED) for name in ast.literal_eval(note.group(1)))


logging.getLogger("accelerate.utils.other").addFilter(TiedWeightsNote())


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupt, with the directory and the fix in the message."""


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def checkpoint_step(path: Path) -> int | None:
    """The step of a `step_N` directory name; None for anything else (step_8.bak, notes/, ...)."""
    match = STEP_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


FIXED_ON_RESUME = ("model.preset", "model.image_size", "model.overrides", "peft", "data.sources",
                   "data.synthetic_images", "data.synthetic_tasks", "data.temperature", "train.batch_size",
                   "train.seed")
"""Settings a resumed run cannot change: the restored weights' shapes and the data stream's position depend on them.
Every other setting applies from the resumed step on (the optimizer and schedule ones included)."""


def trainer_state(cfg, stream) -> dict:
    """What every rank saves besides the accelerate state: its data position and the run's resolved config."""
    return {"data": stream.state_dict(), "config": cfg.to_dict()}


def changed_settings(saved: dict, current: dict, prefix: str = "") -> dict[str, tuple]:
    """{dotted key: (saved value, current value)} for every setting that differs (sections compared key by key)."""
    changes = {}
    for key in sorted(saved.keys() & current.keys()):
        old, new = saved[key], current[key]
        if isinstance(old, dict) and isinstance(new, dict):
            changes.update(changed_settings(old, new, f"{prefix}{key}."))
        elif old != new:
            changes[f"{prefix}{key}"] = (old, new)
    return changes


def resume_problems(cfg) -> list[str]:
    """What keeps this run from resuming as asked: a missing checkpoint, or a FIXED_ON_RESUME setting it changes."""
    resume = cfg.train.resume
    if resume is None:
        return []
    if resume != "auto" and not Path(resume).is_dir():
        return [f"train.resume: {resume} does not exist; give a checkpoint directory such as "
                f"<run>/{CHECKPOINTS}/step_00000100, or auto"]
    candidates = resume_candidates(cfg.train.output_dir, resume)
    saved = saved_config(candidates[0]) if candidates else None
    changes = changed_settings(saved or {}, cfg.to_dict())
    return [f"train.resume: {key} was {old!r} when {candidates[0]} was written, this run sets {new!r}; a resumed "
            "run continues the same weights and data stream, so restore the value (or train anew in another "
            "train.output_dir, e.g. from `scaling export` of this run as model.checkpoint)"
            for key, (old, new) in changes.items() if any(key == f or key.startswith(f + ".") for f in FIXED_ON_RESUME)]


def saved_config(path: Path) -> dict | None:
    """The resolved config a checkpoint was trained with (None for checkpoints written before it was recorded)."""
    try:
        return json.loads((path / "trainer_state_rank0.json").read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        return None


def save_checkpoint(accelerator: Accelerator, run_dir: str | os.PathLike, step: int, trainer_state: dict,
                    keep_last: int, ema=None, parent: Path | None = None) -> Path:
    """Atomically save the full training state at optimizer step `step` (every rank calls this); `parent` is the
    checkpoint this state descends from (the last one saved or resumed from)."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(TMP_PREFIX + final.name)
    try:
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
            write_manifest(tmp, step, accelerator.num_processes, parent)
    except Exception as error:  # a full disk surfaces as OSError, torch's "unexpected pos", safetensors' IoError...
        raise _save_failed(run_dir, tmp, final, error) from error
    if accelerator.is_main_process:
        if final.exists():  # a step redone after a resume from an earlier checkpoint
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        prune_checkpoints(run_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


def _save_failed(run_dir, tmp: Path, final: Path, error: Exception) -> CheckpointError:
    """Remove the partial save and explain the failure: for a full disk, how much a checkpoint needs."""
    written = directory_bytes(tmp)
    free = shutil.disk_usage(tmp.parent if tmp.parent.is_dir() else run_dir).free
    shutil.rmtree(tmp, ignore_errors=True)
    previous = newest_complete(run_dir)
    kept = f"{previous} stays the newest complete checkpoint" if previous else "no complete checkpoint exists yet"
    if _is_disk_full(error) or free < NEARLY_FULL:
        needed = directory_bytes(previous) if previous else written
        return CheckpointError(
            f"no space left on {final.parent}: {needed / MiB:.0f} MiB needed for a checkpoint"
            f"{'' if previous else ' (at least)'}, {shutil.disk_usage(final.parent).free / MiB:.0f} MiB free after "
            f"removing the partial {final.name}; {kept}. Free space (or lower train.keep_last), then resume with "
            "train.resume=auto")
    return CheckpointError(f"writing checkpoint {final} failed ({type(error).__name__}: {error}); the partial save "
                           f"was removed and {kept}")


def _is_disk_full(error: BaseException) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        error = error.__cause__ or error.__context__
    return False


def directory_bytes(path: Path | None) -> int:
    """Bytes in the files under `path` (0 when it is absent)."""
    if path is None or not path.is_dir():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_manifest(directory: Path, step: int, world_size: int, parent: Path | None = None) -> dict:
    """The completeness marker: every file with its size and SHA-256, the save's serial and parent; written last."""
    manifest = {"step": step, "world_size": world_size, "time": time.time(),
                "serial": newest_serial(directory.parent.parent) + 1, "parent": _lineage(parent),
                "files": file_digests(directory)}
    _write_json(directory / COMPLETE, manifest)
    return manifest


def _lineage(parent: Path | None) -> dict | None:
    """How the manifest names its parent: directory name and serial (a redone step reuses the name)."""
    manifest = read_manifest(parent) if parent is not None and (parent / COMPLETE).is_file() else None
    return {"name": parent.name, "serial": manifest.get("serial", 0)} if manifest else None


def file_digests(directory: Path) -> dict[str, dict]:
    """{relative path: {bytes, sha256}} for every file under `directory` (hashed in threads: hashlib frees the GIL)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(files)))) as pool:
        digests = list(pool.map(sha256, files))
    return {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": d}
            for p, d in zip(files, digests, strict=True)}


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
    """Complete checkpoint directories, oldest step first (`.tmp-` saves and foreign directories are never listed)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if checkpoint_step(p) is not None and p.is_dir() and (p / COMPLETE).is_file()]
    return sorted(found, key=checkpoint_step)


def readable_manifests(run_dir: str | os.PathLike) -> dict[Path, dict]:
    """Complete checkpoints whose manifest reads, oldest save first (by serial, then step)."""
    found = {}
    for path in list_checkpoints(run_dir):
        try:
            found[path] = read_manifest(path)
        except CheckpointError as err:
            log.warning("skipping %s", err)
    return dict(sorted(found.items(), key=lambda item: (item[1].get("serial", 0), checkpoint_step(item[0]))))


def newest_serial(run_dir: Path) -> int:
    return max((m.get("serial", 0) for m in readable_manifests(run_dir).values()), default=0)


def newest_complete(run_dir: str | os.PathLike) -> Path | None:
    """The most recently written complete checkpoint (None when there is none)."""
    return next(reversed(readable_manifests(run_dir)), None)


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Remove all but the `keep_last` most recently written checkpoints, and leftovers of interrupted saves."""
    for old in list(readable_manifests(run_dir))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    remove_partial_saves(run_dir, min_age=1)  # not the one being renamed right now


def remove_partial_saves(run_dir: str | os.PathLike, min_age: float = 0) -> None:
    """Delete `.tmp-` directories left by interrupted saves (only while no other run uses the directory)."""
    root = Path(run_dir) / CHECKPOINTS
    for partial in root.glob(TMP_PREFIX + "*") if root.is_dir() else []:
        if partial.is_dir() and partial.stat().st_mtime <= time.time() - min_age:
            shutil.rmtree(partial, ignore_errors=True)


def read_manifest(path: Path) -> dict:
    """The manifest of a checkpoint directory, or CheckpointError naming what is wrong with it."""
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
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ValueError("not a manifest")
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint {path}: {COMPLETE} is damaged ({err}); delete the directory and resume "
                              "from an earlier one") from None
    return manifest


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check every file against the manifest (size, then SHA-256); return it, or raise CheckpointError naming the file."""
    path = Path(path)
    manifest = read_manifest(path)
    for name, entry in manifest["files"].items():
        expected = entry if isinstance(entry, dict) else {"bytes": entry}  # manifests from before checksums
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} is missing; delete the directory and "
                                  "resume from an earlier checkpoint")
        if file.stat().st_size != expected["bytes"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} has {file.stat().st_size} bytes, the "
                                  f"manifest says {expected['bytes']} (truncated?); delete the directory and resume "
                                  "from an earlier checkpoint")
        if "sha256" in expected and sha256(file) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: the SHA-256 of {name} differs from the manifest's "
                                  "(the file was altered after the save); delete the directory and resume from an "
                                  "earlier checkpoint")
    return manifest


def resume_candidates(run_dir: str | os.PathLike, resume: str | None) -> list[Path]:
    """The checkpoints to try, in order: the given path, or for 'auto' the live line, newest first."""
    if resume is None:
        return []
    if resume != "auto":
        return [Path(resume)]
    manifests = readable_manifests(run_dir)
    if not manifests:
        return []
    line = [next(reversed(manifests))]
    while (parent := manifests[line[-1]].get("parent")) is not None:
        path = Path(run_dir) / CHECKPOINTS / parent["name"]
        if manifests.get(path, {}).get("serial", 0) != parent["serial"]:
            break  # pruned, or replaced by a later line's save of the same step
        line.append(path)
    if "parent" not in manifests[line[-1]]:  # written before lineage was recorded: those, newest step first
        line += [p for p in reversed(manifests) if "parent" not in manifests[p] and p not in line]
    return line


def find_resume(run_dir: str | os.PathLike, resume: str | None) -> Path | None:
    """The checkpoint to resume from: None, the newest intact one of the live line for 'auto', or the given path."""
    candidates = resume_candidates(run_dir, resume)
    problems = []
    for candidate in candidates:
        try:
            verify_checkpoint(candidate)
            return candidate
        except CheckpointError as err:
            if resume != "auto":
                raise
            log.warning("skipping %s; falling back to the previous checkpoint of this run", err)
            problems.append(str(err))
    if problems or list_checkpoints(run_dir):
        raise no_usable_checkpoint(run_dir, problems)
    return None


def no_usable_checkpoint(run_dir, problems: list[str]) -> CheckpointError:
    return CheckpointError(f"no usable checkpoint in {Path(run_dir) / CHECKPOINTS}: {'; '.join(problems) or 'none is complete'}. "
                           "Resume from a checkpoint directory explicitly (train.resume=<dir>), or move the "
                           "checkpoints away to start anew")


def load_checkpoint(accelerator: Accelerator, path: Path, ema=None) -> dict:
    """Restore model, optimizer, scheduler, RNG (and EMA) from a verified `path`; return this rank's trainer state.

    Every pickle in the checkpoint is checked against the allowlist first and then read weights-only (accelerate's
    and DeepSpeed's own torch.load calls included)."""
    manifest = read_manifest(path)
    if manifest["world_size"] != accelerator.num_processes:
        raise CheckpointError(f"checkpoint {path} was written by {manifest['world_size']} processes, this run has "
                              f"{accelerator.num_processes}; resume with the same number of processes (ZeRO shards "
                              "and per-rank data positions depend on it), or `scaling export` it and start anew")
    check_pickles(path)
    try:
        with weights_only_loads():
            accelerator.load_state(str(path))
        if ema is not None:
            ema.load(path / EMA_FILE)
        return json.loads((path / f"trainer_state_rank{accelerator.process_index}.json").read_text())
    except Exception as err:  # deep library errors become one clear message naming the checkpoint
        raise CheckpointError(f"checkpoint {path} could not be loaded: {type(err).__name__}: {err}") from err


# ---------------------------------------------------------------------------------------------------------------------
# Export: a consolidated save_pretrained directory


def save_run_model_info(run_dir: str | os.PathLike, model_config, tokenizer) -> None:
    """Everything `scaling export` needs besides the weights: the model config and the tokenizer (rank 0)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    replace_atomically(run_dir / MODEL_CONFIG, model_config.to_json_file)
    replace_atomically(run_dir / TOKENIZER_DIR, tokenizer.save_pretrained)


def replace_atomically(target: Path, write) -> None:
    """Write a file or directory through `write(tmp)` and rename it into place; an identical copy stays untouched."""
    tmp = target.with_name(TMP_PREFIX + target.name)
    _remove(tmp)
    write(tmp)
    if target.exists() and same_content(tmp, target):
        _remove(tmp)
        return
    old = target.with_name(TMP_PREFIX + target.name + ".old")
    if target.exists():
        _remove(old)
        os.replace(target, old)
    os.replace(tmp, target)
    _remove(old)


def same_content(a: Path, b: Path) -> bool:
    if a.is_file() or b.is_file():
        return a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()
    files = lambda d: {str(p.relative_to(d)): p for p in d.rglob("*") if p.is_file()}  # noqa: E731
    left, right = files(a), files(b)
    return left.keys() == right.keys() and all(left[k].read_bytes() == right[k].read_bytes() for k in left)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def export_from_run(accelerator: Accelerator, model, tokenizer, out_dir: str | os.PathLike, merge: bool = True) -> Path:
    """Gather the trained weights (any ZeRO stage) and write save_pretrained + tokenizer (every rank calls this).

    PEFT runs write `adapter/`, and with `merge` the merged model next to it when the adapters can be merged
    (not prefix methods, not quantised bases, not ZeRO-3 shards: use `scaling export --merge` for those).
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(TMP_PREFIX + out_dir.name)
    plain = unwrapped(accelerator, model)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    peft = _is_peft(plain)
    if peft:
        from scaling.adapters import save_adapter

        save_adapter(plain, tmp / "adapter", accelerator.is_main_process)  # every rank: gathers under ZeRO-3
    sharded = any(getattr(p, "ds_numel", p.numel()) != p.numel() for p in plain.parameters())
    merge = peft and merge and not sharded
    state_dict = accelerator.get_state_dict(model) if not peft else None  # ZeRO-3: gathered onto rank 0
    if state_dict is not None:  # accelerate names a compiled model's weights `_orig_mod.<name>`
        consume_prefix_in_state_dict_if_present(state_dict, "_orig_mod.")
    if accelerator.is_main_process:
        if merge:
            _save_merged(plain, tmp)
        elif not peft:
            plain.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
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


def _finish_export(tokenizer, tmp: Path, out_dir: Path, run_dir: Path | None = None) -> None:
    """Add the tokenizer and the run's inference settings, and move the finished directory into place."""
    tokenizer.save_pretrained(tmp)
    write_inference_settings(tmp, run_dir or out_dir.parent)  # what `scaling infer` and evaluation need
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    log.info("exported %s", out_dir)


def _is_peft(model) -> bool:
    return getattr(model, "peft_args", None) is not None


def export_checkpoint(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                      checkpoint: str | os.PathLike | None = None, merge: bool = False,
                      trust_pickle: bool = False) -> Path:
    """Offline export in one process: newest checkpoint of `run_dir` (DDP or any ZeRO stage) → save_pretrained dir.

    PEFT runs write the adapter under `adapter/`, and with `merge=True` also the merged full model. Pickled shards
    are read weights-only with the allowlist unless `trust_pickle`.
    """
    from scaling.config import load_config
    from scaling.models.biomedgpt import BiomedGPTConfig, BiomedGPTForConditionalGeneration
    from scaling.models.biomedgpt.tokenization import load_tokenizer

    run_dir = Path(run_dir)
    path = find_resume(run_dir, str(checkpoint) if checkpoint else "auto")
    if path is None:
        raise CheckpointError(f"{run_dir} has no complete checkpoint under {CHECKPOINTS}/; train with "
                              "train.save_every set, or pass --checkpoint")
    cfg = load_config(run_dir / "config.yaml")
    model = BiomedGPTForConditionalGeneration(BiomedGPTConfig.from_json_file(run_dir / MODEL_CONFIG))
    if cfg.peft.enabled:
        from scaling.adapters import apply_peft

        model = apply_peft(model, cfg.peft)
    state_dict = read_checkpoint_weights(path, trust_pickle)
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
    _finish_export(load_tokenizer(run_dir / TOKENIZER_DIR), tmp, out, run_dir)
    return out


def read_checkpoint_weights(path: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The model weights of an accelerate checkpoint: model.safetensors (DDP) or fp32 from ZeRO shards (weights-only
    with the allowlist unless `trust_pickle`)."""
    if (path / DEEPSPEED_TAG).is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        check_pickles(path, trust_pickle)
        with weights_only_loads(trust_pickle):
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
