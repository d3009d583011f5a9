"""MILE's component × method study: train every (vision, encoder, decoder) PEFT policy of a grid for the same budget,
score VQA, and write the table and a replication report beside MILE's published numbers.

Launch from the repository root:

    python recipes/peft_sweep.py --config recipes/configs/biomedgpt/peft_sweep_synthetic.yaml   # the CPU proxy
    python recipes/peft_sweep.py --config recipes/configs/biomedgpt/peft_sweep_vqa_rad.yaml peft.grid=mile_table1
    python recipes/peft_sweep.py --config recipes/configs/biomedgpt/peft_sweep_slake.yaml \
        "peft.sweep=[T-T-T, F-T-LoRA:4, T-T-LoRA:4]" train.max_steps=2000
    accelerate launch --config_file accelerate_configs/zero2.yaml --num_processes 2 recipes/peft_sweep.py \
        --config recipes/configs/biomedgpt/peft_sweep_synthetic.yaml

The rows are peft.sweep (MILE's ViT-JTM-Dec labels), else the named grid peft.grid (scaling.sweep.GRIDS: MILE's
Tables 1-4, 5, 6-7 and 8, or the CPU proxy), plus peft.sweep_repeat rows again with a second seed (the report's seed
noise). Each row runs in its own process, started by this one (under `accelerate launch` every rank starts its part
of the row with the same launch settings on a fresh port), so its memory figure is its own: CUDA max allocated, or
the peak resident set size of the row's process on CPU (which also holds the data and the Python runtime: compare
rows, not absolute values). With peft.sweep_pretrain_steps, a first process fully fine-tunes the model on the other
tasks' sources and every row starts from it. A row trains for train.max_steps on the VQA sources (MILE's origin data,
or its instruction format), then is scored on their test split with eval.* (MILE: free generation, beam 3).

Written to train.output_dir: peft_sweep.{md,csv,json,png} (the table), replication.{md,html,json} (MILE's numbers
beside ours, a verdict per finding), rows/<row>/ (each row's config, logs, export: adapter or model, eval report and
row.json). Rerun one row: `python recipes/peft_sweep.py --config <output_dir>/config.yaml peft.sweep_row=<label>`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from scaling.adapters import count_trainable
from scaling.config import Config, ConfigError, Runtime, parse_cli, save_config
from scaling.data.instruct import instruction_formatter
from scaling.data.loading import all_records, missing_paths
from scaling.evaluation.replication import write_replication
from scaling.evaluation.runner import eval_collator, evaluate_model
from scaling.logging import get_logger, setup_logging
from scaling.sweep import (
    PRETRAIN,
    SweepData,
    grid_rows,
    pretrain_config,
    pretrained_dir,
    row_config,
    row_dir,
    row_threads,
    run_in_own_process,
    run_rows,
    sweep_data,
    table_row,
    write_table,
)
from scaling.training.batches import BatchStream
from scaling.training.checkpoint import export_from_run
from scaling.training.distributed import build_accelerator, unwrapped
from scaling.training.loop import train
from scaling.training.memory import peak_memory, reset_peak_memory
from scaling.training.run import build_model, build_tokenizer, prepare_for_training, run_recipe
from scaling.training.tracking import read_metrics

log = get_logger("recipes.peft_sweep")
RECIPE = Path(__file__).resolve()
ROW_RESULT = "row.json"


def main(argv: list[str] | None = None) -> int:
    cfg, config_path = parse_cli(argv, __doc__.splitlines()[0])
    cfg.validate(Runtime.from_env(), source=config_path)
    if cfg.peft.sweep_row == PRETRAIN:
        return pretrain(cfg)
    if cfg.peft.sweep_row:
        return run_row(cfg)
    return sweep(cfg, config_path)


# ---------------------------------------------------------------------------------------------------------------------
# The sweep: one process per row


def sweep(cfg: Config, config_path: str | None) -> int:
    # 1. every row's config validated before any work, all problems at once
    rows = grid_rows(cfg.peft)
    check_rows(cfg, rows, config_path)
    out_dir = Path(cfg.train.output_dir)
    setup_logging(out_dir, cfg.logging.level)
    log.info("PEFT sweep: %d rows × %d steps → %s", len(rows), cfg.train.max_steps, out_dir)

    # 2. the data checked once and the tokenizer trained once; the resolved config is what every row process reads
    accelerator = build_accelerator(cfg)
    data = sweep_data(cfg, accelerator)
    build_tokenizer(cfg, accelerator, data.train)
    if accelerator.is_main_process:
        save_config(cfg, out_dir)
    config_file = out_dir / "config.yaml"

    # 3. the common starting model, in its own process
    if cfg.peft.sweep_pretrain_steps:
        log.info("pretraining the common starting model: %d steps on %s", cfg.peft.sweep_pretrain_steps,
                 ", ".join(s.label for s in data.pretrain))
        if run_in_own_process(accelerator, RECIPE, config_file, PRETRAIN):
            log.error("pretraining failed; see %s", out_dir / PRETRAIN / "train.log")
            return 1

    # 4. the rows, each in its own process (peft.sweep_processes at a time); table and report rewritten after each
    if accelerator.is_main_process:
        for row in rows:  # a previous sweep's results must not stand in for this one's
            (row_dir(out_dir, row) / ROW_RESULT).unlink(missing_ok=True)
    results, failed = {}, []
    for row, status in run_rows(accelerator, RECIPE, config_file, rows, cfg.peft.sweep_processes, row_threads(cfg)):
        result = row_dir(out_dir, row) / ROW_RESULT
        if status == 0 and result.is_file():
            results[row.label] = json.loads(result.read_text())
            log.info("row %s done: Global %.2f", row.label, results[row.label]["global"] or float("nan"))
        else:
            failed.append(row.label)
            log.error("row %s failed; see %s", row.label, row_dir(out_dir, row))
        table = [results[r.label] for r in rows if r.label in results]
        if accelerator.is_main_process and table:
            paths, report = write_table(table, out_dir), write_replication(table, cfg, out_dir, failed)
    if accelerator.is_main_process and results:
        log.info("table: %s\n%s", paths["md"], paths["md"].read_text())
        log.info("replication report: %s", report["html"])
    accelerator.end_training()
    if failed:
        log.error("%d row(s) failed: %s", len(failed), ", ".join(failed))
    return 1 if failed else 0


def check_rows(cfg: Config, rows, config_path: str | None) -> None:
    """Each row's and the pretraining's config against the launch, and the dataset paths, before any work (the model
    and tokenizer directories the sweep itself writes are not there yet: those of the config are checked instead)."""
    runtime = Runtime.from_env()
    configs = [("pretraining", pretrain_config(cfg))] if cfg.peft.sweep_pretrain_steps else []
    configs += [(f"row {row.label}", row_config(cfg, row)) for row in rows]
    problems = [f"{name}: {p}" for name, run_cfg in configs
                for p in dataclasses.replace(run_cfg, model=cfg.model).problems(runtime)]
    problems += missing_paths(cfg.data.sources)
    if cfg.peft.sweep_processes > 1 and runtime.num_processes > 1:
        problems.append(f"peft.sweep_processes={cfg.peft.sweep_processes} runs rows side by side in a single-process "
                        f"launch; under this {runtime.num_processes}-process launch every row uses all of them: set 1")
    if problems:
        raise ConfigError(sorted(set(problems), key=problems.index), config_path)


# ---------------------------------------------------------------------------------------------------------------------
# One process: the common starting model, or one row


def pretrain(cfg: Config) -> int:
    """Full fine-tuning on the non-VQA sources, exported as the model every row starts from."""
    run_cfg = pretrain_config(cfg)
    accelerator, data, tokenizer = start_process(run_cfg)
    prepared, _ = fit(run_cfg, accelerator, tokenizer, data.pretrain, None)
    export_from_run(accelerator, prepared.model, tokenizer, pretrained_dir(Path(cfg.train.output_dir)))
    accelerator.end_training()
    return 0


def run_row(cfg: Config) -> int:
    """Train one row for the fixed budget, export it, score it; rank 0 writes its line of the table to row.json."""
    row = next(r for r in grid_rows(cfg.peft) if r.label == cfg.peft.sweep_row)
    run_cfg = row_config(cfg, row)
    run_dir = Path(run_cfg.train.output_dir)
    accelerator, data, tokenizer = start_process(run_cfg)
    start = time.perf_counter()
    formatter = instruction_formatter(run_cfg, all_records(data.vqa_train))
    prepared, counts = fit(run_cfg, accelerator, tokenizer, data.vqa_train, formatter)
    memory = max_over_ranks(accelerator, peak_memory(accelerator.device))  # model build + training
    export_from_run(accelerator, prepared.model, tokenizer, run_dir / "model", merge=False)
    collator = eval_collator(tokenizer, run_cfg, unwrapped(accelerator, prepared.model).config, formatter)
    scores = evaluate_model(prepared.model, tokenizer, data.vqa_test, run_cfg, accelerator, run_dir / "eval", collator,
                            name=row.label)
    if accelerator.is_main_process:
        measured = {"memory_mib": memory / 2**20, "memory_kind": memory_kind(accelerator), "pid": os.getpid(),
                    "final_loss": final_loss(run_dir), "seconds": time.perf_counter() - start,
                    **yes_no_counts(data)}
        (run_dir / ROW_RESULT).write_text(json.dumps(table_row(run_cfg, counts, scores, measured), indent=2))
    accelerator.end_training()
    return 0


def start_process(run_cfg: Config):
    """Logging into the run directory, the Accelerator, the resolved config, the seed, the data, the tokenizer."""
    from accelerate.utils import set_seed

    setup_logging(run_cfg.train.output_dir, run_cfg.logging.level)
    accelerator = build_accelerator(run_cfg)
    if accelerator.is_main_process:
        save_config(run_cfg, run_cfg.train.output_dir)
    set_seed(run_cfg.train.seed)
    data = sweep_data(run_cfg, accelerator)
    return accelerator, data, build_tokenizer(run_cfg, accelerator, data.train)


def fit(run_cfg: Config, accelerator, tokenizer, splits, formatter):
    """Build the model of `run_cfg` (PEFT applied) and train it on the library's training path; the peak memory
    window starts here, so data loading before it does not count."""
    reset_peak_memory(accelerator.device)
    model = build_model(run_cfg, tokenizer)
    counts = count_trainable(model)
    stream = BatchStream(splits, run_cfg, tokenizer, model.config.image_size, accelerator.process_index,
                         accelerator.num_processes, instruction=formatter)
    prepared = prepare_for_training(accelerator, model, run_cfg)
    accelerator.init_trackers(Path(run_cfg.train.output_dir).name)
    train(run_cfg, accelerator, prepared, stream, 0)
    stream.close()
    return prepared, counts


def max_over_ranks(accelerator, value: int) -> int:
    """The largest of every rank's value (sync point)."""
    import torch

    return int(accelerator.gather(torch.tensor([value], device=accelerator.device)).max())


def memory_kind(accelerator) -> str:
    where = "CUDA max allocated" if accelerator.device.type == "cuda" else "peak RSS"
    return where + (f" (max over {accelerator.num_processes} ranks)" if accelerator.num_processes > 1 else "")


def yes_no_counts(data: SweepData) -> dict:
    """How many test questions MILE's Closed (yes/no reference) and Opened (the rest) cover."""
    from scaling.evaluation.metrics import YES_NO, normalize_vqa_answer

    closed = sum(normalize_vqa_answer(r.target) in YES_NO for split in data.vqa_test for r in split.records)
    return {"n_closed": closed, "n_opened": sum(len(s.records) for s in data.vqa_test) - closed}


def final_loss(run_dir: Path) -> float | None:
    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    return losses[-1] if losses else None


if __name__ == "__main__":
    run_recipe(main)
