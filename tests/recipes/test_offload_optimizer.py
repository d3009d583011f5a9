"""ZeRO-Offload's optimizer. The shipped zero3_offload.json sets zero_force_ds_cpu_optimizer false and the recipes
step the offloaded states with torch's fused AdamW (as fast on this CPU, no C++ build: accelerate_configs/deepspeed/
README.md); a JSON that keeps DeepSpeed's default (true) makes DeepSpeed refuse any optimizer but its own CPU Adam,
so that launch trains only if the recipes build DeepSpeedCPUAdam.

Heavy: DeepSpeedCPUAdam JIT-builds its C++ op with gcc on first use (about 4 minutes on 2 cores).
"""

from __future__ import annotations

import json
import random

import pytest
import yaml
from recipe_runs import ACCELERATE, ROOT, logged_steps, recipe_args, run

from scaling.config import TrainArgs
from scaling.training.optim import build_optimizer

pytestmark = [pytest.mark.slow, pytest.mark.heavy]


def test_build_optimizer_gives_deepspeed_cpu_adam_the_same_groups_and_hyperparameters():
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    args = TrainArgs(lr=3e-4, weight_decay=0.05)
    torch_adamw, cpu_adam = build_optimizer(model, args), build_optimizer(model, args, deepspeed_cpu_adam=True)
    assert isinstance(cpu_adam, DeepSpeedCPUAdam) and cpu_adam.adam_w_mode
    for ours, theirs in zip(torch_adamw.param_groups, cpu_adam.param_groups, strict=True):
        assert [id(p) for p in ours["params"]] == [id(p) for p in theirs["params"]]
        assert (ours["lr"], ours["weight_decay"], ours["betas"], ours["eps"]) == (
            theirs["lr"], theirs["weight_decay"], theirs["betas"], theirs["eps"])


@pytest.mark.distributed
def test_offload_with_deepspeeds_default_trains_with_its_cpu_adam(tmp_path):
    shipped = ROOT / "accelerate_configs" / "zero3_offload.yaml"
    ds_config = json.loads((ROOT / "accelerate_configs" / "deepspeed" / "zero3_offload.json").read_text())
    assert ds_config.pop("zero_force_ds_cpu_optimizer") is False
    (tmp_path / "ds.json").write_text(json.dumps(ds_config))
    launch = yaml.safe_load(shipped.read_text())
    launch["deepspeed_config"]["deepspeed_config_file"] = str(tmp_path / "ds.json")
    (tmp_path / "accelerate.yaml").write_text(yaml.safe_dump(launch))
    run_dir = tmp_path / "run"
    run([*ACCELERATE, "--config_file", str(tmp_path / "accelerate.yaml"), "--num_processes", "2",
         "--main_process_port", str(random.randint(20000, 40000)),
         *recipe_args(run_dir, tmp_path / "cache", "train.max_steps=2", "train.mixed_precision=bf16")],
        timeout=1200)
    assert logged_steps(run_dir) == [1, 2]
