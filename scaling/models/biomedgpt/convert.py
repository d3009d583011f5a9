"""Convert fairseq (OFA / BiomedGPT `.pt`) and OFA-HF-port (`pytorch_model.bin`) checkpoints to a BiomedGPT directory.

Key map, applied to whole dot-separated name segments (reference/biomedgpt_ofa.md §2.7):

    fairseq                              HF port                        ours (`model.` + HF-port name)
    encoder.layers.i.attn_ln             self_attn_mid_layer_norm       model.encoder.layers.i.self_attn_mid_layer_norm
    decoder.layers.i.self_attn_ln        self_attn_mid_layer_norm       model.decoder.layers.i.self_attn_mid_layer_norm
    decoder.layers.i.cross_attn_ln       cross_attn_mid_layer_norm      model.decoder.layers.i.cross_attn_mid_layer_norm
    *.layers.i.ffn_layernorm             ffn_layer_norm                 model.*.layers.i.ffn_layer_norm
    decoder.layers.i.encoder_attn        cross_attn                     model.decoder.layers.i.cross_attn
    decoder.layers.i.encoder_attn_layer_norm   cross_attn_layer_norm    model.decoder.layers.i.cross_attn_layer_norm
    everything else                      same                           `model.` + same

Public conversion scripts do these renames as substring replacements, where order matters because `attn_ln` is a
substring of `self_attn_ln` and `cross_attn_ln`; renaming whole segments makes the order irrelevant. The map is
idempotent on HF-port names, so one function serves both sources (and our own `model.`-prefixed names).

Dropped after a check, never silently:
    encoder.version, decoder.version                  fairseq bookkeeping buffers
    {encoder,decoder}.{token,image}_rp_bucket         must equal the model's own `token_relative_buckets` /
                                                      `image_relative_buckets`; the model computes them on the fly
    decoder.image_position_idx                        1026 entries in OFA main/BiomedGPT, 1025 in the HF port (the
                                                      size mismatch of BiomedGPT issue #39); both must equal
                                                      `code_position_ids` on their length, which pads with 1024
Tied weights: `decoder.embed_tokens` and `decoder.output_projection` must equal `encoder.embed_tokens` (fairseq
--share-all-embeddings); a missing copy is filled from it. Any other key the model does not have, or any model key
the checkpoint lacks, stops the conversion with the full list.

Nothing is written until the converted model has been saved to a staging directory, reloaded from disk, and shown to
give the same tensors and logits as the in-memory model; the staging directory is then renamed into place. Weights
are stored in float32 whatever the source precision (fairseq --fp16 checkpoints hold float16 tensors).
"""

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from scaling.logging import get_logger
from scaling.safe_load import load_state_dict_file

from .configuration import PRESETS, BiomedGPTConfig
from .modeling import (
    BiomedGPTForConditionalGeneration,
    code_position_ids,
    image_relative_buckets,
    token_relative_buckets,
)
from .tokenization import load_tokenizer, save_tokenizer

logger = get_logger(__name__)

FAIRSEQ_SEGMENTS = {
    "attn_ln": "self_attn_mid_layer_norm",  # encoder layers (--scale-attn)
    "self_attn_ln": "self_attn_mid_layer_norm",  # decoder layers
    "cross_attn_ln": "cross_attn_mid_layer_norm",
    "ffn_layernorm": "ffn_layer_norm",  # --scale-fc
    "encoder_attn": "cross_attn",
    "encoder_attn_layer_norm": "cross_attn_layer_norm",
}
OURS_TO_FAIRSEQ = {ours: fairseq for fairseq, ours in FAIRSEQ_SEGMENTS.items() if fairseq != "attn_ln"}
VERSION_KEYS = ("encoder.version", "decoder.version")
BUCKET_BUFFERS = (
    "encoder.token_rp_bucket",
    "encoder.image_rp_bucket",
    "decoder.token_rp_bucket",
    "decoder.image_rp_bucket",
    "decoder.image_position_idx",
)
EMBEDDING_KEY = "model.encoder.embed_tokens.weight"
TIED_KEYS = ("model.decoder.embed_tokens.weight", "model.decoder.output_projection.weight")
SHAPE_FIELDS = (
    "vocab_size",
    "d_model",
    "encoder_layers",
    "decoder_layers",
    "encoder_attention_heads",
    "decoder_attention_heads",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "resnet_layers",
    "resnet_width",
    "max_positions",
    "token_bucket_size",
    "image_bucket_size",
    "normformer",
)
LOGIT_TOLERANCE = 1e-5


class ConversionError(ValueError):
    """A checkpoint that does not map onto the BiomedGPT model; the message lists every offending key."""


@dataclass
class ConversionReport:
    """What a conversion did, written as `conversion.json` next to the weights."""

    source: str
    source_format: str
    weights: str
    preset: str | None
    tensors: int
    dropped: dict[str, str] = field(default_factory=dict)
    filled: dict[str, str] = field(default_factory=dict)
    tokenizer_size: int = 0
    max_abs_logit_diff: float = 0.0


# --- key map -----------------------------------------------------------------------------------------------------


def our_key(key: str) -> str:
    """Map a fairseq or HF-port key (or one of ours) to our parameter name."""
    key = key.removeprefix("model.")
    return "model." + ".".join(FAIRSEQ_SEGMENTS.get(segment, segment) for segment in key.split("."))


def fairseq_key(key: str) -> str:
    """Map one of our parameter names back to its fairseq name (the inverse of `our_key` on fairseq keys)."""
    key = key.removeprefix("model.")
    mid_norm = "attn_ln" if key.startswith("encoder.") else "self_attn_ln"
    segments = [mid_norm if s == "self_attn_mid_layer_norm" else OURS_TO_FAIRSEQ.get(s, s) for s in key.split(".")]
    return ".".join(segments)


def source_format(state_dict: dict) -> str:
    """'fairseq' when fairseq-only names appear, 'biomedgpt' for our own names, else 'hf-port'."""
    fairseq_only = set(FAIRSEQ_SEGMENTS) | {"version"}
    if any(fairseq_only & set(key.split(".")) for key in state_dict):
        return "fairseq"
    if all(key.startswith("model.") for key in state_dict):
        return "biomedgpt"
    return "hf-port"


def rename_keys(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a source state dict into renamed model tensors and the bookkeeping buffers (by source name)."""
    renamed, buffers = {}, {}
    for key, tensor in state_dict.items():
        bare = key.removeprefix("model.")
        if bare in VERSION_KEYS or bare in BUCKET_BUFFERS:
            buffers[bare] = tensor
            continue
        new_key = our_key(key)
        if new_key in renamed:
            raise ConversionError(f"Two source keys map to {new_key}: the checkpoint mixes fairseq and HF-port names")
        renamed[new_key] = tensor
    return renamed, buffers


# --- configuration from shapes -----------------------------------------------------------------------------------


def infer_shape(state_dict: dict[str, torch.Tensor]) -> dict:
    """Read the architecture shape off the tensors (our names)."""

    def layer_count(prefix: str) -> int:
        indices = {key[len(prefix) :].split(".")[0] for key in state_dict if key.startswith(prefix)}
        return len({int(i) for i in indices if i.isdigit()})

    def shape(key: str) -> torch.Size:
        if key not in state_dict:
            raise ConversionError(f"Cannot infer the model shape: {key} is missing from the checkpoint")
        return state_dict[key].shape

    vocab_size, d_model = shape(EMBEDDING_KEY)
    heads = shape("model.encoder.token_rel_pos_table_list.0.weight")[1]
    return dict(
        vocab_size=vocab_size,
        d_model=d_model,
        encoder_layers=layer_count("model.encoder.layers."),
        decoder_layers=layer_count("model.decoder.layers."),
        encoder_attention_heads=heads,
        decoder_attention_heads=shape("model.decoder.token_rel_pos_table_list.0.weight")[1],
        encoder_ffn_dim=shape("model.encoder.layers.0.fc1.weight")[0],
        decoder_ffn_dim=shape("model.decoder.layers.0.fc1.weight")[0],
        resnet_layers=[layer_count(f"model.encoder.embed_images.layer{stage}.") for stage in (1, 2, 3)],
        resnet_width=shape("model.encoder.embed_images.conv1.weight")[0],
        max_positions=shape("model.encoder.embed_positions.weight")[0] - 2,
        token_bucket_size=(shape("model.encoder.token_rel_pos_table_list.0.weight")[0] + 1) // 2,
        image_bucket_size=math.isqrt(shape("model.encoder.embed_image_positions.weight")[0] - 1),
        normformer="model.encoder.layers.0.self_attn.c_attn" in state_dict,
    )


def config_for_shape(shape: dict, preset: str | None = None) -> tuple[BiomedGPTConfig, str | None]:
    """The preset whose shape equals the checkpoint's (checked against `preset` when given), else a custom config."""
    candidates = [preset] if preset else list(PRESETS)
    for name in candidates:
        config = BiomedGPTConfig.from_preset(name)
        differences = {f: (shape[f], getattr(config, f)) for f in SHAPE_FIELDS if shape[f] != getattr(config, f)}
        if not differences:
            return config, name
        if preset:
            listed = ", ".join(f"{f}: checkpoint {got} vs preset {want}" for f, (got, want) in differences.items())
            raise ConversionError(f"The checkpoint does not have the shape of preset {preset!r}: {listed}")
    image_size = 16 * min(16, shape["image_bucket_size"])
    return BiomedGPTConfig(**shape, image_size=image_size), None


# --- checks on buffers and ties ------------------------------------------------------------------------------------


def expected_buffer(name: str, length: int, config: BiomedGPTConfig) -> torch.Tensor:
    """What the model computes for one of OFA's stored index buffers, at the stored length."""
    positions = torch.arange(length)
    if name.endswith("token_rp_bucket"):
        return token_relative_buckets(positions, positions, config.token_bucket_size, config.max_positions)
    if name.endswith("image_rp_bucket"):
        return image_relative_buckets(positions, positions, config.image_bucket_size)
    return code_position_ids(length, config.code_image_size, config.image_bucket_size)


def check_buffers(buffers: dict[str, torch.Tensor], config: BiomedGPTConfig) -> dict[str, str]:
    """Verify OFA's index buffers equal what the model computes; return the drop reasons for the report."""
    dropped = {}
    for name, tensor in buffers.items():
        if name in VERSION_KEYS:
            dropped[name] = "fairseq version marker"
            continue
        expected = expected_buffer(name, tensor.shape[0], config)
        if tensor.shape != expected.shape or not torch.equal(tensor.long(), expected):
            raise ConversionError(
                f"{name} {tuple(tensor.shape)} differs from the model's own position indices for token_bucket_size="
                f"{config.token_bucket_size}, image_bucket_size={config.image_bucket_size}, max_positions="
                f"{config.max_positions}, code_image_size={config.code_image_size}: the checkpoint was built with "
                "other position settings, so its attention biases would not be reproduced."
            )
        dropped[name] = f"{tensor.shape[0]}-entry index buffer, equal to the model's own; computed on the fly"
    return dropped


def tie_embeddings(state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """Check the tied copies equal the shared embedding, fill absent ones; return what was filled."""
    filled = {}
    embedding = state_dict[EMBEDDING_KEY]
    for key in TIED_KEYS:
        if key not in state_dict:
            state_dict[key] = embedding
            filled[key] = f"tied to {EMBEDDING_KEY}"
        elif not torch.equal(state_dict[key], embedding):
            raise ConversionError(
                f"{key} differs from {EMBEDDING_KEY}, but the model ties them (fairseq --share-all-embeddings). "
                "This checkpoint was trained with untied embeddings, which BiomedGPT does not use."
            )
    return filled


def fill_batch_counters(state_dict: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, str]:
    """Add BatchNorm `num_batches_tracked` counters that frozen-BN checkpoints (fairseq --freeze-resnet) lack."""
    filled = {}
    for key in model.state_dict():
        if key.endswith(".num_batches_tracked") and key not in state_dict:
            state_dict[key] = torch.tensor(0)
            filled[key] = "absent in the source (FrozenBatchNorm2d); a training counter unused at inference"
    return filled


def check_keys(state_dict: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Fail with the complete lists of unknown keys, missing keys and shape mismatches."""
    expected = model.state_dict()
    unknown = sorted(set(state_dict) - set(expected))
    missing = sorted(set(expected) - set(state_dict))
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state_dict) & set(expected))
        if state_dict[k].shape != expected[k].shape
    ]
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unknown key(s) (names after renaming): {', '.join(unknown)}")
    if missing:
        problems.append(f"{len(missing)} missing key(s): {', '.join(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {'; '.join(mismatched)}")
    if problems:
        raise ConversionError("The checkpoint does not map onto the BiomedGPT model. " + " | ".join(problems))


def convert_state_dict(
    source: dict[str, torch.Tensor], preset: str | None = None
) -> tuple[BiomedGPTForConditionalGeneration, ConversionReport]:
    """Rename, check and load a fairseq / HF-port state dict into a new model (eval mode)."""
    renamed, buffers = rename_keys(source)
    config, preset = config_for_shape(infer_shape(renamed), preset)
    dropped = check_buffers(buffers, config)
    filled = tie_embeddings(renamed)
    model = BiomedGPTForConditionalGeneration(config).eval()
    filled.update(fill_batch_counters(renamed, model))
    check_keys(renamed, model)
    model.load_state_dict(renamed, strict=True)
    report = ConversionReport(
        source="",
        source_format=source_format(source),
        weights="model",
        preset=preset,
        tensors=len(source),
        dropped=dropped,
        filled=filled,
    )
    return model, report


# --- numerical check and atomic write ------------------------------------------------------------------------------


def dummy_batch(config: BiomedGPTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed image + text batch; the second sample has no image (patch_masks False)."""
    generator = torch.Generator().manual_seed(seed)
    size = 16 * min(4, config.image_bucket_size)
    text = torch.randint(4, config.vocab_size, (2, 7), generator=generator)
    input_ids = torch.cat([torch.zeros(2, 1, dtype=torch.long), text, torch.full((2, 1), 2)], dim=1)
    return dict(
        input_ids=input_ids,
        pixel_values=torch.randn(2, 3, size, size, generator=generator),
        patch_masks=torch.tensor([True, False]),
        decoder_input_ids=torch.cat([torch.zeros(2, 1, dtype=torch.long), text[:, :4]], dim=1),
    )


@torch.no_grad()
def verify_reload(model: BiomedGPTForConditionalGeneration, directory: Path) -> float:
    """Reload `directory` and compare every tensor and the logits on `dummy_batch`; return the max logit diff."""
    reloaded = BiomedGPTForConditionalGeneration.from_pretrained(directory, local_files_only=True).eval()
    saved, ours = reloaded.state_dict(), model.state_dict()
    differing = [key for key in ours if key not in saved or not torch.equal(saved[key], ours[key])]
    if differing:
        raise ConversionError(f"Reloading {directory} changed {len(differing)} tensor(s): {', '.join(differing[:20])}")
    batch = dummy_batch(model.config)
    diff = (reloaded(**batch).logits - model(**batch).logits).abs().max().item()
    if not diff <= LOGIT_TOLERANCE:
        raise ConversionError(f"Logits of the reloaded model differ by {diff:.3g} (> {LOGIT_TOLERANCE}) in {directory}")
    return diff


def convert_checkpoint(
    source: str | Path,
    out_dir: str | Path,
    bpe_dir: str | Path | None = None,
    preset: str | None = None,
    weights: str = "model",
    trust_pickle: bool = False,
    overwrite: bool = False,
) -> ConversionReport:
    """Convert a fairseq/HF-port checkpoint into `out_dir` (save_pretrained weights + tokenizer + conversion.json)."""
    source, out_dir = Path(source), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose a new directory or pass overwrite=True (--overwrite)")
    tokenizer = find_tokenizer(source, bpe_dir)
    state_dict = load_state_dict_file(source, weights=weights, trust_pickle=trust_pickle)
    model, report = convert_state_dict(state_dict, preset)
    if len(tokenizer) > model.config.vocab_size:
        raise ConversionError(
            f"The tokenizer has {len(tokenizer)} entries but the checkpoint's embedding only {model.config.vocab_size} "
            "rows: it belongs to another model. Pass the matching --bpe-dir."
        )
    report.source, report.weights, report.tokenizer_size = str(source), weights, len(tokenizer)
    logger.info(
        f"{source}: {report.source_format} checkpoint, preset {report.preset or 'custom'}, {report.tensors} tensors; "
        f"dropped {len(report.dropped)} checked buffers, filled {len(report.filled)} absent keys"
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        save_tokenizer(tokenizer, staging)
        report.max_abs_logit_diff = verify_reload(model, staging)
        (staging / "conversion.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
        replace_directory(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(f"Wrote {out_dir} (reloaded logits match, max abs diff {report.max_abs_logit_diff:.2g})")
    return report


def find_tokenizer(source: Path, bpe_dir: str | Path | None) -> PreTrainedTokenizerFast:
    """The tokenizer from `bpe_dir` when given, else from the checkpoint's own directory."""
    directory = Path(bpe_dir) if bpe_dir else (source if source.is_dir() else source.parent)
    try:
        return load_tokenizer(directory)
    except FileNotFoundError as error:
        raise ConversionError(
            f"{error} Pass --bpe-dir pointing to OFA's utils/BPE (encoder.json, vocab.bpe, dict.txt) or to a "
            "tokenizer directory."
        ) from None


def replace_directory(staging: Path, out_dir: Path) -> None:
    """Move `staging` to `out_dir` by rename (atomic on one filesystem); an existing `out_dir` is swapped out first."""
    share_like_umask(staging)
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    retired = out_dir.with_name(f".{out_dir.name}.replaced-{os.getpid()}")
    out_dir.rename(retired)
    staging.rename(out_dir)
    shutil.rmtree(retired)


def share_like_umask(directory: Path) -> None:
    """Give the staging directory (created 0700 by mkdtemp) and its files the permissions a plain mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)
