"""The PEFT sweep recipe end to end on the test preset: a pretrained start, each row in its own process (one row
instruction-tuning another's model, one repeated with a second seed), MILE's table and the replication report."""

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "recipes" / "configs" / "biomedgpt" / "peft_sweep_synthetic.yaml"
ROWS = ["T-T-T", "F-T-LoRA:4", "T-T-T/origin+instruction"]
TINY = ["model.preset=test", "model.image_size=32", "data.synthetic_images=40", "train.max_steps=3",
        "train.batch_size=4", "peft.sweep_pretrain_steps=2", "eval.max_samples=12", "eval.batch_size=12"]


@pytest.mark.slow
def test_sweep_runs_each_row_in_its_own_process_and_writes_the_report(tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "recipes" / "peft_sweep.py"), "--config", str(CONFIG),
           f"train.output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}", *TINY,
           f"peft.sweep=[{', '.join(ROWS)}]", "peft.sweep_repeat=[T-T-T]"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"

    rows = json.loads((out / "peft_sweep.json").read_text())
    assert [r["label"] for r in rows] == [*ROWS, "T-T-T/seed2"]
    for row in rows:
        for key in ("opened", "closed", "global", "answer_type_open", "answer_type_closed"):
            assert 0.0 <= row[key] <= 100.0, (row["label"], key, row[key])
        assert row["memory_mib"] > 0 and row["final_loss"] > 0 and row["memory_kind"] == "peak RSS"
        assert row["n_closed"] + row["n_opened"] == 12
    full, lora, tuned, repeat = rows
    assert (lora["ViT"], lora["JTM"], lora["Dec"], lora["rank"]) == ("F", "T", "LoRA", 4)
    assert full["params_pct"] == pytest.approx(100.0) and 0.0 < lora["params_pct"] < 100.0
    assert (tuned["data"], repeat["seed"]) == ("origin+instruction", full["seed"] + 1)

    # each row ran in a process of its own (two at a time here): its memory figure does not depend on what ran before
    # or beside it. The check: F-T-LoRA:4 run again alone, in a fresh process, measures what it measured in the sweep.
    assert len({r["pid"] for r in rows}) == len(rows)
    threads = yaml.safe_load((out / "rows" / "F-T-LoRA_r4" / "config.yaml").read_text())["train"]["cpu_threads"]
    again = subprocess.run([sys.executable, str(ROOT / "recipes" / "peft_sweep.py"), "--config",
                            str(out / "config.yaml"), "peft.sweep_row=F-T-LoRA:4", f"train.cpu_threads={threads}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    alone = json.loads((out / "rows" / "F-T-LoRA_r4" / "row.json").read_text())
    assert alone["pid"] != lora["pid"] and alone["global"] == lora["global"]
    assert alone["memory_mib"] == pytest.approx(lora["memory_mib"], rel=0.02)

    # the instruction row started from the global fine-tuning row's model, the others from the pretrained one
    assert str(out / "rows" / "T-T-T" / "model") in (out / "rows" / "T-T-T_origin_then_instruction" /
                                                     "config.yaml").read_text()
    assert (out / "pretrain" / "model" / "config.json").is_file()
    assert (out / "rows" / "T-T-T" / "console.log").is_file()  # rows side by side keep their output apart
    assert (out / "rows" / "T-T-T" / "model" / "model.safetensors").is_file()
    assert (out / "rows" / "F-T-LoRA_r4" / "model" / "adapter" / "adapter_model.safetensors").is_file()

    header = (out / "peft_sweep.md").read_text().splitlines()[0]
    for column in ("ViT", "JTM", "Dec", "Rank", "#Params (%)", "Memory (MiB)", "Opened", "Closed", "Global",
                   "Open (answer_type)", "Closed (answer_type)"):
        assert column in header
    with (out / "peft_sweep.csv").open() as f:
        assert [r["label"] for r in csv.DictReader(f)] == [*ROWS, "T-T-T/seed2"]
    assert (out / "peft_sweep.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "replication.json").read_text())
    assert [f["key"] for f in report["findings"]] == list("abcde")
    assert report["noise"]["pairs"][0]["row"] == "T-T-T"
    assert "## Findings" in (out / "replication.md").read_text()
    assert "data:image/png;base64," in (out / "replication.html").read_text()


@pytest.mark.slow
@pytest.mark.distributed
def test_sweep_rows_run_as_their_own_two_process_zero2_launch_in_bf16(tmp_path):
    """Under `accelerate launch` every rank starts its part of each row with the same launch settings."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / "zero2.yaml"), "--num_processes", "2", "--main_process_port",
           str(random.Random().randint(20000, 40000)), str(ROOT / "recipes" / "peft_sweep.py"), "--config",
           str(CONFIG), f"train.output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}", *TINY,
           "train.mixed_precision=bf16", "peft.sweep=[T-T-T, F-LoRA-LoRA:4]", "peft.sweep_repeat=[]",
           "peft.sweep_processes=1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    rows = json.loads((out / "peft_sweep.json").read_text())
    assert [r["label"] for r in rows] == ["T-T-T", "F-LoRA-LoRA:4"]
    assert all(r["final_loss"] > 0 and r["global"] is not None for r in rows)
    assert all(r["memory_kind"] == "peak RSS (max over 2 ranks)" for r in rows)
    assert len({r["pid"] for r in rows}) == 2
    for row in ("pretrain", "rows/T-T-T", "rows/F-LoRA-LoRA_r4"):
        assert "ZeRO stage 2" in (out / row / "train.log").read_text(), row
