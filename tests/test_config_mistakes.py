"""Config mistakes that used to pass validation, or surfaced only after data loading or in a second pass: every one
is a problem of the first ConfigError, before any work."""

import pytest

from scaling.config import ConfigError, load_config


def problems(*overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(None, list(overrides)).validate()
    return info.value.problems


def test_type_errors_and_value_problems_come_in_one_report():
    found = problems("train.max_steps=many", "train.lr=nan", "train.max_grad_norm=.nan", "train.seed=-1",
                     "model.preset=huge", "train.warmup_ratio=.inf")
    assert sorted(found) == sorted([
        "train.max_steps must be int, got str 'many'",
        "model.preset 'huge' is unknown; choose one of tiny, medium, base, large, xlarge, mini, test",
        "train.warmup_ratio must be in [0, 1), got inf",
        "train.seed must be in 0..2**32-1 (numpy's seed range), got -1",
        "train.lr must be a finite number, got nan",
        "train.max_grad_norm must be a finite number, got nan",
        "train.warmup_ratio must be a finite number, got inf",
    ])


def test_a_seed_beyond_numpys_range_is_refused():
    assert problems(f"train.seed={2**32}") == [f"train.seed must be in 0..2**32-1 (numpy's seed range), got {2**32}"]
    load_config(None, [f"train.seed={2**32 - 1}"]).validate()


@pytest.mark.parametrize("override,message", [
    ("{encoder_layers: -1}", "model.overrides.encoder_layers must be a positive integer, got -1"),
    ("{decoder_layers: 0}", "model.overrides.decoder_layers must be a positive integer, got 0"),
    ("{d_model: 100}", "d_model 100 is not divisible by encoder_attention_heads 3"),
    ("{encoder_layerz: 2}", "model.overrides: unknown BiomedGPTConfig field(s) encoder_layerz"),
])
def test_model_overrides_are_checked_before_the_model_is_built(override, message):
    extra = ["model.overrides.encoder_attention_heads=3", "model.overrides.decoder_attention_heads=3"] \
        if "d_model" in override else []
    found = problems(f"model.overrides={override}", *extra)
    assert any(message in p for p in found), found


def test_missing_checkpoint_tokenizer_and_resume_paths_and_a_file_as_output_dir_are_named(tmp_path):
    (tmp_path / "a_file").write_text("")
    found = problems(f"model.checkpoint={tmp_path / 'nope'}", f"model.tokenizer={tmp_path / 'tok'}",
                     f"train.resume={tmp_path / 'step_00000100'}", f"train.output_dir={tmp_path / 'a_file'}")
    assert f"train.output_dir {tmp_path / 'a_file'} is a file; give a directory for the run's outputs" in found
    assert any(f"model.checkpoint: {tmp_path / 'nope' / 'config.json'} does not exist" in p for p in found)
    assert any(f"model.tokenizer: {tmp_path / 'tok'} does not exist" in p for p in found)
    assert any(f"train.resume: {tmp_path / 'step_00000100'} does not exist" in p for p in found)
