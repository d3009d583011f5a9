"""Load checkpoints without running arbitrary code: safetensors, or `torch.load(weights_only=True)` with a narrow allowlist.

A pickle (`.pt`, `.bin`, `.pkl`) can call any Python function while it is read. PyTorch's weights-only unpickler only
builds tensors and plain containers; fairseq checkpoints (OFA, BiomedGPT) additionally store their training arguments
as an `argparse.Namespace`, numpy scalars in `extra_state`, and in some versions an omegaconf `DictConfig`. Training
checkpoints hold numpy arrays (accelerate's `random_states_*.pkl`) and three passive DeepSpeed records (the ZeRO stage
enum, the loss scaler, fragment addresses). Exactly those classes are allowlisted below: each is a passive data holder
whose reconstruction cannot reach a file, a process or an import. Anything else is refused with the list of the
offending globals.

Training checkpoints are read by accelerate and DeepSpeed, whose own `torch.load` calls ask for full unpickling.
`check_pickles` reads the opcodes of every pickle in a checkpoint without running them and refuses the checkpoint
before any load; `weights_only_loads()` then forces every `torch.load` inside it to be weights-only.

`trust_pickle=True` (`--trust-pickle` on the command line) is the only way around the allowlist. It runs the full
pickle machinery and therefore any code the file contains: use it only for a file whose origin you trust.
"""

import argparse
import collections
import contextlib
import json
import os
import pickle
import re
import typing
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

from scaling.logging import get_logger

logger = get_logger(__name__)

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TRUST_HINT = (
    "If you trust the file's origin, load it with --trust-pickle (trust_pickle=True), which can execute code stored in "
    "it; otherwise ask its author for a safetensors copy."
)


class CheckpointLoadError(RuntimeError):
    """A checkpoint file that cannot be read: missing, truncated, corrupt, or refused as unsafe."""


def _numpy_scalar_globals() -> list:
    """numpy scalars and their dtypes, as fairseq's `extra_state` (best, val_loss) stores them."""
    scalar = np._core.multiarray.scalar
    dtypes = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.float16, np.float32, np.float64)
    # checkpoints written under numpy 1.x name the scalar constructor `numpy.core.multiarray.scalar`
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *(type(np.dtype(t)) for t in dtypes)]


def _omegaconf_globals() -> list:
    """omegaconf containers of plain values (fairseq `cfg`), when omegaconf is installed; empty otherwise."""
    try:
        from omegaconf import DictConfig, ListConfig, base, nodes
    except ImportError:
        return []
    value_nodes = [nodes.AnyNode, nodes.StringNode, nodes.IntegerNode, nodes.FloatNode, nodes.BooleanNode]
    # type objects appear as ContainerMetadata.key_type/element_type; defaultdict holds omegaconf's flag cache
    type_markers = [typing.Any, typing.List, typing.Dict, dict, list, int, float, bool, str, collections.defaultdict]  # noqa: UP006
    return [DictConfig, ListConfig, base.ContainerMetadata, base.Metadata, *value_nodes, *type_markers]


def fairseq_safe_globals() -> list:
    """The allowlist for fairseq/OFA checkpoints: Namespace, numpy scalars, and omegaconf containers if importable."""
    return [argparse.Namespace, *_numpy_scalar_globals(), *_omegaconf_globals()]


def _numpy_array_globals() -> list:
    """numpy arrays (the RNG state in accelerate's random_states_*.pkl) and their dtypes."""
    rebuild = np._core.multiarray._reconstruct
    # arrays written under numpy 1.x name the rebuild function `numpy.core.multiarray._reconstruct`
    return [np.ndarray, rebuild, (rebuild, "numpy.core.multiarray._reconstruct"), np.dtype,
            type(np.dtype(np.uint32))]


def _deepspeed_globals() -> list:
    """DeepSpeed's passive records in ZeRO optimizer states, when DeepSpeed is installed; empty otherwise."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def training_safe_globals() -> list:
    """The allowlist for this toolkit's training checkpoints (accelerate and DeepSpeed states)."""
    return [*_numpy_scalar_globals(), *_numpy_array_globals(), *_deepspeed_globals()]


TRAINING_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt")


def check_pickles(directory: str | Path, trust_pickle: bool = False) -> None:
    """Refuse a training checkpoint any of whose pickles needs a global outside the allowlist (opcodes read, not run)."""
    if trust_pickle:
        return
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file() and path.suffix in TRAINING_PICKLE_SUFFIXES:
            blocked = unsafe_globals(path, training_safe_globals())
            if blocked:
                raise CheckpointLoadError(
                    f"Refused to load {path}: it needs Python objects outside the safe allowlist "
                    f"({', '.join(blocked)}), and unpickling them could run code. Training checkpoints written by "
                    "this toolkit never do: the file was replaced or damaged. Resume from another checkpoint; if you "
                    "trust this one anyway, `scaling export --trust-pickle RUN_DIR --checkpoint DIR` exports its weights")


def unsafe_globals(path: Path, allowlist: list) -> list[str]:
    """The globals a torch.save file names beyond `allowlist` and torch's own safe set (a static read)."""
    try:
        with torch.serialization.safe_globals(allowlist):
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception as error:  # not a torch zip archive (a raw pickle), or a damaged one
        raise CheckpointLoadError(
            f"Refused to load {path}: it is not a torch.save archive whose contents can be checked before loading "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'unreadable'}); checkpoints "
            "written by this toolkit always are. Resume from another checkpoint, or export a trusted one with "
            "`scaling export --trust-pickle`") from None


@contextlib.contextmanager
def weights_only_loads(trust_pickle: bool = False) -> typing.Iterator[None]:
    """Inside, every torch.load (ours, accelerate's, DeepSpeed's) is weights-only with `training_safe_globals()`."""
    if trust_pickle:
        logger.warning("Loading a checkpoint with unrestricted pickles (trust_pickle=True): any code stored in its "
                       "files runs now. Only do this for files from a source you trust.")
        yield
        return
    saved = {name: os.environ.pop(name, None) for name in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD",
                                                           "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"  # torch.load reads it at every call, over weights_only=False
    try:
        with torch.serialization.safe_globals(training_safe_globals()):
            yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def load_pickle_checkpoint(path: str | Path, trust_pickle: bool = False) -> typing.Any:
    """Read a torch pickle checkpoint to CPU, refusing anything outside `fairseq_safe_globals()` unless trusted."""
    path = _existing_file(path)
    if trust_pickle:
        logger.warning(
            f"Loading {path} with an unrestricted pickle (trust_pickle=True): any code stored in this file runs now. "
            "Only do this for files from a source you trust."
        )
        return _read_or_explain(path, lambda: torch.load(path, map_location="cpu", weights_only=False))
    with torch.serialization.safe_globals(fairseq_safe_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            blocked = _blocked_globals(path, str(error))
            if not blocked:
                raise _corrupt(path, error) from None
            raise CheckpointLoadError(
                f"Refused to load {path}: it needs Python objects outside the safe allowlist "
                f"({', '.join(blocked)}), and unpickling them could run code. {TRUST_HINT}"
            ) from None
        except Exception as error:  # torch reports damaged files as RuntimeError, EOFError, KeyError, ...
            raise _corrupt(path, error) from None


def load_state_dict_file(
    path: str | Path, weights: str = "model", trust_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """Load a flat state dict from .safetensors, .bin/.pt (plain or fairseq checkpoint), or an HF model directory.

    `weights="ema"` selects fairseq's EMA copy (`extra_state["ema"]`, with `ema_fp32_params` on top when stored).
    """
    path = Path(path)
    if weights != "model" and (path.is_dir() or path.suffix == ".safetensors"):
        raise CheckpointLoadError(f"{path} has no EMA copy: EMA weights live only in fairseq .pt checkpoints.")
    if path.is_dir():
        return _load_model_directory(path, trust_pickle)
    if path.suffix == ".safetensors":
        path = _existing_file(path)
        return _read_or_explain(path, lambda: load_safetensors(str(path)))
    if path.suffix not in PICKLE_SUFFIXES:
        raise CheckpointLoadError(
            f"Unknown checkpoint type {path}: expected .safetensors, one of {', '.join(PICKLE_SUFFIXES)}, "
            "or a directory written by save_pretrained."
        )
    return select_weights(load_pickle_checkpoint(path, trust_pickle), path, weights)


def select_weights(checkpoint: typing.Any, path: Path, weights: str = "model") -> dict[str, torch.Tensor]:
    """Pick the tensors out of a loaded checkpoint: a plain state dict, or fairseq's `model` / EMA entries."""
    if not isinstance(checkpoint, dict):
        raise CheckpointLoadError(f"{path} holds a {type(checkpoint).__name__}, not a state dict or a checkpoint dict.")
    if weights == "ema":
        extra = checkpoint.get("extra_state") or {}
        if "ema" not in extra:
            raise CheckpointLoadError(
                f"{path} has no EMA weights (extra_state['ema'], written by fairseq --store-ema); "
                f"extra_state keys: {sorted(extra)}. Convert the regular weights instead (weights='model')."
            )
        return {**extra["ema"], **extra.get("ema_fp32_params", {})}
    if weights != "model":
        raise ValueError(f"weights must be 'model' or 'ema', got {weights!r}")
    if "model" in checkpoint and isinstance(checkpoint["model"], dict):
        return checkpoint["model"]
    if all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        return checkpoint
    raise CheckpointLoadError(
        f"{path} is neither a state dict nor a fairseq checkpoint with a 'model' entry; top-level keys: "
        f"{sorted(map(str, checkpoint))[:20]}."
    )


def _load_model_directory(directory: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    """Load the weights of a save_pretrained directory (single file or sharded with an index)."""
    for name in HF_WEIGHT_FILES:
        if (directory / name).is_file():
            break
    else:
        raise CheckpointLoadError(
            f"No model weights in {directory}: expected one of {', '.join(HF_WEIGHT_FILES)}. "
            "Point to a directory written by save_pretrained, or to the weight file itself."
        )
    if not name.endswith(".index.json"):
        return load_state_dict_file(directory / name, trust_pickle=trust_pickle)
    index = json.loads((directory / name).read_text(encoding="utf-8"))
    state_dict = {}
    for shard in sorted(set(index["weight_map"].values())):
        state_dict.update(load_state_dict_file(directory / shard, trust_pickle=trust_pickle))
    return state_dict


def _existing_file(path: str | Path) -> Path:
    """The path as a Path, or a clear error when no such file exists."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointLoadError(f"Checkpoint file not found: {path}")
    return path


def _read_or_explain(path: Path, read: typing.Callable[[], typing.Any]) -> typing.Any:
    """Run a reader, turning low-level decoding errors into one clear error naming the file."""
    try:
        return read()
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError) as error:
        raise _corrupt(path, error) from None


def _corrupt(path: Path, error: BaseException) -> CheckpointLoadError:
    """The error for a truncated or damaged file, keeping the reader's own reason in one line."""
    first_sentence = str(error).strip().split("\n")[0].split(". ")[0]
    reason = f"{type(error).__name__}: {first_sentence}".rstrip(": ")
    return CheckpointLoadError(
        f"Cannot read {path} ({path.stat().st_size:,} bytes): the file is truncated or corrupt ({reason}). "
        "Copy or download it again and compare its size or checksum with the original."
    )


def _blocked_globals(path: Path, message: str) -> list[str]:
    """Names of the globals the weights-only unpickler refused (from the archive, else from the error message)."""
    allowed = {name for name in map(_global_name, fairseq_safe_globals())}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy (non-zip) format or unreadable archive: fall back to the unpickler's message
        found = re.findall(r"GLOBAL ([\w.]+)", message, flags=re.IGNORECASE)
    return sorted(set(found) - allowed)


def _global_name(entry: typing.Any) -> str:
    """The dotted name under which a safe-globals entry is matched."""
    if isinstance(entry, tuple):
        return entry[1]
    return f"{getattr(entry, '__module__', 'builtins')}.{getattr(entry, '__qualname__', getattr(entry, '_name', ''))}"
