"""The architecture a checkpoint declares in its own config, as BiomedGPTConfig fields.

Sources, in the order `convert_checkpoint` looks for them:
    fairseq `.pt`       `cfg["model"]` (an argparse Namespace or a dict; fairseq >= 0.10) plus `cfg["task"]`,
                        or the legacy `args` Namespace holding both
    HF-port directory   `config.json` (OFA-Sys/OFA branch feature/add_transformers `OFAConfig`)
    ours                `config.json` with model_type "biomedgpt"

Each source is read into the same fields; a field the file does not hold is taken from the tensor shapes and index
buffers, else from our defaults (which are OFA's). Saved fairseq arguments hold every field of the `ofa_*` arch
functions, and `OFAConfig`'s defaults are the supported values, so nothing the checkpoint was built with is guessed.
Options our model does not implement (entangled position embeddings, post-LN layers, sqrt(d) embedding scale, untied
embeddings, adapters, prompt tuning, position interpolation, ...) are refused with the field name and its value;
options without effect on the weights or on inference (optimizer, freezing, layer drop) are not read.
"""

import json
from argparse import Namespace
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .configuration import RESNET50, RESNET101, RESNET152


class ConversionError(ValueError):
    """A checkpoint that does not map onto the BiomedGPT model; the message names the file, field or key."""


RESNET_STAGES = {"resnet50": RESNET50, "resnet101": RESNET101, "resnet152": RESNET152}
# fairseq activation names -> transformers ACT2FN names (gelu_accurate/gelu_fast are the tanh approximation)
ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "gelu_accurate": "gelu_new", "gelu_fast": "gelu_new", "tanh": "tanh"}

# fairseq model argument -> our field (same value)
FAIRSEQ_FIELDS = {
    "encoder_embed_dim": "d_model",
    "encoder_layers": "encoder_layers",
    "decoder_layers": "decoder_layers",
    "encoder_attention_heads": "encoder_attention_heads",
    "decoder_attention_heads": "decoder_attention_heads",
    "encoder_ffn_embed_dim": "encoder_ffn_dim",
    "decoder_ffn_embed_dim": "decoder_ffn_dim",
    "max_source_positions": "max_positions",
    "token_bucket_size": "token_bucket_size",
    "image_bucket_size": "image_bucket_size",
    "attn_scale_factor": "attn_scale_factor",
    "code_image_size": "code_image_size",
    "dropout": "dropout",
    "attention_dropout": "attention_dropout",
    "activation_dropout": "activation_dropout",
    "encoder_drop_path_rate": "encoder_drop_path_rate",
    "decoder_drop_path_rate": "decoder_drop_path_rate",
    "resnet_drop_path_rate": "resnet_drop_path_rate",
}
# fairseq task argument -> our field: the resolution the checkpoint was trained at
FAIRSEQ_TASK_FIELDS = {"patch_image_size": "image_size"}
# fairseq arguments that must hold this value for our model to compute what fairseq computes
FAIRSEQ_REQUIRED = {
    "encoder_normalize_before": True,
    "decoder_normalize_before": True,
    "no_scale_embedding": True,
    "layernorm_embedding": True,
    "patch_layernorm_embedding": True,
    "code_layernorm_embedding": True,
    "add_type_embedding": True,
    "entangle_position_embedding": False,
    "disable_entangle": True,  # without it fairseq's decoder adds its position embeddings to the tokens
    "share_all_embeddings": True,
    "share_decoder_input_output_embed": True,
    "scale_resids": False,
    "adapter": False,
    "encoder_prompt": False,
    "decoder_prompt": False,
    "interpolate_position": False,
}
NORMFORMER_FLAGS = ("scale_attn", "scale_fc", "scale_heads")

# HF-port config.json key -> our field (same value)
HF_PORT_FIELDS = {
    "vocab_size": "vocab_size",
    "d_model": "d_model",
    "encoder_layers": "encoder_layers",
    "decoder_layers": "decoder_layers",
    "encoder_attention_heads": "encoder_attention_heads",
    "decoder_attention_heads": "decoder_attention_heads",
    "encoder_ffn_dim": "encoder_ffn_dim",
    "decoder_ffn_dim": "decoder_ffn_dim",
    "max_position_embeddings": "max_positions",
    "token_bucket_size": "token_bucket_size",
    "image_bucket_size": "image_bucket_size",
    "attn_scale_factor": "attn_scale_factor",
    "code_image_size": "code_image_size",
    "normformer": "normformer",
    "dropout": "dropout",
    "attention_dropout": "attention_dropout",
    "activation_dropout": "activation_dropout",
    "encoder_drop_path_rate": "encoder_drop_path_rate",
    "decoder_drop_path_rate": "decoder_drop_path_rate",
    "resnet_drop_path_rate": "resnet_drop_path_rate",
    "init_std": "init_std",
}
HF_PORT_REQUIRED = {
    "encoder_normalize_before": True,
    "decoder_normalize_before": True,
    "scale_embedding": False,
    "layernorm_embedding": True,
    "patch_layernorm_embedding": True,
    "code_layernorm_embedding": True,
    "add_type_embedding": True,
    "entangle_position_embedding": False,
    "share_decoder_input_output_embed": True,
}
# our own config.json: the fields that shape the weights or the forward pass
OUR_FIELDS = (
    *sorted(set(FAIRSEQ_FIELDS.values()) | set(HF_PORT_FIELDS.values())),
    "image_size",
    "resnet_layers",
    "resnet_width",
    "activation_function",
    "token_bucket_max_position",
)


@dataclass
class DeclaredArchitecture:
    """Fields a checkpoint's own config declares, and where each was read (for errors and conversion.json)."""

    origin: str
    fields: dict[str, Any] = field(default_factory=dict)
    read_from: dict[str, str] = field(default_factory=dict)
    # task-level vocabulary layout (fairseq code_dict_size / num_bins), checked against the tokenizer
    symbol_counts: dict[str, int] = field(default_factory=dict)

    def set(self, ours: str, value: Any, key: str) -> None:
        """Record one field read from `key` of the source."""
        self.fields[ours] = value
        self.read_from[ours] = key


def fairseq_architecture(checkpoint: Mapping, path: Path) -> DeclaredArchitecture | None:
    """The model arguments of a fairseq checkpoint (`cfg["model"]`, else `args`), or None when it has neither."""
    cfg = as_dict(checkpoint.get("cfg"))
    model, task, model_key, task_key = as_dict(cfg.get("model")), as_dict(cfg.get("task")), "cfg.model", "cfg.task"
    if not model:
        model = task = as_dict(checkpoint.get("args"))
        model_key = task_key = "args"
    if not model:
        return None
    declared = DeclaredArchitecture(origin=f"{path} ({model_key})")
    refuse_unsupported(model, FAIRSEQ_REQUIRED, declared.origin)
    require_equal(model, "decoder_embed_dim", "encoder_embed_dim", declared.origin)
    require_equal(model, "max_target_positions", "max_source_positions", declared.origin)
    for key, ours in FAIRSEQ_FIELDS.items():
        if key in model:
            declared.set(ours, model[key], f"{model_key}.{key}")
    for key, ours in FAIRSEQ_TASK_FIELDS.items():
        if key in task:
            declared.set(ours, task[key], f"{task_key}.{key}")
    if any(key in model for key in NORMFORMER_FLAGS):
        declared.set("normformer", normformer(model, declared.origin), f"{model_key}.{'/'.join(NORMFORMER_FLAGS)}")
    if "activation_fn" in model:
        declared.set(
            "activation_function", activation(model["activation_fn"], declared.origin), f"{model_key}.activation_fn"
        )
    if "resnet_type" in model:
        declared.set("resnet_layers", resnet_stages(model["resnet_type"], declared.origin), f"{model_key}.resnet_type")
    declared.symbol_counts = {key: task[key] for key in ("code_dict_size", "num_bins") if key in task}
    return declared


def hf_config_architecture(config_json: Path) -> DeclaredArchitecture:
    """The architecture in an HF-port (model_type "ofa") or our own (model_type "biomedgpt") config.json."""
    try:
        config = json.loads(config_json.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ConversionError(f"Cannot read {config_json}: {error}. Fix or remove the file.") from None
    declared = DeclaredArchitecture(origin=str(config_json))
    if config.get("model_type") == "biomedgpt":
        for key in OUR_FIELDS:
            if key in config:
                declared.set(key, config[key], key)
        return declared
    refuse_unsupported(config, HF_PORT_REQUIRED, declared.origin)
    for key, ours in HF_PORT_FIELDS.items():
        if key in config:
            declared.set(ours, config[key], key)
    if "activation_function" in config:
        declared.set(
            "activation_function", activation(config["activation_function"], declared.origin), "activation_function"
        )
    if "resnet_type" in config:
        declared.set("resnet_layers", resnet_stages(config["resnet_type"], declared.origin), "resnet_type")
    return declared


def as_dict(value: Any) -> dict:
    """A Namespace, dict or omegaconf DictConfig as a plain dict; anything else as {}."""
    if isinstance(value, Namespace):
        return vars(value)
    if isinstance(value, Mapping) or hasattr(value, "items"):
        return dict(value.items())
    return {}


def refuse_unsupported(arguments: Mapping, required: Mapping, origin: str) -> None:
    """Fail naming every argument whose value changes the computation in a way our model does not implement."""
    wrong = [
        f"{key}={arguments[key]!r} (supported: {value!r})"
        for key, value in required.items()
        if key in arguments and bool(arguments[key]) != value  # argparse leaves unset flags False or None
    ]
    if wrong:
        raise ConversionError(
            f"{origin} declares options the BiomedGPT model does not implement: {', '.join(wrong)}. "
            "Converting it would change its outputs; such checkpoints cannot be converted."
        )


def require_equal(arguments: Mapping, key: str, other: str, origin: str) -> None:
    """Fail when two arguments our model ties into one field differ."""
    if key in arguments and other in arguments and arguments[key] != arguments[other]:
        raise ConversionError(
            f"{origin}: {key}={arguments[key]} differs from {other}={arguments[other]}, but BiomedGPT uses one value "
            f"for both; such checkpoints cannot be converted."
        )


def normformer(arguments: Mapping, origin: str) -> bool:
    """fairseq --scale-attn --scale-fc --scale-heads, which our config switches together as `normformer`."""
    flags = {key: bool(arguments.get(key, False)) for key in NORMFORMER_FLAGS}
    if len(set(flags.values())) > 1:
        raise ConversionError(
            f"{origin}: NormFormer options {flags} are mixed; BiomedGPT supports all three on (OFA, BiomedGPT) or all "
            "three off."
        )
    return flags["scale_attn"]


def activation(name: str, origin: str) -> str:
    """Our (transformers ACT2FN) activation name for a fairseq one, or for one already in ACT2FN terms (HF port)."""
    if name in ACTIVATIONS:
        return ACTIVATIONS[name]
    if name in ACTIVATIONS.values():
        return name
    supported = sorted(set(ACTIVATIONS) | set(ACTIVATIONS.values()))
    raise ConversionError(f"{origin}: activation {name!r} is not supported (supported: {', '.join(supported)})")


def resnet_stages(resnet_type: str, origin: str) -> list[int]:
    """Bottleneck blocks per stage for an OFA resnet_type."""
    if resnet_type in RESNET_STAGES:
        return list(RESNET_STAGES[resnet_type])
    raise ConversionError(
        f"{origin}: resnet_type {resnet_type!r} is not supported: BiomedGPT's image embedder is the bottleneck ResNet "
        f"of {', '.join(RESNET_STAGES)} (resnet18/34 use basic blocks, ViT-B/16 is not a ResNet)."
    )
