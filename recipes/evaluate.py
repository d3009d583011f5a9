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

import dataclasses
import gc
import sys
import time
from pathlib import Path

from scaling.config import Config, ConfigError, Runtime, SourceArgs, parse_cli
from scaling.data.records import DataError, Record
from scaling.evaluation.checkpoints import CheckpointNotFound, find_model_dirs, load_for_eval
from scaling.evaluation.runner import eval_collator, evaluate_dataset, finish_report
from scaling.logging import get_logger, setup_logging
from scaling.training.batches import training_sources
from scaling.training.distributed import build_accelerator, fill_deepspeed_auto, zero_stage

log = get_logger("recipes.evaluate")


def parse_args(argv: list[str] | None = None) -> Config:
    cfg, config_path = parse_cli(argv, __doc__.splitlines()[0])
    return cfg.validate(Runtime.from_env(), source=config_path)


def output_dir(cfg: Config) -> Path:
    return Path(cfg.eval.output_dir or Path(cfg.train.output_dir) / "eval")


def checkpoints_to_evaluate(cfg: Config) -> list[str]:
    """eval.checkpoints, else model.checkpoint, else the run's own export; every one checked before any work."""
    paths = cfg.eval.checkpoints or [cfg.model.checkpoint or str(Path(cfg.train.output_dir) / "export")]
    problems = []
    for path in paths:
        try:
            find_model_dirs(path, cfg.eval.base_checkpoint)
        except CheckpointNotFound as error:
            problems.append(str(error))
    if problems:
        raise ConfigError(problems, "eval.checkpoints")
    return paths


def evaluation_sources(cfg: Config, accelerator) -> list[SourceArgs]:
    """data.eval_sources, else the test split of the embedded synthetic data (the training recipes' cache)."""
    if cfg.data.eval_sources:
        return cfg.data.eval_sources
    return [dataclasses.replace(s, split="test") for s in training_sources(cfg, accelerator)]


def load_datasets(cfg: Config, accelerator) -> dict[str, tuple[list[Record], dict]]:
    """{name: (records, description)} of the evaluation sources (at most eval.max_samples records each)."""
    from scaling.data.sources import load_source

    datasets = {}
    for source in evaluation_sources(cfg, accelerator):
        result = load_source(source.name, source.path, source.split, on_bad_record=cfg.data.on_bad_record,
                             **source.options)
        records = result.records[: cfg.eval.max_samples]
        if not records:
            raise ValueError(f"{source.name} ({source.path}, split {source.split}) has no usable records to evaluate")
        label = f"{source.name}/{source.split}" if cfg.data.eval_sources else f"synthetic/{records[0].task}"
        if result.n_skipped:
            log.warning("%s: skipped %d records (%s)", label, result.n_skipped, dict(result.skipped))
        datasets[label] = (records, {"source": source.name, "split": source.split, "path": str(source.path),
                                     "skipped": dict(result.skipped), "available": len(result.records)})
    return datasets


def prepare_model(model, accelerator, cfg: Config):
    """ZeRO-3 shards the weights across ranks (ZeRO inference); otherwise every rank holds a copy, as ZeRO-1/2
    shard only optimizer state and gradients, which evaluation has none of."""
    if zero_stage(accelerator) == 3:
        fill_deepspeed_auto(accelerator, cfg)
        return accelerator.prepare(model)
    return model.to(accelerator.device)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    checkpoints = checkpoints_to_evaluate(cfg)
    out_dir = output_dir(cfg)
    accelerator = build_accelerator(cfg)
    setup_logging(out_dir, cfg.logging.level)
    start = time.perf_counter()
    datasets = load_datasets(cfg, accelerator)
    log.info("evaluating %s on %s", ", ".join(checkpoints),
             ", ".join(f"{name} ({len(records)})" for name, (records, _) in datasets.items()))
    evaluations = []
    for path in checkpoints:
        model, tokenizer, info = load_for_eval(path, cfg.eval.base_checkpoint)
        collator = eval_collator(tokenizer, cfg, model.config, [r for recs, _ in datasets.values() for r in recs])
        model = prepare_model(model, accelerator, cfg)
        for name, (records, dataset_info) in datasets.items():
            evaluations.append(evaluate_dataset(model, tokenizer, records, name, cfg, accelerator, collator, info,
                                                out_dir, dataset_info))
        del model
        accelerator.free_memory()
        gc.collect()
    finish_report(evaluations, cfg, accelerator, out_dir, time.perf_counter() - start)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, CheckpointNotFound, DataError) as err:  # the message names the file and the fix
        log.error("%s", err)
        sys.exit(1)
