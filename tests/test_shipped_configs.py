"""Every YAML the project ships: recipe configs load and validate under the launch their header documents, the
Large/XLarge ones are sized by the memory planner, accelerate configs are well-formed launch files, and every
documented launch runs as written (2 optimizer steps, a checkpoint, an export, the evaluation) on this CPU host, or
on a CUDA host with one process per GPU (launch/gpu_check.sh).

The launch check changes only what a CPU host cannot have: the model shrinks to the `test` preset at 32 px (the real
preset's position table kept, so the sequence lengths stay the config's), no pretrained checkpoint, the embedded
synthetic data instead of the dataset paths (its VQA test split where the config evaluates named datasets), 2
optimizer steps, 2 processes where the launch starts several, at most 4 evaluation samples per dataset, and a PEFT
sweep cut to two rows.
Accelerate config, ZeRO stage, offload, precision, EMA, PEFT, gradient checkpointing, frozen embeddings, micro-batch
and accumulation stay the config's. The default suite launches each accelerate config a header names once (with
the first config that names it); the other launches are marked `heavy` (`make test` leaves them out,
`pytest -m heavy tests/test_shipped_configs.py` runs them: about a minute each on 2 cores).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from shipped_launches import ACCELERATE_CONFIGS, RECIPE_CONFIGS, ROOT, Launch, documented_launches, header

from scaling.config import load_config
from scaling.models.biomedgpt import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from scaling.training.checkpoint import checkpoint_dir, verify_checkpoint
from scaling.training.memory_estimate import REDUCE_BUCKET_ELEMENTS, estimate_for_config, parse_size
from scaling.training.tracking import read_metrics

DISTRIBUTED_TYPES = {"NO", "MULTI_CPU", "MULTI_GPU", "DEEPSPEED", "FSDP"}
PROCESSES = torch.cuda.device_count() or 2
"""Processes of a launch that starts several: one per GPU on a CUDA host (launch/gpu_check.sh), 2 on a CPU host."""
STEPS = 2
SHARES = re.compile(r"rank\s+(\d+)\s+holds\s+\d+\s+of\s+\d+\s+parameter\s+elements\s+\([\d.]+%,\s+ZeRO\s+stage\s+(\d)")
SIZED = re.compile(r"micro-batch (\d+) x (\d+) accumulation x 8 GPUs = global batch (\d+),\s*(no|with) gradient "
                   r"checkpointing, (\d+) GiB per GPU \(scaling estimate-memory --config <this file> --zero (\d)")
SMALLER_GPU = re.compile(r"^\s+8x(\d+)GB: (.+)$")


def config_launches() -> list[tuple[Path, int, Launch]]:
    """Every launch documented in a header, recipe configs first, then accelerate configs; of a PEFT sweep only the
    first (its other commands pick other rows of the same per-row launch)."""
    return [(path, i, launch) for path in RECIPE_CONFIGS + ACCELERATE_CONFIGS
            for i, launch in enumerate(documented_launches(path))
            if not (i and launch.recipe.endswith("peft_sweep.py"))]


def launch_id(case) -> str:
    path, index, _ = case
    return (path.stem if path.suffix == ".yaml" and "recipes" in path.parts else f"accelerate-{path.stem}") + (
        f"-{index}" if index else "")


def launch_config(launch: Launch, *overrides: str):
    """The config a launch runs with: the YAML its --config names (the recipe's default otherwise), its overrides."""
    return load_config(launch.config_path, [*launch.overrides, *overrides])


def sweep_rows(cfg) -> list[str]:
    """The two rows a sweep launch is cut to: the first two it names, else full fine-tuning and LoRA everywhere."""
    return cfg.peft.sweep[:2] or ["T-T-T", "T-LoRA-LoRA:4"]


# ---------------------------------------------------------------------------------------------------------------------
# Loading, validation, sizing


@pytest.mark.parametrize("path", RECIPE_CONFIGS + ACCELERATE_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_launch_a_header_documents_validates(path):
    launches = documented_launches(path)
    assert launches, f"{path.name} needs a header comment with its launch command"
    for launch in launches:
        assert (ROOT / launch.recipe).is_file(), launch.recipe
        if path in RECIPE_CONFIGS:
            assert launch.config_path == path, f"{path.name}'s header launches {launch.config_path}"
        # what a GPU host checks at start, less the pretrained checkpoint this checkout does not have
        launch_config(launch, "model.checkpoint=").validate(launch.runtime(cuda=True))


def sized_configs() -> list[Path]:
    return [p for p in RECIPE_CONFIGS if "Sized with the planner" in "\n".join(header(p))]


def test_every_large_and_xlarge_config_is_sized_by_the_planner():
    sized = {p.stem for p in sized_configs()}
    assert {p.stem for p in RECIPE_CONFIGS if p.stem.startswith(("large", "xlarge"))} <= sized


@pytest.mark.parametrize("path", sized_configs(), ids=lambda p: p.name)
def test_sized_config_fits_8x80gb_at_its_largest_micro_batch_and_its_notes_fit_smaller_gpus(path):
    text = "\n".join(header(path))
    micro, accum, global_batch, checkpointing, gib, stage = SIZED.search(text).groups()
    [launch] = documented_launches(path)
    assert int(stage) == launch.zero_stage, "the sizing names the ZeRO stage of the documented launch"
    cfg = launch_config(launch)
    train = cfg.train
    assert (train.batch_size, train.gradient_accumulation_steps) == (int(micro), int(accum))
    assert train.gradient_checkpointing == (checkpointing == "with")
    assert int(global_batch) == train.batch_size * train.gradient_accumulation_steps * 8
    estimate = estimate_for_config(cfg, launch.zero_stage, 8)
    assert estimate.fits(parse_size("80GB")) and round(estimate.total / 2**30) == int(gib), estimate.total / 2**30
    # the largest micro-batch that fits, within the global batch; no checkpointing where none is needed
    doubled = estimate_for_config(cfg, launch.zero_stage, 8, batch=2 * train.batch_size)
    assert 2 * train.batch_size > int(global_batch) // 8 or not doubled.fits(parse_size("80GB"))
    assert not train.gradient_checkpointing
    notes = [SMALLER_GPU.match(line).groups() for line in header(path) if SMALLER_GPU.match(line)]
    assert {int(size) for size, _ in notes} == {40, 24}
    for size, overrides in notes:
        smaller = load_config(path, overrides.split())
        assert smaller.train.batch_size * smaller.train.gradient_accumulation_steps * 8 == int(global_batch)
        assert estimate_for_config(smaller, launch.zero_stage, 8).fits(parse_size(f"{size}GB")), (size, overrides)


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_is_well_formed(path):
    cfg = yaml.safe_load(path.read_text())
    assert cfg["distributed_type"] in DISTRIBUTED_TYPES
    ds = cfg.get("deepspeed_config", {})
    if "deepspeed_config_file" in ds:
        body = json.loads((ROOT / ds["deepspeed_config_file"]).read_text())
        assert "zero_optimization" in body
    lines = path.read_text().splitlines()
    uncommented = [line for i, line in enumerate(lines)
                   if line.strip() and not line.lstrip().startswith("#") and "#" not in line
                   and not line.rstrip().endswith(":")  # a section header; its keys carry the comments
                   and not (i and lines[i - 1].lstrip().startswith("#"))]
    assert not uncommented, f"{path.name}: every key is commented; these are not: {uncommented}"


@pytest.mark.parametrize("stage", [1, 2])
def test_zero1_and_zero2_reduce_in_the_bucket_the_planner_counts(stage):
    zero = json.loads((ROOT / "accelerate_configs" / "deepspeed" / f"zero{stage}.json").read_text())
    zero = zero["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == REDUCE_BUCKET_ELEMENTS
    assert zero["overlap_comm"] is False  # one bucket buffer, as the planner counts


# ---------------------------------------------------------------------------------------------------------------------
# The launch check


def cpu_overrides(cfg, run_dir: Path, cache: Path, synthetic_vqa: Path) -> list[str]:
    """What a CPU host cannot have, replaced (see the module docstring)."""
    out = [f"train.output_dir={run_dir}", f"data.cache_dir={cache}", "data.synthetic_images=60",
           f"train.max_steps={STEPS}", "eval.max_samples=4", "logging.progress=false"]
    if cfg.model.preset not in ("test", "mini"):
        positions = BiomedGPTConfig.from_preset(cfg.model.preset).max_positions
        out += ["model.preset=test", f"model.overrides={{max_positions: {positions}}}"]
        out += ["model.image_size=32"] if cfg.model.image_size else []
    if cfg.model.checkpoint:
        out.append("model.checkpoint=")
    if cfg.data.sources:  # named datasets: the synthetic data of the same kind (VQA for instruction and sweep data)
        out.append("data.sources=[]")
        if cfg.data.instruction or "peft_sweep" in str(cfg._source):
            out.append("data.synthetic_tasks=[vqa]")
    if cfg.data.eval_sources:
        out.append(f"data.eval_sources=[{{name: slake, path: {synthetic_vqa}, split: test}}]")
    if "peft_sweep" in str(cfg._source):
        out.append(f"peft.sweep=[{', '.join(sweep_rows(cfg))}]")
    if cfg.peft.sweep_pretrain_steps:
        out.append(f"peft.sweep_pretrain_steps={STEPS}")
    if getattr(cfg.peft, "sweep_repeat", None):
        out.append("peft.sweep_repeat=[]")
    return out


def launch_cases():
    """Every documented launch; the default suite runs the first launch of each DeepSpeed or single-process
    accelerate config a header names (the others differ from it in what shrinks, or in data formatting the recipe
    tests cover) and leaves DDP, bare `accelerate launch` and `python` launches to tests/recipes, which run them the
    same way."""
    seen, cases = set(), []
    for case in config_launches():
        _, _, launch = case
        config = launch.flag_values.get("--config_file")
        ddp = launch.accelerate_settings().get("distributed_type") == "MULTI_GPU"
        heavy = config is None or config in seen or ddp
        seen.add(config)
        marks = [pytest.mark.slow, pytest.mark.distributed] + ([pytest.mark.heavy] if heavy else [])
        cases.append(pytest.param(case, id=launch_id(case), marks=marks))
    return cases


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory):
    """One small synthetic dataset per seed, shared by every launch (the runs find it cached)."""
    from scaling.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("synthetic-cache")

    def cache_for(seed: int) -> tuple[Path, Path]:
        cache = root / f"seed{seed}"
        data = generate_synthetic(cache / "synthetic", 60, seed=seed)
        return cache, data.sources["vqa"].path

    return cache_for


@pytest.mark.parametrize("case", launch_cases())
def test_documented_launch_runs(case, synthetic_cache, tmp_path):
    _, _, launch = case
    cfg = launch_config(launch)
    cache, synthetic_vqa = synthetic_cache(cfg.train.seed)
    run_dir = tmp_path / "run"
    command = launch.command(PROCESSES, random.randint(20000, 40000),
                             cpu_overrides(cfg, run_dir, cache, synthetic_vqa))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "COLUMNS": "200"}  # no personal accelerate default config
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(command)}\n{output[-6000:]}"
    if launch.recipe.endswith("peft_sweep.py"):
        rows = json.loads((run_dir / "peft_sweep.json").read_text())
        assert [r["label"] for r in rows] == sweep_rows(cfg) and all(r["final_loss"] > 0 for r in rows), rows
        return
    processes = PROCESSES if launch.multi_process else 1
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, STEPS + 1))
    shares = {int(rank): int(stage) for rank, stage in SHARES.findall(output)}
    assert shares == dict.fromkeys(range(processes), launch.zero_stage), output[-3000:]
    checkpoint = checkpoint_dir(run_dir, STEPS)
    assert verify_checkpoint(checkpoint)["world_size"] == processes
    assert (checkpoint / "ema.safetensors").is_file() == (cfg.train.ema_decay > 0)
    BiomedGPTForConditionalGeneration.from_pretrained(run_dir / "export")  # consolidated, loads in one process
    assert (run_dir / "eval" / "report.json").is_file() == cfg.eval.after_training

