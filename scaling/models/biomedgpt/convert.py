"""Convert fairseq (OFA / BiomedGPT `.pt`) and OFA-HF-port (`pytorch_model.bin`) checkpoints to a BiomedGPT directory.

Key map, applied to whole dot-separated name segments (fairseq names: OFA-Sys/OFA `models/ofa/unify_transformer_layer.py`;
HF-port names: OFA's `feature/add_transformers` branch, `modeling_ofa.py`):

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

Architecture fields come from three places, cross-checked where they overlap (a disagreement names the field):
    tensor shapes        vocabulary, width, layers, heads, FFN sizes, ResNet stages and stem, max_positions (both
                         position tables), token/image bucket sizes, NormFormer
    index buffers        token_rp_bucket's side: the range of OFA's token-bucket formula, which OFA fixes at 1024
                         whatever max_source_positions is; image_position_idx's length: code_image_size
    the checkpoint's     fairseq `cfg`/`args`, or config.json beside HF-port weights (checkpoint_config.py): the same
    own config           fields plus code_image_size, attn_scale_factor, activation, dropout rates, the training
                         resolution, and the options our model must refuse

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
from scaling.safe_load import PICKLE_SUFFIXES, load_pickle_checkpoint, load_state_dict_file, select_weights

from .checkpoint_config import ConversionError, DeclaredArchitecture, fairseq_architecture, hf_config_architecture
from .configuration import PRESETS, BiomedGPTConfig
from .modeling import (
    BiomedGPTForConditionalGeneration,
    code_position_ids,
    image_relative_buckets,
    token_relative_buckets,
)
from .tokenization import FAMILY_TOKEN, load_tokenizer, save_tokenizer

logger = get_logger(__name__)

FAIRSEQ_SEGMENTS = {
    "attn_ln": "self_attn_mid_layer_norm",  # encoder layers (--scale-attn)
    "self_attn_ln": "self_attn_mid_layer_norm",  # decoder layers
    "cross_attn_ln": "cross_attn_mid_layer_norm",
    "ffn_layernorm": "ffn_layer_norm",  # --scale-fc
    "encoder_attn": "cross_attn",
    "encoder_attn_layer_norm": "cross_attn_layer_norm",
}
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
# image_position_idx ends with 769 (OFA main, BiomedGPT) or 768 (HF port) pad entries: BiomedGPT issue #39
IMAGE_POSITION_PADDING = (769, 768)
LOGIT_TOLERANCE = 1e-5


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
    # where the checkpoint's own config was read, and each field taken from it ("source key = value")
    config_source: str | None = None
    config_fields: dict[str, str] = field(default_factory=dict)
    ema_available: bool = False


# --- key map -----------------------------------------------------------------------------------------------------


def our_key(key: str) -> str:
    """Map a fairseq or HF-port key (or one of ours) to our parameter name."""
    key = key.removeprefix("model.")
    return "model." + ".".join(FAIRSEQ_SEGMENTS.get(segment, segment) for segment in key.split("."))


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


# --- configuration from shapes, index buffers and the checkpoint's own config ------------------------------------


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
    max_positions = shape("model.encoder.embed_positions.weight")[0] - 2
    if shape("model.decoder.embed_positions.weight")[0] - 2 != max_positions:
        raise ConversionError(
            f"The decoder has {shape('model.decoder.embed_positions.weight')[0] - 2} positions (max_target_positions) "
            f"and the encoder {max_positions} (max_source_positions); BiomedGPT uses one max_positions for both."
        )
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
        max_positions=max_positions,
        token_bucket_size=(shape("model.encoder.token_rel_pos_table_list.0.weight")[0] + 1) // 2,
        image_bucket_size=math.isqrt(shape("model.encoder.embed_image_positions.weight")[0] - 1),
        normformer="model.encoder.layers.0.self_attn.c_attn" in state_dict,
    )


def buffer_fields(buffers: dict[str, torch.Tensor]) -> dict:
    """Fields OFA's index buffers fix: the token-bucket range (token_rp_bucket's side) and code_image_size."""
    found = {}
    token_buckets = buffers.get("encoder.token_rp_bucket", buffers.get("decoder.token_rp_bucket"))
    if token_buckets is not None:
        found["token_bucket_max_position"] = token_buckets.shape[0]
    if "decoder.image_position_idx" in buffers:
        side = code_grid_side(buffers["decoder.image_position_idx"].shape[0])
        if side:
            found["code_image_size"] = 8 * side
    return found


def code_grid_side(length: int) -> int | None:
    """Side of the code grid in an image_position_idx of 1 + side**2 + 769 (OFA) or + 768 (HF port) entries."""
    for padding in IMAGE_POSITION_PADDING:
        side = math.isqrt(max(0, length - 1 - padding))
        if side and 1 + side * side + padding == length:
            return side
    return None


def check_declared_shape(shape: dict, declared: DeclaredArchitecture) -> None:
    """Fail naming every field where the checkpoint's config contradicts its tensors."""
    wrong = [
        f"{declared.read_from[f]}={declared.fields[f]} but the tensors give {f}={shape[f]}"
        for f in SHAPE_FIELDS
        if f in declared.fields and declared.fields[f] != shape[f]
    ]
    if wrong:
        raise ConversionError(
            f"{declared.origin} does not describe these weights: {'; '.join(wrong)}. Use the config saved with them."
        )


def match_preset(shape: dict, preset: str | None) -> str | None:
    """The preset whose shape equals the checkpoint's (checked against `preset` when given), else None."""
    for name in [preset] if preset else list(PRESETS):
        config = BiomedGPTConfig.from_preset(name)
        differences = {f: (shape[f], getattr(config, f)) for f in SHAPE_FIELDS if shape[f] != getattr(config, f)}
        if not differences:
            return name
        if preset:
            listed = ", ".join(f"{f}: checkpoint {got} vs preset {want}" for f, (got, want) in differences.items())
            raise ConversionError(f"The checkpoint does not have the shape of preset {preset!r}: {listed}")
    return None


def build_config(
    shape: dict, buffers: dict[str, torch.Tensor], declared: DeclaredArchitecture | None, preset: str | None
) -> tuple[BiomedGPTConfig, str | None]:
    """The config of the converted model: preset or shape, then what the buffers fix, then the declared fields."""
    if declared is not None:
        check_declared_shape(shape, declared)
    name = match_preset(shape, preset)
    base = dict(PRESETS[name]) if name else {**shape, "image_size": 16 * min(16, shape["image_bucket_size"])}
    fields = {**base, **buffer_fields(buffers), **(declared.fields if declared else {})}
    if fields.get("token_bucket_max_position") == fields["max_positions"]:
        fields["token_bucket_max_position"] = None  # the formula's default range
    try:
        return BiomedGPTConfig(**fields), name
    except ValueError as error:
        origin = declared.origin if declared else "the checkpoint's tensor shapes"
        raise ConversionError(f"{origin}: {error}") from None


# --- checks on buffers and ties ------------------------------------------------------------------------------------


def expected_buffer(name: str, length: int, config: BiomedGPTConfig) -> torch.Tensor:
    """What the model computes for one of OFA's stored index buffers, at the stored length."""
    positions = torch.arange(length)
    if name.endswith("token_rp_bucket"):
        return token_relative_buckets(positions, positions, config.token_bucket_size, config.token_bucket_positions)
    if name.endswith("image_rp_bucket"):
        return image_relative_buckets(positions, positions, config.image_bucket_size)
    return code_position_ids(length, config.code_image_size, config.image_bucket_size)


def buffer_settings(name: str, config: BiomedGPTConfig) -> str:
    """The config fields an index buffer is computed from, with their values."""
    if name.endswith("token_rp_bucket"):
        return f"token_bucket_size={config.token_bucket_size} over {config.token_bucket_positions} positions"
    if name.endswith("image_rp_bucket"):
        return f"image_bucket_size={config.image_bucket_size}"
    return f"code_image_size={config.code_image_size}, image_bucket_size={config.image_bucket_size}"


def check_buffers(buffers: dict[str, torch.Tensor], config: BiomedGPTConfig) -> dict[str, str]:
    """Verify OFA's index buffers equal what the model computes; return the drop reasons for the report."""
    dropped = {}
    for name, tensor in buffers.items():
        if name in VERSION_KEYS:
            dropped[name] = "fairseq version marker"
            continue
        expected = expected_buffer(name, tensor.shape[0], config)
        if tensor.shape != expected.shape or not torch.equal(tensor.long(), expected):
            side = code_grid_side(tensor.shape[0]) if name.endswith("image_position_idx") else None
            built_for = f" (it holds a {side}x{side} code grid: code_image_size={8 * side})" if side else ""
            raise ConversionError(
                f"{name} {tuple(tensor.shape)}{built_for} differs from the model's own position indices for "
                f"{buffer_settings(name, config)}: the checkpoint's config and its index buffers disagree, or it was "
                "built with position settings BiomedGPT does not implement, so its attention biases would not be "
                "reproduced."
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
    source: dict[str, torch.Tensor], preset: str | None = None, declared: DeclaredArchitecture | None = None
) -> tuple[BiomedGPTForConditionalGeneration, ConversionReport]:
    """Rename, check and load a fairseq / HF-port state dict into a new model (eval mode).

    `declared` is the architecture the checkpoint's own config states (`fairseq_architecture`,
    `hf_config_architecture`); without it the config comes from the tensor shapes and index buffers alone.
    """
    renamed, buffers = rename_keys(source)
    config, preset = build_config(infer_shape(renamed), buffers, declared, preset)
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
        config_source=declared.origin if declared else None,
        config_fields={f: f"{declared.read_from[f]} = {v!r}" for f, v in declared.fields.items()} if declared else {},
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
    state_dict, declared, ema_available = read_checkpoint(source, weights, trust_pickle)
    model, report = convert_state_dict(state_dict, preset, declared)
    check_tokenizer(tokenizer, model.config, declared)
    report.source, report.weights, report.tokenizer_size = str(source), weights, len(tokenizer)
    report.ema_available = ema_available
    logger.info(
        f"{source}: {report.source_format} checkpoint, preset {report.preset or 'custom'}, {report.tensors} tensors; "
        f"{len(report.config_fields)} fields from {report.config_source or 'no config (tensor shapes only)'}; "
        f"dropped {len(report.dropped)} checked buffers, filled {len(report.filled)} absent keys"
    )
    if ema_available and weights == "model":
        logger.info(
            f"{source} also carries EMA weights (what OFA's --ema-eval evaluates): convert them with --weights ema"
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


def read_checkpoint(
    source: Path, weights: str, trust_pickle: bool
) -> tuple[dict[str, torch.Tensor], DeclaredArchitecture | None, bool]:
    """The weights to convert, the architecture the checkpoint's own config declares, and whether it holds EMA weights.

    A fairseq pickle declares it in `cfg`/`args`; other sources (HF-port directory, bare weight file) in a
    config.json beside the weights.
    """
    declared, ema_available = None, False
    if source.suffix in PICKLE_SUFFIXES:
        checkpoint = load_pickle_checkpoint(source, trust_pickle)
        state_dict = select_weights(checkpoint, source, weights)
        declared = fairseq_architecture(checkpoint, source)
        ema_available = "ema" in (checkpoint.get("extra_state") or {})
    else:
        state_dict = load_state_dict_file(source, weights=weights, trust_pickle=trust_pickle)
    config_json = (source if source.is_dir() else source.parent) / "config.json"
    if declared is None and config_json.is_file():
        declared = hf_config_architecture(config_json)
    return state_dict, declared, ema_available


def check_tokenizer(
    tokenizer: PreTrainedTokenizerFast, config: BiomedGPTConfig, declared: DeclaredArchitecture | None
) -> None:
    """The tokenizer must fit the embedding, and carry the <code_i>/<bin_i> counts the checkpoint was trained with."""
    if len(tokenizer) > config.vocab_size:
        raise ConversionError(
            f"The tokenizer has {len(tokenizer)} entries but the checkpoint's embedding only {config.vocab_size} "
            "rows: it belongs to another model. Pass the matching --bpe-dir."
        )
    if declared is None or not declared.symbol_counts:
        return
    symbols = [FAMILY_TOKEN.fullmatch(token) for token in tokenizer.get_vocab()]
    families = [match.group(1) for match in symbols if match]
    found = {"code_dict_size": (families.count("code"), "<code_i>"), "num_bins": (families.count("bin"), "<bin_i>")}
    wrong = [
        f"{key}={count} but the tokenizer has {found[key][0]} {found[key][1]} tokens"
        for key, count in declared.symbol_counts.items()
        if found[key][0] != count
    ]
    if wrong:
        raise ConversionError(
            f"{declared.origin} declares {'; '.join(wrong)}, so their ids would not line up with the embedding rows. "
            "Pass the --bpe-dir of this checkpoint's tokenizer."
        )


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
