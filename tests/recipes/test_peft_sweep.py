"""The PEFT sweep recipe end to end on the test preset: a pretrained start, three rows, MILE's table in every format."""

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "recipes" / "configs" / "biomedgpt" / "peft_sweep_synthetic.yaml"
ROWS = ["T-T-T", "F-LoRA-LoRA:4", "F-F-PTv2"]


@pytest.mark.slow
def test_short_sweep_writes_mile_table(tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "recipes" / "peft_sweep.py"), "--config", str(CONFIG),
           f"train.output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}", "model.preset=test",
           "model.image_size=32", "data.synthetic_images=40", "train.max_steps=3", "train.batch_size=4",
           "peft.sweep_pretrain_steps=2", f"peft.sweep=[{', '.join(ROWS)}]", "eval.max_samples=12",
           "eval.batch_size=12"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"

    rows = json.loads((out / "peft_sweep.json").read_text())
    assert [r["label"] for r in rows] == ROWS
    for row in rows:
        for key in ("opened", "closed", "global", "yes_no"):
            assert 0.0 <= row[key] <= 100.0, (row["label"], key, row[key])
        assert row["memory_mib"] > 0 and row["final_loss"] > 0
    full, lora, ptv2 = rows
    assert (full["ViT"], full["JTM"], full["Dec"], full["rank"]) == ("T", "T", "T", None)
    assert (lora["ViT"], lora["JTM"], lora["Dec"], lora["rank"]) == ("F", "LoRA", "LoRA", 4)
    assert full["params_pct"] == pytest.approx(100.0)
    assert 0.0 < lora["params_pct"] < 10.0 and 0.0 < ptv2["params_pct"] < 10.0

    header = (out / "peft_sweep.md").read_text().splitlines()[0]
    for column in ("ViT", "JTM", "Dec", "Rank", "#Params (%)", "Memory (MiB)", "Opened", "Closed", "Global"):
        assert column in header
    with (out / "peft_sweep.csv").open() as f:
        assert [r["label"] for r in csv.DictReader(f)] == ROWS
    assert (out / "peft_sweep.png").read_bytes()[:4] == b"\x89PNG"
    # every row started from the pretrained model and kept its adapter (the full row has none)
    assert (out / "pretrain" / "model" / "config.json").is_file()
    assert (out / "rows" / "F-LoRA-LoRA_r4" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "rows" / "F-F-PTv2" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.distributed
def test_sweep_trains_under_zero2_with_two_processes_in_bf16(tmp_path):
    """The sweep's rows take the library's prepare (with DeepSpeed's buffer cast) and keep the process group."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / "zero2.yaml"), "--num_processes", "2", "--main_process_port",
           str(random.Random().randint(20000, 40000)), str(ROOT / "recipes" / "peft_sweep.py"), "--config",
           str(CONFIG), f"train.output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}", "model.preset=test",
           "model.image_size=32", "data.synthetic_images=40", "train.max_steps=3", "train.batch_size=4",
           "train.mixed_precision=bf16", "peft.sweep_pretrain_steps=2", "peft.sweep=[T-T-T, F-LoRA-LoRA:4]",
           "eval.max_samples=12", "eval.batch_size=12"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    rows = json.loads((out / "peft_sweep.json").read_text())
    assert [r["label"] for r in rows] == ["T-T-T", "F-LoRA-LoRA:4"]
    assert all(r["final_loss"] > 0 and r["global"] is not None for r in rows)
    assert "ZeRO stage 2" in done.stdout + done.stderr
