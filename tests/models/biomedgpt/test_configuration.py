"""BiomedGPT presets: published parameter counts, overrides, validation, serialisation."""

import pytest
import torch
from transformers import AutoConfig

from scaling.models.biomedgpt import PRESETS, BiomedGPTConfig, BiomedGPTForConditionalGeneration

# OFA README model card (BiomedGPT-S/M/B = OFA tiny/medium/base); Large/XLarge = OFA large/huge shapes.
PUBLISHED_PARAMS = {"tiny": 33e6, "medium": 93e6, "base": 180e6, "large": 470e6, "xlarge": 930e6}


def count_parameters_on_meta(config: BiomedGPTConfig) -> int:
    """Unique parameters (the tied embedding counted once) without allocating any memory."""
    with torch.device("meta"):
        model = BiomedGPTForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_parameter_count_matches_published_size(name):
    count = count_parameters_on_meta(BiomedGPTConfig.from_preset(name))
    assert abs(count - PUBLISHED_PARAMS[name]) / PUBLISHED_PARAMS[name] < 0.03, f"{name}: {count / 1e6:.1f}M"


@pytest.mark.parametrize("name", ["tiny", "medium", "base", "large", "xlarge"])
def test_real_presets_use_ofa_vocabulary_and_resnet_width(name):
    config = BiomedGPTConfig.from_preset(name)
    assert config.vocab_size == 59_457
    assert config.resnet_out_channels == 1024
    assert config.encoder_ffn_dim == 4 * config.d_model


def test_xlarge_has_24_encoder_and_12_decoder_layers():
    config = BiomedGPTConfig.from_preset("xlarge")
    assert (config.encoder_layers, config.decoder_layers, config.d_model, config.encoder_attention_heads) == (
        24,
        12,
        1280,
        16,
    )


def test_from_preset_applies_overrides_without_changing_the_preset_table():
    config = BiomedGPTConfig.from_preset("tiny", dropout=0.3, image_size=384)
    assert (config.dropout, config.image_size, config.d_model) == (0.3, 384, 256)
    assert "dropout" not in PRESETS["tiny"]


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="unknown BiomedGPT preset 'huge'.*xlarge"):
        BiomedGPTConfig.from_preset("huge")


def test_invalid_shape_lists_every_problem():
    with pytest.raises(ValueError) as error:
        BiomedGPTConfig.from_preset("test", d_model=66, image_size=40)
    message = str(error.value)
    assert "not divisible by encoder_attention_heads" in message
    assert "image_size 40 must be a multiple of 16" in message


def test_config_round_trips_through_save_pretrained(tmp_path):
    config = BiomedGPTConfig.from_preset("mini", label_smoothing=0.1)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, BiomedGPTConfig)
    fields = {key: value for key, value in config.to_dict().items() if key != "_name_or_path"}
    assert {key: loaded.to_dict()[key] for key in fields} == fields
    assert loaded.decoder_start_token_id == 0 and loaded.pad_token_id == 1 and loaded.eos_token_id == 2
