"""The typed config: YAML + overrides, unknown keys, type checks, all problems at once, the resolved file."""

import ast
import inspect

import pytest
import yaml

from scaling.config import Config, ConfigError, Runtime, TrainArgs, load_config, parse_cli, save_config


def test_defaults_are_valid():
    assert load_config().validate(Runtime()) == Config()


def test_overrides_change_values_and_types():
    cfg = load_config(None, ["train.lr=1e-5", "peft.decoder=lora", "train.max_steps=7", "model.image_size=null",
                             "data.sources=[{name: vqa_rad, path: /d, split: test}]"])
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.peft.decoder == "lora"
    assert cfg.train.max_steps == 7
    assert cfg.model.image_size is None
    assert cfg.data.sources[0].name == "vqa_rad" and cfg.data.sources[0].split == "test"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": 3e-4, "batch_size": 4}, "peft": {"encoder": "ia3"}}))
    cfg = load_config(path, ["train.batch_size=8"])
    assert (cfg.train.lr, cfg.train.batch_size, cfg.peft.encoder) == (3e-4, 8, "ia3")


def test_command_line_overrides_on_either_side_of_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": 3e-4, "batch_size": 4}}))
    cfg, config_path = parse_cli(["train.max_steps=7", "--config", str(path), "train.batch_size=8"], "test")
    assert config_path == str(path)
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.train.lr) == (7, 8, 3e-4)


def test_yaml_boolean_words_are_accepted_as_choices(tmp_path):
    """YAML reads `no` as False: a word choice gets its word back, on the command line and in files alike."""
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="train.mixed_precision must be one of no, bf16, fp16; got True"):
        load_config(None, ["train.mixed_precision=yes"])
    assert load_config(None, ["train.compile=no"]).train.compile is False  # booleans stay booleans


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'train.lrr'; did you mean 'train.lr'\?"):
        load_config(None, ["train.lrr=1e-4"])
    with pytest.raises(ConfigError, match=r"unknown key 'trian'; did you mean 'train'\?"):
        load_config(None, ["trian.lr=1e-4"])


def test_type_mismatch_is_rejected():
    with pytest.raises(ConfigError, match="train.batch_size must be int, got str 'eight'"):
        load_config(None, ["train.batch_size=eight"])
    with pytest.raises(ConfigError, match="train.gradient_checkpointing must be bool"):
        load_config(None, ["train.gradient_checkpointing=3"])
    with pytest.raises(ConfigError, match="peft.vision must be one of"):
        load_config(None, ["peft.vision=lorra"])


def test_three_independent_problems_reported_together(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": -1.0, "warmup_ratio": 2.0}, "eval": {"beam": 0}}))
    with pytest.raises(ConfigError) as err:
        load_config(path).validate()
    assert len(err.value.problems) == 3
    text = str(err.value)
    assert "train.lr must be > 0" in text and "train.warmup_ratio" in text and "eval.beam" in text
    assert str(path) in text


def test_key_and_type_problems_collected_before_raising():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.lrr=1", "train.batch_size=x", "peft.decoder=lorra"])
    assert len(err.value.problems) == 3


def test_cross_section_and_runtime_refusals():
    cfg = load_config(None, ["peft.decoder=prefix", "train.gradient_checkpointing=true",
                             "train.mixed_precision=fp16", "peft.quantize=nf4"])
    problems = cfg.problems(Runtime(cuda=False, zero_stage=3, offload=False))
    text = "\n".join(problems)
    assert "gradient_checkpointing" in text
    assert "fp16 needs CUDA" in text
    assert "QLoRA + full is refused" in text
    assert "ZeRO-3" in text
    assert "offload" in "\n".join(Config().problems(Runtime(offload=True, zero_stage=0)))


def test_resolved_config_written_and_reloadable(tmp_path):
    cfg = load_config(None, ["train.lr=2e-4", "peft.encoder=lora"])
    path = save_config(cfg, tmp_path / "run")
    assert path.name == "config.yaml"
    assert load_config(path) == cfg


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)
    return docs


def test_every_field_is_documented():
    from scaling import config

    for cls in (config.ModelArgs, config.DataArgs, TrainArgs, config.PeftArgs, config.EvalArgs,
                config.LoggingArgs, config.SourceArgs):
        import dataclasses

        missing = {f.name for f in dataclasses.fields(cls)} - set(field_docs(cls))
        assert not missing, f"{cls.__name__} fields without docstring: {missing}"


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_data_sources_checked_against_the_loader_registry():
    cfg = load_config(None, ["data.sources=[{name: vqarad, path: /x}, {name: vqa_rad, path: /x, options: {foo: 1}}]"])
    text = "\n".join(cfg.problems())
    assert "'vqarad': unknown" in text
    assert "unknown option(s) foo" in text
