"""The real Large and XLarge presets train on this machine: XLarge (930M) under ZeRO-3 and Large (473M, EMA) under
ZeRO-2, each on 2 CPU processes in bf16, through the shipped config and accelerate config. A few optimizer steps with
the loss falling, a checkpoint, the consolidated export that reloads and gives the logits of the weights gathered
from the ZeRO shards, and each rank's peak memory beside `scaling estimate-memory`'s figure for the same setting.

Heavy (Large: 7 minutes and ~16 GB of RAM; XLarge: 4 minutes and ~22 GB free RAM; not in `make test`):

    .venv/bin/python -m pytest -m heavy -s tests/recipes/test_scale.py

Only the data shape shrinks (128 px, 32 + 16 tokens, micro-batch 2, no warm-up) and the synthetic data stands in for
the datasets; the model and its lr are the config's. Measured memory is each rank's peak resident set size during the
training loop less what it held before the model was built (runtime, data, tokenizer); the set-up peak (the model
built whole on every rank, then sharded) is reported beside it. The runs map every tensor of 1 MiB or more directly
(glibc's MALLOC_MMAP_THRESHOLD_), so that freed tensors leave the resident set instead of staying in malloc's heap.
"""

from __future__ import annotations

import json
import random
import sys

import pytest
import torch
from recipe_runs import ACCELERATE, ROOT, losses, run

from scaling.config import load_config
from scaling.models.biomedgpt import BiomedGPTForConditionalGeneration
from scaling.training.memory import format_bytes, proc_status_kib
from scaling.training.memory_estimate import estimate_for_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.heavy]
MEASURE = ROOT / "tests" / "recipes" / "measure_memory.py"
STEPS = 6
SHAPE = ("model.image_size=128", "data.max_src_len=32", "data.max_tgt_len=16", "train.batch_size=2",
         "train.gradient_accumulation_steps=1")
MEMORY_TOLERANCE = 0.10
RUNTIME_BYTES = 500 * 2**20
"""What a rank holds before the model is built (Python, torch, DeepSpeed, data, tokenizer): ~450 MiB measured."""


def scale_run(tmp_path, config: str, accelerate_config: str) -> tuple:
    """Launch `config` as its header says, on 2 CPU processes, with the memory probe; return the run's config."""
    run_dir = tmp_path / "run"
    overrides = [*SHAPE, "model.checkpoint=", "data.sources=[]", "data.eval_sources=[]", "data.synthetic_images=60",
                 f"data.cache_dir={tmp_path / 'cache'}", f"train.output_dir={run_dir}", f"train.max_steps={STEPS}",
                 "train.warmup_ratio=0", "eval.after_training=false", "logging.progress=false"]
    config_path = ROOT / "recipes" / "configs" / "biomedgpt" / config
    command = [*ACCELERATE, "--config_file", str(ROOT / "accelerate_configs" / accelerate_config), "--num_processes",
               "2", "--main_process_port", str(random.randint(20000, 40000)), str(MEASURE),
               str(ROOT / "recipes" / "finetune.py"), "--config", str(config_path), *overrides]
    run(command, env={"MALLOC_MMAP_THRESHOLD_": str(2**20)}, timeout=3600)
    return run_dir, load_config(config_path, overrides)


def skip_unless_ram_for(config: str, stage: int, offload: str) -> None:
    """Skip, saying why, when this host has less free RAM than the two ranks are planned to need."""
    cfg = load_config(ROOT / "recipes" / "configs" / "biomedgpt" / config, list(SHAPE))
    planned = estimate_for_config(cfg, stage, 2, offload, device="cpu")
    needed = 2 * (planned.total + planned.cpu_offloaded + RUNTIME_BYTES)
    available = proc_status_kib("MemAvailable", "/proc/meminfo") * 1024
    if available < needed:
        pytest.skip(f"{config} on 2 ranks needs ~{format_bytes(needed)} of RAM, this host has {format_bytes(available)}"
                    " available")


def memory_report(run_dir, cfg, stage: int, offload: str) -> list[dict]:
    """Each rank's training peak above its pre-model memory, beside the planner's figure for the same setting (which
    is the training loop's; the set-up peak, with the model built whole before ZeRO shards it, is reported beside)."""
    planned = estimate_for_config(cfg, stage, 2, offload, device="cpu")
    planned_bytes = planned.total + planned.cpu_offloaded  # on a CPU host "offloaded" states live in the same RAM
    rows = []
    for rank in range(2):
        measured = json.loads((run_dir / f"memory_rank{rank}.json").read_text())
        used = measured["training_peak"] - measured["before_model"]
        rows.append({"rank": rank, "measured": used, "planned": planned_bytes, "ratio": used / planned_bytes,
                     "setup": measured["setup_peak"] - measured["before_model"], "run_peak_rss": measured["run_peak"],
                     "before_model_rss": measured["before_model"]})
        print(f"{cfg.model.preset} ZeRO-{stage} rank {rank}: measured {format_bytes(used)} (peak RSS "
              f"{format_bytes(measured['training_peak'])} - {format_bytes(measured['before_model'])} before the model; "
              f"{format_bytes(measured['run_peak'])} with the export; set-up peak "
              f"{format_bytes(rows[-1]['setup'])}), planned {format_bytes(planned_bytes)} "
              f"(model states {format_bytes(planned.model_states)}, live weights "
              f"{format_bytes(planned.live_parameters)}, offloaded {format_bytes(planned.cpu_offloaded)}, "
              f"EMA {format_bytes(planned.ema_weights)}, bucket {format_bytes(planned.buffers)}, activations "
              f"{format_bytes(planned.activations)}): {used / planned_bytes:.2f}")
    (run_dir / "memory_vs_planner.json").write_text(json.dumps(rows, indent=1))
    return rows


def assert_export_gives_the_gathered_weights_logits(run_dir, tmp_path):
    """The run's 16-bit export against the fp32 master weights `scaling export` consolidates from the ZeRO shards,
    rounded to 16 bits as DeepSpeed does after every step: same weights, same logits."""
    offline_dir = tmp_path / "offline"
    run([sys.executable, "-m", "scaling.cli", "export", str(run_dir), "--out", str(offline_dir)], timeout=1800)
    exported = BiomedGPTForConditionalGeneration.from_pretrained(run_dir / "export", dtype=torch.float32).eval()
    offline = BiomedGPTForConditionalGeneration.from_pretrained(offline_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for param in offline.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    gathered, master = exported.state_dict(), offline.state_dict()
    assert max((gathered[k] - master[k]).abs().max().item() for k in gathered) == 0.0
    g = torch.Generator().manual_seed(0)
    size = exported.config.image_size
    inputs = {"input_ids": torch.randint(4, 400, (2, 12), generator=g),
              "attention_mask": torch.ones(2, 12, dtype=torch.long),
              "pixel_values": torch.randn(2, 3, size, size, generator=g), "patch_masks": torch.tensor([True, False]),
              "decoder_input_ids": torch.randint(4, 400, (2, 6), generator=g)}
    with torch.no_grad():
        assert torch.equal(exported(**inputs).logits, offline(**inputs).logits)


def assert_trained(run_dir):
    curve = losses(run_dir)
    assert len(curve) == STEPS and sum(curve[-2:]) / 2 < sum(curve[:2]) / 2, curve


@pytest.mark.parametrize("config, accelerate_config, stage, offload", [
    # XLarge as accelerate_configs/zero3_offload.yaml's header launches it (offloaded states stay in the same RAM on
    # a CPU host). Its model states alone are ~20 bytes x 929M parameters over the two ranks: it needs ~22 GB free.
    ("xlarge_zero3_finetune.yaml", "zero3_offload.yaml", 3, "cpu"),
    ("large_finetune.yaml", "zero2.yaml", 2, "none"),
])
def test_preset_trains_on_two_cpu_ranks_within_the_planned_memory(config, accelerate_config, stage, offload,
                                                                   tmp_path):
    skip_unless_ram_for(config, stage, offload)
    run_dir, cfg = scale_run(tmp_path, config, accelerate_config)
    assert_trained(run_dir)
    assert (run_dir / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").is_file()
    rows = memory_report(run_dir, cfg, stage, offload)
    assert_export_gives_the_gathered_weights_logits(run_dir, tmp_path)
    for row in rows:
        assert abs(row["ratio"] - 1) < MEMORY_TOLERANCE, rows
