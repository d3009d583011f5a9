"""Instruction tuning of BiomedGPT: every sample becomes an instruction (MILE-style templates with answer options,
LLaVA-Med conversations), then zero-shot evaluation on held-out questions, under Accelerate at any scale.

The embedded default needs no arguments and no downloads: it generates the synthetic radiology dataset (cached),
trains a BPE tokenizer on it, instruction-tunes the `mini` preset on a 2-core CPU, exports the model, evaluates it on
questions about held-out images and prints closed / open accuracy and where the report is:

    accelerate launch recipes/instruct.py

Launch (from the repository root; `key=value` overrides follow the config):

    # one process, CPU or GPU
    accelerate launch recipes/instruct.py --config recipes/configs/biomedgpt/tiny_instruct.yaml
    # one node, 8 GPUs, DDP / ZeRO-3
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml --num_processes 8 recipes/instruct.py \
        --config recipes/configs/biomedgpt/base_instruct.yaml
    accelerate launch --config_file accelerate_configs/zero3.yaml --num_processes 8 recipes/instruct.py \
        --config recipes/configs/biomedgpt/large_zero3_instruct.yaml train.lr=2e-5
    # Slurm, N nodes (see the site settings at the top of the script)
    sbatch --nodes 4 launch/slurm_multi_node.sbatch recipes/instruct.py \
        --config recipes/configs/biomedgpt/xlarge_zero3_instruct.yaml

Resume with `train.resume=auto`; SIGTERM (Slurm preemption) writes a checkpoint and exits. Model building, the
training loop and resuming are recipes/finetune.py's (imported from it); only the data formatting and the final
evaluation differ. Test-only fault injection as in recipes/finetune.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

from finetune import load_data_and_model, start_run, train_and_export  # recipes/ is on sys.path as a script

from scaling.config import Config, SourceArgs
from scaling.data.instruct import CandidatePools, InstructionFormatter
from scaling.data.records import Record
from scaling.logging import get_logger
from scaling.training.batches import BatchStream, load_split
from scaling.training.checkpoint import CheckpointError

log = get_logger("recipes.instruct")

DEFAULT_TASKS = ("vqa",)
"""Without data.sources: instruction-tune on the synthetic VQA questions (as MILE tuned on VQA-RAD / SLAKE)."""


def main(argv: list[str] | None = None) -> None:
    # 1-2. config validated before any work, logging, processes, precision, trackers, seed (recipes/finetune.py)
    cfg, accelerator = start_run(argv, __doc__.splitlines()[0])
    run_dir = Path(cfg.train.output_dir)

    # 3. data, tokenizer, model; instruction formatting with answer options drawn from the training answers
    sources, train_records, tokenizer, model = load_data_and_model(cfg, accelerator, tasks=DEFAULT_TASKS)
    formatter = InstructionFormatter(CandidatePools.from_records(r for recs in train_records.values() for r in recs),
                                     seed=cfg.train.seed)
    stream = BatchStream(train_records, sources, cfg, tokenizer, model.config.image_size,
                         accelerator.process_index, accelerator.num_processes, instruction=formatter)

    # 4-7. prepare, resume, train, final checkpoint, export, loss curve (recipes/finetune.py)
    model, step = train_and_export(cfg, accelerator, model, tokenizer, stream)

    # 8. zero-shot evaluation on held-out questions, with the instruction prompts the model was tuned on
    metrics = evaluate(cfg, accelerator, model, tokenizer, sources, formatter)
    if accelerator.is_main_process:
        print_summary(run_dir, step, metrics)
    accelerator.end_training()


def evaluation_records(cfg: Config, sources: list[SourceArgs]) -> dict[str, list[Record]]:
    """data.eval_sources, else the test split of the training sources that have one (VQA only for the default)."""
    from scaling.data.sources import get_source

    chosen = cfg.data.eval_sources or [SourceArgs(s.name, s.path, "test", s.weight, s.options) for s in sources
                                       if "test" in get_source(s.name).splits]
    records = load_split(chosen, cfg.data, "test")
    return {name: recs[: cfg.eval.max_samples] for name, recs in records.items() if recs}


def evaluate(cfg: Config, accelerator, model, tokenizer, sources: list[SourceArgs],
             formatter: InstructionFormatter) -> dict[str, float]:
    """The evaluation library on the held-out records; report in train.output_dir/eval (every rank calls this)."""
    from scaling.data.collate import Collator
    from scaling.evaluation.runner import evaluate_model

    config = accelerator.unwrap_model(model).config
    collator = Collator(tokenizer, config.image_size, cfg.data.max_src_len, cfg.data.max_tgt_len,
                        cfg.data.prompt_type, instruction=formatter)
    model.eval()
    return evaluate_model(model, tokenizer, evaluation_records(cfg, sources), cfg, accelerator,
                          Path(cfg.train.output_dir) / "eval", collator=collator, name="instruct")


def print_summary(run_dir: Path, step: int, metrics: dict[str, float]) -> None:
    """Closed / open accuracy per dataset and where everything is."""
    from scaling.logging import console

    console.print(f"[bold]instruction tuning done[/bold]: {step} steps")
    for key in sorted(k for k in metrics if k.endswith(("closed_accuracy", "open_accuracy", "/accuracy"))):
        console.print(f"  {key:<40} {metrics[key]:6.2f}")
    console.print(f"  report   {run_dir / 'eval' / 'report.html'}  (also report.md, report.json)")
    console.print(f"  model    {run_dir / 'export'}")
    console.print(f"  metrics  {run_dir / 'metrics.jsonl'}, loss curve {run_dir / 'loss.png'}")


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, FloatingPointError) as err:
        get_logger("recipes.instruct").error("%s", err)
        sys.exit(1)
