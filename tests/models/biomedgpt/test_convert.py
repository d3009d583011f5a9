"""Checkpoint conversion: fairseq and HF-port names round-trip to an identical model; bad input fails loudly."""

import argparse
import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from scaling.cli import main as cli_main
from scaling.models.biomedgpt import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from scaling.models.biomedgpt.checkpoint_config import (
    FAIRSEQ_FIELDS,
    FAIRSEQ_REQUIRED,
    FAIRSEQ_TASK_FIELDS,
    HF_PORT_FIELDS,
    HF_PORT_REQUIRED,
    NORMFORMER_FLAGS,
)
from scaling.models.biomedgpt.convert import (
    FAIRSEQ_SEGMENTS,
    ConversionError,
    check_buffers,
    convert_checkpoint,
    convert_state_dict,
    dummy_batch,
    our_key,
    read_checkpoint,
)
from scaling.models.biomedgpt.tokenization import save_tokenizer, train_bpe_tokenizer
from scaling.safe_load import CheckpointLoadError

# --- OFA's index buffers, written the way OFA-Sys/OFA models/ofa/unify_transformer.py builds them -----------------


def ofa_token_bucket_position(bucket_size: int, max_position: int) -> torch.Tensor:
    """OFA make_token_bucket_position: exact offsets within +-mid, log-spaced beyond."""
    context = torch.arange(max_position)[:, None]
    memory = torch.arange(max_position)[None, :]
    relative = context - memory
    sign = torch.sign(relative)
    mid = bucket_size // 2
    abs_pos = torch.where((relative < mid) & (relative > -mid), mid - 1, relative.abs())
    log_pos = torch.ceil(torch.log(abs_pos / mid) / math.log((max_position - 1) / mid) * (mid - 1)) + mid
    bucket = torch.where(abs_pos.le(mid), relative, log_pos.int() * sign).long()
    return bucket + bucket_size - 1


def ofa_image_bucket_position(bucket_size: int) -> torch.Tensor:
    """OFA make_image_bucket_position: 2-D relative offsets over the grid, 3 extra ids for the cls slot."""
    num_relative = (2 * bucket_size - 1) ** 2 + 3
    coords = torch.stack(torch.meshgrid(torch.arange(bucket_size), torch.arange(bucket_size), indexing="ij"))
    flat = coords.flatten(1)  # (2, B*B)
    relative = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0) + bucket_size - 1
    relative[:, :, 0] *= 2 * bucket_size - 1
    index = torch.zeros((bucket_size * bucket_size + 1,) * 2, dtype=torch.long)
    index[1:, 1:] = relative.sum(-1)
    index[0, 0:] = num_relative - 3
    index[0:, 0] = num_relative - 2
    index[0, 0] = num_relative - 1
    return index


def ofa_image_position_idx(code_image_size: int, bucket_size: int, padding: int, pad_id: int = 1024) -> torch.Tensor:
    """The decoder buffer: [0] + code-grid ids + [1024] * padding (769 in OFA main, 768 in the HF port)."""
    window = code_image_size // 8
    grid = torch.arange(window)[None, :].expand(window, window) + torch.arange(window)[:, None] * bucket_size + 1
    return torch.cat([torch.tensor([0]), grid.flatten(), torch.tensor([pad_id] * padding)])


def ofa_buffers(config: BiomedGPTConfig, padding: int) -> dict[str, torch.Tensor]:
    # OFA computes the token buckets over 1024 positions whatever max_source_positions is; small presets use theirs
    token = ofa_token_bucket_position(config.token_bucket_size, config.token_bucket_positions)
    image = ofa_image_bucket_position(config.image_bucket_size)
    # OFA pads with id 1024, a row of its 1765-row image position table; small presets have fewer rows (last = B*B)
    pad_id = min(1024, config.image_bucket_size**2)
    position_idx = ofa_image_position_idx(config.code_image_size, config.image_bucket_size, padding, pad_id)
    return {
        "encoder.token_rp_bucket": token,
        "encoder.image_rp_bucket": image,
        "decoder.token_rp_bucket": token.clone(),
        "decoder.image_rp_bucket": image.clone(),
        "decoder.image_position_idx": position_idx,
    }


# --- fixtures ----------------------------------------------------------------------------------------------------


def randomized_model(config: BiomedGPTConfig, seed: int = 0) -> BiomedGPTForConditionalGeneration:
    """A model with every tensor randomised (norms, zero-init tables and BN statistics included)."""
    torch.manual_seed(seed)
    model = BiomedGPTForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5 if "running_var" in name else torch.randn_like(tensor) * 0.2)
    return model


@pytest.fixture(scope="module")
def reference():
    """A `test`-preset model with every tensor randomised."""
    return randomized_model(BiomedGPTConfig.from_preset("test"))


def fairseq_state_dict(model, padding: int = 769) -> dict[str, torch.Tensor]:
    """The model's tensors under fairseq names, with version markers and OFA's index buffers."""
    state_dict = {fairseq_key(k): v.clone() for k, v in model.state_dict().items()}
    state_dict.update(ofa_buffers(model.config, padding))
    state_dict["encoder.version"] = torch.tensor([3.0])
    state_dict["decoder.version"] = torch.tensor([3.0])
    return state_dict


def hf_port_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's tensors under HF-port names (no `model.`), 1025-long image_position_idx, no tied LM head copy."""
    state_dict = {k.removeprefix("model."): v.clone() for k, v in model.state_dict().items()}
    del state_dict["decoder.output_projection.weight"]
    state_dict.update(ofa_buffers(model.config, padding=768))
    return state_dict


def assert_same_model(converted, reference):
    expected = reference.state_dict()
    actual = converted.state_dict()
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
    batch = dummy_batch(reference.config)
    with torch.no_grad():
        assert torch.equal(converted(**batch).logits, reference(**batch).logits)


OURS_TO_FAIRSEQ = {ours: fairseq for fairseq, ours in FAIRSEQ_SEGMENTS.items() if fairseq != "attn_ln"}


def fairseq_key(key: str) -> str:
    """One of our parameter names as fairseq names it (the inverse of `our_key` on fairseq keys)."""
    key = key.removeprefix("model.")
    mid_norm = "attn_ln" if key.startswith("encoder.") else "self_attn_ln"
    return ".".join(mid_norm if s == "self_attn_mid_layer_norm" else OURS_TO_FAIRSEQ.get(s, s) for s in key.split("."))


# --- tests -------------------------------------------------------------------------------------------------------


# HF-port keys as OFA's transformers port names them (layer 0), independent of the model's code
HF_PORT_KEYS = [
    "encoder.embed_tokens.weight",
    "encoder.type_embedding.weight",
    "encoder.layernorm_embedding.weight",
    "encoder.patch_layernorm_embedding.bias",
    "encoder.embed_images.conv1.weight",
    "encoder.embed_images.bn1.running_var",
    "encoder.embed_images.layer1.0.conv3.weight",
    "encoder.embed_images.layer2.0.downsample.0.weight",
    "encoder.embed_images.layer3.0.downsample.1.num_batches_tracked",
    "encoder.image_proj.weight",
    "encoder.embed_positions.weight",
    "encoder.embed_image_positions.weight",
    "encoder.pos_ln.weight",
    "encoder.image_pos_ln.bias",
    "encoder.pos_q_linear.weight",
    "encoder.pos_k_linear.bias",
    "encoder.layers.0.self_attn.q_proj.weight",
    "encoder.layers.0.self_attn.out_proj.bias",
    "encoder.layers.0.self_attn.c_attn",
    "encoder.layers.0.self_attn_layer_norm.weight",
    "encoder.layers.0.self_attn_mid_layer_norm.weight",
    "encoder.layers.0.fc1.weight",
    "encoder.layers.0.fc2.bias",
    "encoder.layers.0.ffn_layer_norm.weight",
    "encoder.layers.0.final_layer_norm.bias",
    "encoder.layer_norm.weight",
    "encoder.token_rel_pos_table_list.0.weight",
    "encoder.image_rel_pos_table_list.0.weight",
    "decoder.embed_tokens.weight",
    "decoder.output_projection.weight",
    "decoder.layernorm_embedding.weight",
    "decoder.code_layernorm_embedding.bias",
    "decoder.embed_positions.weight",
    "decoder.embed_image_positions.weight",
    "decoder.pos_ln.weight",
    "decoder.image_pos_ln.weight",
    "decoder.self_pos_q_linear.weight",
    "decoder.self_pos_k_linear.bias",
    "decoder.cross_pos_q_linear.weight",
    "decoder.cross_pos_k_linear.bias",
    "decoder.layers.0.self_attn.k_proj.weight",
    "decoder.layers.0.self_attn.c_attn",
    "decoder.layers.0.self_attn_layer_norm.weight",
    "decoder.layers.0.self_attn_mid_layer_norm.bias",
    "decoder.layers.0.cross_attn.v_proj.weight",
    "decoder.layers.0.cross_attn.c_attn",
    "decoder.layers.0.cross_attn_layer_norm.weight",
    "decoder.layers.0.cross_attn_mid_layer_norm.weight",
    "decoder.layers.0.fc1.bias",
    "decoder.layers.0.ffn_layer_norm.bias",
    "decoder.layers.0.final_layer_norm.weight",
    "decoder.layer_norm.bias",
    "decoder.token_rel_pos_table_list.0.weight",
    "decoder.image_rel_pos_table_list.0.weight",
]
# fairseq names of the renamed parameters (§2.7 "Fairseq -> HF renames")
FAIRSEQ_TO_HF_PORT = {
    "encoder.layers.0.attn_ln.weight": "encoder.layers.0.self_attn_mid_layer_norm.weight",
    "decoder.layers.0.self_attn_ln.weight": "decoder.layers.0.self_attn_mid_layer_norm.weight",
    "decoder.layers.0.cross_attn_ln.bias": "decoder.layers.0.cross_attn_mid_layer_norm.bias",
    "encoder.layers.1.ffn_layernorm.weight": "encoder.layers.1.ffn_layer_norm.weight",
    "decoder.layers.1.encoder_attn.q_proj.weight": "decoder.layers.1.cross_attn.q_proj.weight",
    "decoder.layers.1.encoder_attn.c_attn": "decoder.layers.1.cross_attn.c_attn",
    "decoder.layers.0.encoder_attn_layer_norm.weight": "decoder.layers.0.cross_attn_layer_norm.weight",
}


def test_reference_key_lists_map_onto_the_model(reference):
    model_keys = set(reference.state_dict())
    assert {our_key(k) for k in HF_PORT_KEYS} <= model_keys
    for fairseq, hf_port in FAIRSEQ_TO_HF_PORT.items():
        assert our_key(fairseq) == our_key(hf_port) == "model." + hf_port
        assert our_key(fairseq) in model_keys
        assert fairseq_key("model." + hf_port) == fairseq


def test_fairseq_names_follow_the_reference_renames(reference):
    keys = set(fairseq_state_dict(reference))
    assert "encoder.layers.0.attn_ln.weight" in keys
    assert "decoder.layers.1.self_attn_ln.bias" in keys
    assert "decoder.layers.0.cross_attn_ln.weight" in keys
    assert "decoder.layers.0.encoder_attn.k_proj.weight" in keys
    assert "decoder.layers.0.encoder_attn_layer_norm.weight" in keys
    assert "encoder.layers.1.ffn_layernorm.weight" in keys
    assert not any("mid_layer_norm" in k or "cross_attn." in k or k.startswith("model.") for k in keys)


@pytest.mark.parametrize("padding", [769, 768])
def test_full_size_ofa_buffers_pass_the_check(padding):
    """OFA's own buffers at the real sizes (1024 positions, 42x42 grid, 1026/1025-long image_position_idx)."""
    config = BiomedGPTConfig.from_preset("base")
    buffers = ofa_buffers(config, padding)
    assert buffers["decoder.image_position_idx"][-1] == 1024
    assert set(check_buffers(buffers, config)) == set(buffers)


def test_fairseq_checkpoint_converts_to_identical_model(reference):
    source = fairseq_state_dict(reference)
    grid = (reference.config.code_image_size // 8) ** 2
    assert source["decoder.image_position_idx"].shape == (1 + grid + 769,)  # 1026 at code_image_size 128
    converted, report = convert_state_dict(source)
    assert report.source_format == "fairseq" and report.preset == "test"
    assert set(report.dropped) == {"encoder.version", "decoder.version", *ofa_buffers(reference.config, 769)}
    assert_same_model(converted, reference)


def test_hf_port_checkpoint_converts_to_identical_model(reference):
    source = hf_port_state_dict(reference)
    grid = (reference.config.code_image_size // 8) ** 2
    assert source["decoder.image_position_idx"].shape == (1 + grid + 768,)  # 1025 at code_image_size 128
    converted, report = convert_state_dict(source, preset="test")
    assert report.source_format == "hf-port"
    assert report.filled == {"model.decoder.output_projection.weight": "tied to model.encoder.embed_tokens.weight"}
    assert_same_model(converted, reference)


def test_frozen_batchnorm_checkpoint_gets_counters(reference):
    """fairseq --freeze-resnet stores FrozenBatchNorm2d buffers, which have no num_batches_tracked."""
    source = {k: v for k, v in fairseq_state_dict(reference).items() if not k.endswith("num_batches_tracked")}
    converted, report = convert_state_dict(source)
    assert report.filled and all(key.endswith("num_batches_tracked") for key in report.filled)
    batch = dummy_batch(reference.config)
    with torch.no_grad():
        assert torch.equal(converted(**batch).logits, reference(**batch).logits)


def test_unknown_and_missing_keys_fail_loudly(reference):
    source = fairseq_state_dict(reference)
    source["encoder.layers.0.adapter.fc1.weight"] = torch.zeros(4, 64)
    del source["decoder.layers.1.fc2.bias"]
    with pytest.raises(ConversionError) as error:
        convert_state_dict(source)
    message = str(error.value)
    assert "unknown key(s)" in message and "model.encoder.layers.0.adapter.fc1.weight" in message
    assert "missing key(s)" in message and "model.decoder.layers.1.fc2.bias" in message


def test_untied_head_and_foreign_buckets_are_refused(reference):
    source = fairseq_state_dict(reference)
    source["decoder.output_projection.weight"] = source["decoder.output_projection.weight"] + 1
    with pytest.raises(ConversionError, match="output_projection.weight differs from model.encoder.embed_tokens"):
        convert_state_dict(source)
    source = fairseq_state_dict(reference)
    source["encoder.token_rp_bucket"] = ofa_token_bucket_position(8, reference.config.max_positions)
    with pytest.raises(ConversionError, match="encoder.token_rp_bucket .* differs from the model's own position"):
        convert_state_dict(source)


def test_wrong_preset_lists_the_differences(reference):
    with pytest.raises(ConversionError, match=r"preset 'tiny': .*d_model: checkpoint 64 vs preset 256"):
        convert_state_dict(fairseq_state_dict(reference), preset="tiny")


@pytest.fixture(scope="module")
def fairseq_checkpoint_dir(reference, tmp_path_factory):
    """A fairseq-style checkpoint_best.pt (Namespace args, numpy-free extra_state, EMA) beside its tokenizer files."""
    directory = tmp_path_factory.mktemp("fairseq_run")
    ema = {k: v * 0.5 if v.is_floating_point() else v for k, v in fairseq_state_dict(reference).items()}
    checkpoint = {
        "args": argparse.Namespace(arch="ofa_test", task="vqa_gen", selected_cols="0,5,2,3,4"),
        "cfg": None,
        "model": fairseq_state_dict(reference),
        "optimizer_history": [{"criterion_name": "AdjustLabelSmoothedCrossEntropyCriterion", "num_updates": 3}],
        "extra_state": {"train_iterator": {"epoch": 1}, "val_loss": 1.5, "ema": ema},
    }
    torch.save(checkpoint, directory / "checkpoint_best.pt")
    corpus = [" what modality is this? mri", " is the lesion in the left lobe? yes"] * 30
    save_tokenizer(train_bpe_tokenizer(corpus, vocab_size=300, num_codes=16, num_bins=10), directory)
    return directory


def test_cli_converts_fairseq_checkpoint_end_to_end(reference, fairseq_checkpoint_dir, tmp_path):
    out = tmp_path / "converted"
    assert cli_main(["convert", str(fairseq_checkpoint_dir / "checkpoint_best.pt"), str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.json", "conversion.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging directory left behind"
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    report = json.loads((out / "conversion.json").read_text())
    assert report["source_format"] == "fairseq" and report["preset"] == "test" and report["max_abs_logit_diff"] == 0
    assert_same_model(BiomedGPTForConditionalGeneration.from_pretrained(out).eval(), reference)

    assert cli_main(["convert", str(fairseq_checkpoint_dir / "checkpoint_best.pt"), str(out)]) == 1  # exists
    assert (
        cli_main(
            ["convert", str(fairseq_checkpoint_dir / "checkpoint_best.pt"), str(out), "--weights", "ema", "--overwrite"]
        )
        == 0
    )
    ema_model = BiomedGPTForConditionalGeneration.from_pretrained(out)
    embedding = ema_model.state_dict()["model.encoder.embed_tokens.weight"]
    assert torch.equal(embedding, reference.state_dict()["model.encoder.embed_tokens.weight"] * 0.5)


def test_cli_refuses_malicious_pickle_without_creating_files(tmp_path, capsys):
    marker = tmp_path / "created_by_pickle"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": {"encoder.version": torch.tensor([3.0])}, "payload": Payload()}, tmp_path / "bad.pt")
    out = tmp_path / "out"
    assert cli_main(["convert", str(tmp_path / "bad.pt"), str(out), "--bpe-dir", str(tmp_path)]) == 1
    assert "No tokenizer files" in capsys.readouterr().err  # tokenizer is checked before anything is unpickled
    save_tokenizer(train_bpe_tokenizer([" a b c"] * 5, vocab_size=270, num_codes=2, num_bins=2), tmp_path)
    assert cli_main(["convert", str(tmp_path / "bad.pt"), str(out)]) == 1
    assert "Refused to load" in capsys.readouterr().err
    assert not marker.exists() and not out.exists()


def test_hf_port_directory_with_bart_tokenizer_files(reference, tmp_path):
    """An OFA-HF-port directory: pytorch_model.bin with HF names beside vocab.json + merges.txt."""
    source = tmp_path / "ofa-hf"
    source.mkdir()
    torch.save(hf_port_state_dict(reference), source / "pytorch_model.bin")
    corpus = [" what organ is shown? liver", " is this a ct scan? no"] * 30
    save_tokenizer(train_bpe_tokenizer(corpus, vocab_size=300, num_codes=16, num_bins=10), source)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (source / name).unlink()
    report = convert_checkpoint(source, tmp_path / "out", preset="test")
    assert report.source_format == "hf-port" and report.tokenizer_size <= reference.config.vocab_size
    assert_same_model(BiomedGPTForConditionalGeneration.from_pretrained(tmp_path / "out").eval(), reference)


def test_truncated_checkpoint_gives_clear_error(fairseq_checkpoint_dir, tmp_path):
    data = (fairseq_checkpoint_dir / "checkpoint_best.pt").read_bytes()
    truncated = tmp_path / "checkpoint_best.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointLoadError, match="truncated or corrupt"):
        convert_checkpoint(truncated, tmp_path / "out", bpe_dir=fairseq_checkpoint_dir)
    assert not (tmp_path / "out").exists()


# --- released checkpoint variants, read through their own config -------------------------------------------------

# OFA image-generation fine-tunes: code_image_size 256 (run_scripts/image_gen); here also max_source_positions 512,
# while OFA still computes the token buckets over 1024 positions (unify_transformer.py make_token_bucket_position).
IMAGE_GEN = dict(
    max_positions=512, token_bucket_size=256, image_bucket_size=42, code_image_size=256, token_bucket_max_position=1024
)
# instruct-biomedgpt-base: OFA-sized position tables, code_image_size 128 (image_position_idx of 1025 or 1026)
BASE_TABLES = dict(max_positions=1024, token_bucket_size=256, image_bucket_size=42, code_image_size=128)
NUM_CODES, NUM_BINS = 16, 10  # the fixture tokenizers' <code_i>/<bin_i> families


def fairseq_model_arguments(config: BiomedGPTConfig, **changes) -> argparse.Namespace:
    """What fairseq saves as the model arguments of an OFA fine-tune (arch function applied, script flags set).

    resnet_type is left out: the test ResNet's stages are none of OFA's (a test below checks it is compared).
    """
    arguments = dict(
        arch="ofa_base",
        encoder_embed_dim=config.d_model,
        decoder_embed_dim=config.d_model,
        encoder_layers=config.encoder_layers,
        decoder_layers=config.decoder_layers,
        encoder_attention_heads=config.encoder_attention_heads,
        decoder_attention_heads=config.decoder_attention_heads,
        encoder_ffn_embed_dim=config.encoder_ffn_dim,
        decoder_ffn_embed_dim=config.decoder_ffn_dim,
        max_source_positions=config.max_positions,
        max_target_positions=config.max_positions,
        token_bucket_size=config.token_bucket_size,
        image_bucket_size=config.image_bucket_size,
        code_image_size=config.code_image_size,
        attn_scale_factor=2.0,
        activation_fn="gelu",
        dropout=0.1,
        attention_dropout=0.0,
        activation_dropout=0.0,
        encoder_drop_path_rate=0.1,
        decoder_drop_path_rate=0.1,
        resnet_drop_path_rate=0.0,
        encoder_normalize_before=True,
        decoder_normalize_before=True,
        no_scale_embedding=True,
        layernorm_embedding=True,
        patch_layernorm_embedding=True,
        code_layernorm_embedding=True,
        add_type_embedding=True,
        entangle_position_embedding=False,
        disable_entangle=True,
        share_all_embeddings=True,
        share_decoder_input_output_embed=True,
        scale_attn=True,
        scale_fc=True,
        scale_heads=True,
        scale_resids=False,
        adapter=False,
        encoder_prompt=False,
        decoder_prompt=False,
        interpolate_position=False,
        freeze_encoder_embedding=True,
        sync_bn=False,
    )
    return argparse.Namespace(**{**arguments, **changes})


def fairseq_task_arguments() -> dict:
    return dict(_name="image_gen", patch_image_size=64, code_dict_size=NUM_CODES, num_bins=NUM_BINS, max_src_length=64)


def hf_port_config(config: BiomedGPTConfig, **changes) -> dict:
    """An OFA-HF-port config.json (OFAConfig fields) for `config`."""
    fields = dict(
        model_type="ofa",
        architectures=["OFAModel"],
        vocab_size=config.vocab_size,
        d_model=config.d_model,
        encoder_layers=config.encoder_layers,
        decoder_layers=config.decoder_layers,
        encoder_attention_heads=config.encoder_attention_heads,
        decoder_attention_heads=config.decoder_attention_heads,
        encoder_ffn_dim=config.encoder_ffn_dim,
        decoder_ffn_dim=config.decoder_ffn_dim,
        max_position_embeddings=config.max_positions,
        token_bucket_size=config.token_bucket_size,
        image_bucket_size=config.image_bucket_size,
        code_image_size=config.code_image_size,
        attn_scale_factor=2.0,
        normformer=True,
        activation_function="gelu",
        dropout=0.1,
        encoder_normalize_before=True,
        decoder_normalize_before=True,
        scale_embedding=False,
        layernorm_embedding=True,
        patch_layernorm_embedding=True,
        code_layernorm_embedding=True,
        add_type_embedding=True,
        entangle_position_embedding=False,
        share_decoder_input_output_embed=True,
        resnet_model_path=None,
    )
    return {**fields, **changes}


def save_fixture_tokenizer(directory) -> None:
    corpus = [" what does the image describe? a dog", " which region does the text describe?"] * 30
    save_tokenizer(train_bpe_tokenizer(corpus, vocab_size=300, num_codes=NUM_CODES, num_bins=NUM_BINS), directory)


def half_precision(model) -> BiomedGPTForConditionalGeneration:
    """The model a fairseq --fp16 checkpoint of `model` holds: every float tensor rounded through float16."""
    rounded = BiomedGPTForConditionalGeneration(model.config).eval()
    state = {k: v.half().float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    rounded.load_state_dict(state)
    return rounded


def assert_same_logits_with_code_targets(converted, reference):
    """Also compare image-code targets, which read code_image_size through the decoder's image positions."""
    batch = dummy_batch(reference.config)
    with torch.no_grad():
        expected = reference(**batch, code_masks=torch.tensor([True, False])).logits
        assert torch.equal(converted(**batch, code_masks=torch.tensor([True, False])).logits, expected)


@pytest.fixture(scope="module")
def image_gen_models():
    """The trained weights and their EMA copy of an OFA image-generation fine-tune shape."""
    config = BiomedGPTConfig.from_preset("test", **IMAGE_GEN)
    return randomized_model(config, seed=1), randomized_model(config, seed=2)


@pytest.fixture(scope="module")
def fp16_image_gen_checkpoint(image_gen_models, tmp_path_factory):
    """checkpoint_best.pt as OFA writes it under --fp16 --store-ema (ema_fp32: EMA also kept in float32)."""
    model, ema = image_gen_models
    directory = tmp_path_factory.mktemp("image_gen")
    to_half = {k: v.half() if v.is_floating_point() else v for k, v in fairseq_state_dict(model).items()}
    ema_state = fairseq_state_dict(ema)
    checkpoint = {
        "args": None,
        "cfg": {"model": fairseq_model_arguments(model.config), "task": fairseq_task_arguments(), "ema": {}},
        "model": to_half,
        "extra_state": {
            "ema": {k: v.half() if v.is_floating_point() else v for k, v in ema_state.items()},
            "ema_fp32_params": {k: v.float() if v.is_floating_point() else v for k, v in ema_state.items()},
        },
    }
    torch.save(checkpoint, directory / "checkpoint_best.pt")
    save_fixture_tokenizer(directory)
    return directory / "checkpoint_best.pt"


def test_image_generation_fine_tune_with_512_positions_converts(image_gen_models, fp16_image_gen_checkpoint, tmp_path):
    """max_source_positions 512 with OFA's 1024-position token buckets, code_image_size 256, fp16 weights."""
    model, _ = image_gen_models
    report = convert_checkpoint(fp16_image_gen_checkpoint, tmp_path / "out")
    converted = BiomedGPTForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    config = converted.config
    assert (config.max_positions, config.token_bucket_max_position, config.code_image_size) == (512, 1024, 256)
    assert (config.image_size, config.dropout, config.encoder_drop_path_rate) == (64, 0.1, 0.1)
    assert report.config_source == f"{fp16_image_gen_checkpoint} (cfg.model)" and report.ema_available
    assert report.config_fields["code_image_size"] == "cfg.model.code_image_size = 256"
    assert report.config_fields["image_size"] == "cfg.task.patch_image_size = 64"
    assert report.dropped["decoder.image_position_idx"].startswith("1794-entry")  # 1 + 32 * 32 + 769
    expected = half_precision(model)
    assert_same_model(converted, expected)
    assert_same_logits_with_code_targets(converted, expected)


def test_ema_weights_of_a_fairseq_checkpoint_are_chosen_by_weights_flag(
    image_gen_models, fp16_image_gen_checkpoint, tmp_path
):
    """--weights ema converts extra_state['ema'] with the float32 copy (ema_fp32_params) on top."""
    _, ema = image_gen_models
    assert cli_main(["convert", str(fp16_image_gen_checkpoint), str(tmp_path / "ema"), "--weights", "ema"]) == 0
    report = json.loads((tmp_path / "ema" / "conversion.json").read_text())
    assert report["weights"] == "ema" and report["max_abs_logit_diff"] == 0
    assert_same_model(BiomedGPTForConditionalGeneration.from_pretrained(tmp_path / "ema").eval(), ema)


@pytest.mark.parametrize("storage", ["args Namespace", "cfg with Namespace", "cfg as DictConfig"])
def test_fairseq_config_is_read_wherever_fairseq_stored_it(reference, tmp_path, storage):
    model_arguments, task = fairseq_model_arguments(reference.config), fairseq_task_arguments()
    if storage == "args Namespace":
        checkpoint = {"args": argparse.Namespace(**vars(model_arguments), **task), "cfg": None}
    elif storage == "cfg with Namespace":
        checkpoint = {"args": None, "cfg": {"model": model_arguments, "task": task}}
    else:
        omegaconf = pytest.importorskip("omegaconf")
        checkpoint = {"cfg": omegaconf.OmegaConf.create({"model": vars(model_arguments), "task": task})}
    torch.save({**checkpoint, "model": fairseq_state_dict(reference)}, tmp_path / "checkpoint.pt")
    state_dict, declared, _ = read_checkpoint(tmp_path / "checkpoint.pt", "model", trust_pickle=False)
    assert declared.fields["code_image_size"] == 32 and declared.fields["image_size"] == 64
    assert declared.symbol_counts == {"code_dict_size": NUM_CODES, "num_bins": NUM_BINS}
    converted, report = convert_state_dict(state_dict, declared=declared)
    assert report.config_fields["d_model"].endswith("encoder_embed_dim = 64")
    assert_same_model(converted, reference)


@pytest.mark.parametrize("weights_file", ["pytorch_model.bin", "model.safetensors"])
def test_instruct_biomedgpt_layout_with_1026_entry_image_position_idx(weights_file, tmp_path):
    """An HF-port directory whose image_position_idx has OFA main's 1026 entries (BiomedGPT issue #39)."""
    model = randomized_model(BiomedGPTConfig.from_preset("test", **BASE_TABLES), seed=3)
    state_dict = hf_port_state_dict(model)
    state_dict["decoder.image_position_idx"] = ofa_buffers(model.config, padding=769)["decoder.image_position_idx"]
    assert state_dict["decoder.image_position_idx"].shape == (1026,)
    source = tmp_path / "instruct-biomedgpt-base"
    source.mkdir()
    if weights_file.endswith(".bin"):
        torch.save(state_dict, source / weights_file)
    else:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, source / weights_file)
    (source / "config.json").write_text(json.dumps(hf_port_config(model.config)))
    save_fixture_tokenizer(source)
    report = convert_checkpoint(source, tmp_path / "out")
    assert report.source_format == "hf-port" and report.config_source == str(source / "config.json")
    assert report.config_fields["code_image_size"] == "code_image_size = 128"
    converted = BiomedGPTForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert converted.config.token_bucket_max_position is None  # 1024 = max_positions: OFA's own range
    assert_same_model(converted, model)
    assert_same_logits_with_code_targets(converted, model)


def fairseq_checkpoint_with(reference, tmp_path, **changes):
    """A fairseq checkpoint of `reference` whose cfg.model differs by `changes`, read back."""
    checkpoint = {"cfg": {"model": fairseq_model_arguments(reference.config, **changes), "task": {}}}
    torch.save({**checkpoint, "model": fairseq_state_dict(reference)}, tmp_path / "checkpoint.pt")
    return read_checkpoint(tmp_path / "checkpoint.pt", "model", trust_pickle=False)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"disable_entangle": False}, r"disable_entangle=False \(supported: True\)"),
        ({"encoder_normalize_before": False, "no_scale_embedding": False}, "encoder_normalize_before=False.*no_scale"),
        ({"adapter": True}, r"adapter=True \(supported: False\)"),
        ({"max_target_positions": 64}, "max_target_positions=64 differs from max_source_positions=128"),
        ({"scale_heads": False}, "NormFormer options .* are mixed"),
        ({"activation_fn": "swish"}, "activation 'swish' is not supported"),
        ({"resnet_type": "ViT-B/16"}, "resnet_type 'ViT-B/16' is not supported"),
    ],
)
def test_fairseq_options_the_model_does_not_implement_are_refused_by_name(reference, tmp_path, changes, message):
    with pytest.raises(ConversionError, match=rf"checkpoint\.pt \(cfg\.model\).*{message}"):
        fairseq_checkpoint_with(reference, tmp_path, **changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"encoder_embed_dim": 128, "decoder_embed_dim": 128},
            r"encoder_embed_dim=128 but the tensors give d_model=64",
        ),
        ({"resnet_type": "resnet50"}, r"cfg\.model\.resnet_type=\[3, 4, 6\] but the tensors give resnet_layers"),
        (
            {"code_image_size": 16},
            r"image_position_idx \(786,\) \(it holds a 4x4 code grid: code_image_size=32\) .* code_image_size=16",
        ),
    ],
)
def test_a_config_that_contradicts_its_weights_is_refused_by_field(reference, tmp_path, changes, message):
    state_dict, declared, _ = fairseq_checkpoint_with(reference, tmp_path, **changes)
    with pytest.raises(ConversionError, match=message):
        convert_state_dict(state_dict, declared=declared)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"scale_embedding": True}, r"scale_embedding=True \(supported: False\)"),
        ({"entangle_position_embedding": True}, r"entangle_position_embedding=True"),
        ({"d_model": 256}, "d_model=256 but the tensors give d_model=64"),
    ],
)
def test_hf_port_config_json_is_checked_too(reference, tmp_path, changes, message):
    torch.save(hf_port_state_dict(reference), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf_port_config(reference.config, **changes)))
    with pytest.raises(ConversionError, match=rf"config\.json.*{message}"):
        state_dict, declared, _ = read_checkpoint(tmp_path, "model", trust_pickle=False)
        convert_state_dict(state_dict, declared=declared)


def test_tokenizer_with_other_symbol_counts_is_refused(reference, tmp_path):
    task = {**fairseq_task_arguments(), "num_bins": 1000}
    checkpoint = {"cfg": {"model": fairseq_model_arguments(reference.config), "task": task}}
    torch.save({**checkpoint, "model": fairseq_state_dict(reference)}, tmp_path / "checkpoint.pt")
    save_fixture_tokenizer(tmp_path)
    with pytest.raises(ConversionError, match="num_bins=1000 but the tokenizer has 10 <bin_i> tokens"):
        convert_checkpoint(tmp_path / "checkpoint.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_help_lists_every_field_read_from_the_checkpoint(capsys):
    with pytest.raises(SystemExit):
        cli_main(["convert", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    read = [
        *FAIRSEQ_FIELDS,
        *FAIRSEQ_TASK_FIELDS,
        *FAIRSEQ_REQUIRED,
        *NORMFORMER_FLAGS,
        *HF_PORT_FIELDS,
        *HF_PORT_REQUIRED,
    ]
    missing = [name for name in read if name not in help_text]
    assert not missing, f"scaling convert --help does not name: {missing}"
    for name in ("activation_fn", "resnet_type", "code_dict_size", "num_bins", "token_rp_bucket", "image_position_idx"):
        assert name in help_text
