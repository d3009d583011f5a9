"""Find and load the models an evaluation compares: save_pretrained directories, run directories, PEFT adapters.

    model, tokenizer, info = load_for_eval("runs/large/export")
    model, tokenizer, info = load_for_eval("runs/lora/export/adapter", base="checkpoints/biomedgpt-base")
"""

from __future__ import annotations

from pathlib import Path

from scaling.evaluation.report import checkpoint_fingerprint

MODEL_FILE = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
EXPORT_DIR = "export"


class CheckpointNotFound(FileNotFoundError):
    """A path given for evaluation is not a model, run or adapter directory; the message says what is expected."""


def resolve_checkpoint(path: str | Path) -> Path:
    """A model or adapter directory from a model dir, an adapter dir, or a run dir holding `export/`."""
    path = Path(path)
    for candidate in (path, path / EXPORT_DIR):
        if (candidate / MODEL_FILE).is_file() or (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    if (path / EXPORT_DIR / "adapter" / ADAPTER_CONFIG).is_file():
        return path / EXPORT_DIR / "adapter"
    raise CheckpointNotFound(
        f"{path}: not a checkpoint. Expected a save_pretrained directory ({MODEL_FILE} + weights, e.g. from "
        f"`scaling export` or `scaling convert`), a PEFT adapter directory ({ADAPTER_CONFIG}), or a run directory "
        f"with {EXPORT_DIR}/ inside")


def is_adapter(directory: Path) -> bool:
    return (directory / ADAPTER_CONFIG).is_file() and not (directory / MODEL_FILE).is_file()


def checkpoint_name(directory: Path) -> str:
    """A readable name: the run's name for `<run>/export`, the directory name otherwise."""
    if directory.name == "adapter":
        directory = directory.parent
    return directory.parent.name if directory.name == EXPORT_DIR else directory.name


def _base_for(adapter: Path, base: str | Path | None) -> Path:
    """The base model of an adapter: given explicitly, or the export directory the adapter sits in."""
    if base is not None:
        return resolve_checkpoint(base)
    if (adapter.parent / MODEL_FILE).is_file():
        return adapter.parent
    raise CheckpointNotFound(f"{adapter} is a PEFT adapter without a base model next to it; pass the base "
                             "model directory (eval.base_checkpoint=... or --base-checkpoint)")


def find_model_dirs(path: str | Path, base: str | Path | None = None) -> tuple[Path, Path]:
    """(checkpoint directory, directory of the full model it needs): the same for a model, the base for an adapter."""
    directory = resolve_checkpoint(path)
    return directory, _base_for(directory, base) if is_adapter(directory) else directory


def load_for_eval(path: str | Path, base: str | Path | None = None):
    """(model in eval mode, tokenizer, report entry) for a model directory or an adapter on its base."""
    from scaling.models.biomedgpt import BiomedGPTForConditionalGeneration
    from scaling.models.biomedgpt.tokenization import load_tokenizer

    directory, model_dir = find_model_dirs(path, base)
    model = BiomedGPTForConditionalGeneration.from_pretrained(model_dir, local_files_only=True)
    tokenizer = load_tokenizer(model_dir)
    name, fingerprint = checkpoint_name(directory), checkpoint_fingerprint(model_dir)
    if is_adapter(directory):
        from scaling.adapters import load_adapter

        model = load_adapter(model, directory)
        name = f"{checkpoint_name(model_dir)}+{name}"
        fingerprint = f"{fingerprint[:32]}{checkpoint_fingerprint(directory)[:32]}"
    model.eval()
    parameters = sum(p.numel() for p in model.parameters())
    info = {"name": name, "path": str(directory), "base": str(model_dir) if model_dir != directory else None,
            "fingerprint": fingerprint, "parameters": parameters}
    return model, tokenizer, info
