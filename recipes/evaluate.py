"""Zero-shot or fine-tuned evaluation of one or several checkpoints on one or several datasets → a report.

    python recipes/evaluate.py model.checkpoint=runs/instruct/export
    accelerate launch --num_processes 2 recipes/evaluate.py --config recipes/configs/biomedgpt/tiny_instruct.yaml \
        'eval.checkpoints=[runs/base/export, runs/large/export]' \
        'data.eval_sources=[{name: vqa_rad, path: data/vqa_rad, split: test}]' eval.mode=constrained

Writes report.json / report.md / report.html and predictions/*.jsonl into eval.output_dir (default
<train.output_dir>/eval). Without eval_sources the held-out split of the embedded synthetic data (all six tasks) is
used. Checkpoints may be save_pretrained directories, run directories (their export/), or PEFT adapter directories
on eval.base_checkpoint. eval.mode: auto (each task's BiomedGPT decoding), generate, constrained or score.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

from scaling.config import Config, ConfigError, Runtime, parse_cli
from scaling.data.instruct import instruction_formatter
from scaling.data.loading import (
    evaluation_sources,
    load_sources,
    missing_paths,
    option_records,
    require_records,
    training_sources,
)
from scaling.evaluation.checkpoints import CheckpointNotFound, find_model_dirs, load_for_eval
from scaling.evaluation.runner import eval_collator, evaluate_dataset, finish_report
from scaling.logging import get_logger, setup_logging
from scaling.training.distributed import build_accelerator, fill_deepspeed_auto, zero_stage
from scaling.training.run import exempt_from_cycle_collection, run_recipe

log = get_logger("recipes.evaluate")


def output_dir(cfg: Config) -> Path:
    return Path(cfg.eval.output_dir or Path(cfg.train.output_dir) / "eval")


def checkpoints_to_evaluate(cfg: Config) -> list[str]:
    """eval.checkpoints, else model.checkpoint, else the run's own export; every one (and every evaluation dataset
    path) checked before any work, all problems at once."""
    paths = cfg.eval.checkpoints or [cfg.model.checkpoint or str(Path(cfg.train.output_dir) / "export")]
    problems = missing_paths(cfg.data.eval_sources)
    for path in paths:
        try:
            find_model_dirs(path, cfg.eval.base_checkpoint)
        except CheckpointNotFound as error:
            problems.append(str(error))
    if problems:
        raise ConfigError(problems, "eval.checkpoints / data.eval_sources")
    return paths


def prepare_model(model, accelerator, cfg: Config):
    """ZeRO-3 shards the weights across ranks (ZeRO inference); otherwise every rank holds a copy, as ZeRO-1/2
    shard only optimizer state and gradients, which evaluation has none of."""
    if zero_stage(accelerator) == 3:
        fill_deepspeed_auto(accelerator, cfg)
        return accelerator.prepare(model)
    return model.to(accelerator.device)


def main(argv: list[str] | None = None) -> None:
    # 1. config and every checkpoint, checked before any work
    cfg, config_path = parse_cli(argv, __doc__.splitlines()[0])
    cfg.validate(Runtime.from_env(), source=config_path)
    checkpoints = checkpoints_to_evaluate(cfg)
    out_dir = output_dir(cfg)
    accelerator = build_accelerator(cfg)
    setup_logging(out_dir, cfg.logging.level)
    start = time.perf_counter()

    # 2. datasets, and the instruction prompts training used (options from the sources' training answers)
    training = [] if cfg.data.eval_sources else training_sources(cfg, accelerator)
    held_out = require_records(load_sources(evaluation_sources(cfg, training), cfg.data, cfg.eval.max_samples))
    formatter = instruction_formatter(cfg, option_records(held_out, cfg.data)) if cfg.data.instruction else None
    exempt_from_cycle_collection()  # imported modules and records
    log.info("evaluating %s on %s", ", ".join(checkpoints),
             ", ".join(f"{split.label} ({len(split.records)})" for split in held_out))

    # 3. every checkpoint on every dataset, one report
    evaluations = []
    for path in checkpoints:
        model, tokenizer, info = load_for_eval(path, cfg.eval.base_checkpoint)
        collator = eval_collator(tokenizer, cfg, model.config, formatter, info)  # the prompts the export records
        model = prepare_model(model, accelerator, cfg)
        for split in held_out:
            evaluations.append(evaluate_dataset(model, tokenizer, split, cfg, accelerator, collator, info, out_dir))
        del model
        accelerator.free_memory()
        gc.collect()
    finish_report(evaluations, cfg, accelerator, out_dir, time.perf_counter() - start)
    accelerator.end_training()


if __name__ == "__main__":
    run_recipe(main)
