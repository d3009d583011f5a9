"""Find and load the models an evaluation compares: save_pretrained directories, run directories, PEFT adapters;
and the inference settings an export carries.

    model, tokenizer, info = load_for_eval("runs/large/export")
    model, tokenizer, info = load_for_eval("runs/lora/export/adapter", base="checkpoints/biomedgpt-base")
    info["inference"]   # inference.json: prompt layout, lengths, image size, instruction templates, eval decoding

An export written by a training run holds `inference.json` with what the run trained and evaluated with, so that
`scaling infer` and recipes/evaluate.py prompt and decode the model as it was trained; a directory without one (a
converted release) is read with the toolkit's defaults.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from scaling.config import Config, ConfigError, load_config
from scaling.evaluation.report import checkpoint_fingerprint
from scaling.logging import get_logger

log = get_logger(__name__)

MODEL_FILE = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
EXPORT_DIR = "export"
INFERENCE_FILE = "inference.json"
RUN_CONFIG = "config.yaml"
DECODING_KEYS = ("mode", "beam", "max_new_tokens", "length_penalty", "no_repeat_ngram_size", "score_chunk",
                 "score_normalize")
"""The eval.* keys an export records: how its run evaluated it (eval.mode=auto: each task's BiomedGPT decoding)."""


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
            "fingerprint": fingerprint, "parameters": parameters, "inference": read_inference_settings(directory)}
    return model, tokenizer, info


# ---------------------------------------------------------------------------------------------------------------------
# inference.json: what inference needs besides the weights


def inference_settings(cfg: Config, image_size: int | None) -> dict:
    """The settings of a run that decide what its model is asked and how it answers."""
    from scaling.data.instruct import OPEN_WITHOUT_OPTIONS, WITH_OPTIONS

    instruction = None
    if cfg.data.instruction:  # the first template of each family; evaluation draws among them per record
        instruction = {"with_options": WITH_OPTIONS[0], "without_options": OPEN_WITHOUT_OPTIONS[0]}
    return {"prompt_type": cfg.data.prompt_type, "max_src_len": cfg.data.max_src_len,
            "max_tgt_len": cfg.data.max_tgt_len, "image_size": image_size, "instruction": instruction,
            "eval": {k: getattr(cfg.eval, k) for k in DECODING_KEYS}}


def write_inference_settings(export_dir: str | Path, run_dir: str | Path) -> Path | None:
    """Write `inference.json` into an export from its run's resolved config.yaml (None, logged, without one)."""
    export_dir, run_dir = Path(export_dir), Path(run_dir)
    try:
        cfg = load_config(run_dir / RUN_CONFIG)
    except ConfigError as error:
        log.warning("%s not written into %s: %s; `scaling infer` will use the toolkit's defaults", INFERENCE_FILE,
                    export_dir, error)
        return None
    model_config = export_dir / MODEL_FILE
    image_size = json.loads(model_config.read_text())["image_size"] if model_config.is_file() else None
    path = export_dir / INFERENCE_FILE
    path.write_text(json.dumps(inference_settings(cfg, image_size or cfg.model.image_size), indent=2) + "\n")
    return path


def read_inference_settings(directory: str | Path) -> dict:
    """An export's inference.json (its adapter's, else its base model's), or the toolkit's defaults marked
    `"recorded": false`."""
    directory = Path(directory)
    for candidate in (directory, directory.parent) if is_adapter(directory) else (directory,):
        path = candidate / INFERENCE_FILE
        if path.is_file():
            return {**json.loads(path.read_text()), "recorded": True, "file": str(path)}
    return {**inference_settings(Config(), None), "recorded": False}


def settings_config(cfg: Config, settings: dict) -> Config:
    """`cfg` with the prompt layout and lengths an export recorded (a config that says otherwise is logged)."""
    if not settings.get("recorded"):
        return cfg
    recorded = {k: settings[k] for k in ("prompt_type", "max_src_len", "max_tgt_len")}
    differing = {k: getattr(cfg.data, k) for k, v in recorded.items() if getattr(cfg.data, k) != v}
    if differing:
        log.warning("%s: using the trained %s instead of the configured %s", settings["file"],
                    ", ".join(f"{k}={recorded[k]}" for k in differing),
                    ", ".join(f"data.{k}={v}" for k, v in differing.items()))
    if (settings.get("instruction") is not None) != cfg.data.instruction:
        log.warning("%s: the model was trained %s instruction prompts but data.instruction=%s; set "
                    "data.instruction=%s to ask it as it was trained", settings["file"],
                    "with" if settings.get("instruction") else "without", cfg.data.instruction,
                    str(not cfg.data.instruction).lower())
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **recorded))
