"""Every YAML the project ships loads: recipe configs through the config system, accelerate configs as launch files."""

import json
from pathlib import Path

import pytest
import yaml

from scaling.config import Runtime, load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPE_CONFIGS = sorted((ROOT / "recipes" / "configs").rglob("*.yaml"))
ACCELERATE_CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))
DISTRIBUTED_TYPES = {"NO", "MULTI_CPU", "MULTI_GPU", "DEEPSPEED", "FSDP"}


@pytest.mark.parametrize("path", RECIPE_CONFIGS, ids=lambda p: p.name)
def test_recipe_config_loads_and_validates(path):
    cfg = load_config(path)
    cfg.validate(Runtime(cuda=True, zero_stage=3 if "zero3" in path.name else 0))
    header = path.read_text().splitlines()[0]
    assert header.startswith("#"), f"{path.name} needs a header comment with its launch command"
    assert "launch" in path.read_text().split("\n\n")[0] or "python" in path.read_text().split("\n\n")[0]


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_is_well_formed(path):
    cfg = yaml.safe_load(path.read_text())
    assert cfg["distributed_type"] in DISTRIBUTED_TYPES
    ds = cfg.get("deepspeed_config", {})
    if "deepspeed_config_file" in ds:
        ds_path = (path.parent / ds["deepspeed_config_file"]).resolve()
        if not ds_path.exists():
            ds_path = (ROOT / ds["deepspeed_config_file"]).resolve()
        body = json.loads(ds_path.read_text())
        assert "zero_optimization" in body
    lines = path.read_text().splitlines()
    uncommented = [line for i, line in enumerate(lines)
                   if line.strip() and not line.lstrip().startswith("#") and "#" not in line
                   and not line.rstrip().endswith(":")  # a section header; its keys carry the comments
                   and not (i and lines[i - 1].lstrip().startswith("#"))]
    assert not uncommented, f"{path.name}: every key is commented; these are not: {uncommented}"

