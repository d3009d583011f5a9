"""MILE's component × method table: train every (vision, encoder, decoder) PEFT policy for the same budget, score VQA.

Launch from the repository root (one process; the rows run one after another in it):

    python recipes/peft_sweep.py --config recipes/configs/biomedgpt/peft_sweep_synthetic.yaml
    python recipes/peft_sweep.py --config recipes/configs/biomedgpt/peft_sweep_vqa_rad.yaml \
        "peft.sweep=[T-T-T, F-LoRA-LoRA:4, T-T-LoRA:4]" train.max_steps=2000

Each row (peft.sweep, MILE's ViT-JTM-Dec labels; empty = scaling.sweep.DEFAULT_GRID, the rows of MILE Tables 1-4) is trained with
the fine-tuning recipe's loop on the VQA sources for train.max_steps steps, then scored on their test split. With
peft.sweep_pretrain_steps every row starts from one model fully fine-tuned first on the other tasks' sources. Written
to train.output_dir: peft_sweep.{md,csv,json} (ViT / JTM / Dec, rank, #Params %, memory, Opened, Closed, Global) and
peft_sweep.png (accuracy against trainable %); per row rows/<label>/ holds its step log, adapter and eval report.
Memory is the peak of the row's training: CUDA max allocated, or the process's peak RSS on CPU (which also holds
the data and the Python runtime, so compare rows, not absolute values).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from accelerate.utils import set_seed

from scaling.adapters import count_trainable, save_adapter
from scaling.config import Config, ConfigError, Runtime, parse_cli, save_config, sweep_row
from scaling.data.instruct import instruction_formatter
from scaling.data.loading import SourceSplit, all_records, load_sources, training_sources
from scaling.evaluation.runner import eval_collator, evaluate_model
from scaling.logging import get_logger, setup_logging
from scaling.sweep import DEFAULT_GRID, table_row, write_table
from scaling.training.batches import BatchStream
from scaling.training.distributed import build_accelerator
from scaling.training.loop import train
from scaling.training.memory import peak_memory, reset_peak_memory
from scaling.training.run import build_model, build_tokenizer, prepare_for_training, run_recipe
from scaling.training.tracking import finish_trackers, read_metrics

log = get_logger("recipes.peft_sweep")


def row_configs(cfg: Config, base_dir: Path | None) -> list[tuple[str, Config]]:
    """(label, config) per row; every row validated before any training, all problems at once."""
    rows, problems = [], []
    model = dataclasses.replace(cfg.model, checkpoint=str(base_dir)) if base_dir else cfg.model
    for label in cfg.peft.sweep or DEFAULT_GRID:
        peft = dataclasses.replace(cfg.peft, **sweep_row(label), sweep=[])
        row = with_run(dataclasses.replace(cfg, model=model, peft=peft),
                       Path(cfg.train.output_dir) / "rows" / label.replace(":", "_r").replace("@", "_"))
        problems += [f"row {label}: {p}" for p in row.problems(Runtime.from_env())]
        rows.append((label, row))
    if problems:
        raise ConfigError(problems)
    return rows


def with_run(cfg: Config, run_dir: Path, max_steps: int | None = None) -> Config:
    """The config of one training run of the sweep: its own directory, no step checkpoints (the sweep keeps the
    adapter or the model instead)."""
    steps = max_steps or cfg.train.max_steps
    train_args = dataclasses.replace(cfg.train, output_dir=str(run_dir), max_steps=steps, save_every=steps + 1)
    return dataclasses.replace(cfg, train=train_args)


@dataclasses.dataclass
class SweepData:
    """Every training source (the tokenizer's corpus), the VQA ones every row trains and is scored on, and the
    others, on which the common starting model is pretrained."""

    train: list[SourceSplit]
    vqa_train: list[SourceSplit]
    vqa_test: list[SourceSplit]
    pretrain: list[SourceSplit]


def sweep_data(cfg: Config, accelerator) -> SweepData:
    """Load every training source and split them into the VQA sources (rows) and the rest (pretraining).

    Pretraining on the other tasks means the rows adapt a model that knows the images but not the VQA task, as MILE
    adapted a pretrained MISS to VQA-RAD and SLAKE; with VQA sources only, pretraining uses them.
    """
    train_data = load_sources(training_sources(cfg, accelerator), cfg.data)
    vqa = [s for s in train_data if s.records and s.records[0].task == "vqa"]
    if not vqa:
        raise ConfigError(["the sweep scores VQA (MILE's Opened/Closed/Global): configure at least one VQA source"])
    others = [s for s in train_data if s not in vqa] or train_data
    test_sources = [dataclasses.replace(s.source, split="test") for s in vqa]
    return SweepData(train_data, vqa, load_sources(test_sources, cfg.data, cfg.eval.max_samples), others)


def fit(cfg: Config, tokenizer, train_data: list[SourceSplit], label: str):
    """Build the model of `cfg` (PEFT applied) and train it on the library's training path; returns it prepared,
    with its accelerator, trainable counts and peak training memory."""
    accelerator = build_accelerator(cfg)
    set_seed(cfg.train.seed)  # every row starts from the same weights and draws the same batches
    if accelerator.is_main_process:
        save_config(cfg, cfg.train.output_dir)
    reset_peak_memory()
    model = build_model(cfg, tokenizer)
    counts = count_trainable(model)
    stream = BatchStream(train_data, cfg, tokenizer, model.config.image_size, accelerator.process_index,
                         accelerator.num_processes)
    prepared = prepare_for_training(accelerator, model, cfg)
    accelerator.init_trackers(label)
    train(cfg, accelerator, prepared, stream, 0)
    stream.close()
    memory = peak_memory(accelerator.device)
    accelerator.free_memory(prepared.optimizer, prepared.scheduler)
    return prepared.model, accelerator, counts, memory


def pretrain_base(cfg: Config, tokenizer, train_data: list[SourceSplit]) -> Path:
    """Full fine-tuning on `train_data`, saved as the checkpoint all rows start from."""
    run_dir = Path(cfg.train.output_dir) / "pretrain"
    base = dataclasses.replace(cfg, peft=dataclasses.replace(cfg.peft, vision="full", encoder="full", decoder="full",
                                                             quantize="none", sweep=[]))
    model, accelerator, _, _ = fit(with_run(base, run_dir, cfg.peft.sweep_pretrain_steps), tokenizer, train_data,
                                   "pretrain")
    base_dir = run_dir / "model"
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(base_dir)
    accelerator.wait_for_everyone()
    finish_trackers(accelerator)
    return base_dir


def run_row(label: str, cfg: Config, tokenizer, data: SweepData) -> dict:
    """Train one policy for the fixed budget and score it; returns its table row."""
    start = time.perf_counter()
    model, accelerator, counts, memory = fit(cfg, tokenizer, data.vqa_train, label)
    if cfg.peft.enabled:
        save_adapter(accelerator.unwrap_model(model), Path(cfg.train.output_dir) / "adapter",
                     accelerator.is_main_process)
    formatter = instruction_formatter(cfg, all_records(data.vqa_train))
    collator = eval_collator(tokenizer, cfg, accelerator.unwrap_model(model).config, formatter)
    scores = evaluate_model(model, tokenizer, data.vqa_test, cfg, accelerator,
                            Path(cfg.train.output_dir) / "eval", collator, name=label)
    finish_trackers(accelerator)
    accelerator.free_memory(model)
    return table_row(cfg, counts, memory, scores, final_loss(cfg), time.perf_counter() - start)


def final_loss(cfg: Config) -> float | None:
    losses = [r["loss"] for r in read_metrics(cfg.train.output_dir) if "loss" in r]
    return losses[-1] if losses else None


def main(argv: list[str] | None = None) -> None:
    # 1. config and every row's config, validated before any work
    cfg, config_path = parse_cli(argv, __doc__.splitlines()[0])
    cfg.validate(Runtime.from_env(), source=config_path)
    out_dir = Path(cfg.train.output_dir)
    base_dir = out_dir / "pretrain" / "model" if cfg.peft.sweep_pretrain_steps else None
    rows = row_configs(cfg, base_dir)
    setup_logging(out_dir, cfg.logging.level)
    log.info("PEFT sweep: %d rows × %d steps → %s", len(rows), cfg.train.max_steps, out_dir)

    # 2. data and tokenizer once, shared by all rows; optionally the common starting model
    accelerator = build_accelerator(cfg)
    set_seed(cfg.train.seed)
    data = sweep_data(cfg, accelerator)
    tokenizer = build_tokenizer(cfg, accelerator, data.train)
    if base_dir:
        log.info("pretraining the common starting model: %d steps on %s", cfg.peft.sweep_pretrain_steps,
                 ", ".join(s.label for s in data.pretrain))
        pretrain_base(cfg, tokenizer, data.pretrain)

    # 3. the rows, one after another; the table is rewritten after each so a long sweep can be read while it runs
    table = []
    for label, row_cfg in rows:
        log.info("row %s", label)
        table.append({"label": label, **run_row(label, row_cfg, tokenizer, data)})
        if accelerator.is_main_process:
            paths = write_table(table, out_dir)
    if accelerator.is_main_process:
        log.info("table: %s\n%s", paths["md"], paths["md"].read_text())
    accelerator.end_training()


if __name__ == "__main__":
    run_recipe(main)
