"""Multi-task fine-tuning of BiomedGPT over a mixture of biomedical sources (VQA, captioning, classification, NLI,
summarisation, QA), optionally as instructions (data.instruction), under Accelerate: one CPU or GPU, DDP, DeepSpeed
ZeRO-1/2/3 (+ offload), several machines; then an evaluation of the exported model (eval.after_training).

Launch (from the repository root; `key=value` overrides follow the config):

    # one process, CPU or GPU
    accelerate launch recipes/finetune.py --config recipes/configs/biomedgpt/tiny_finetune.yaml
    # 2 CPU processes (DDP over gloo)
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/finetune.py \
        --config recipes/configs/biomedgpt/test_finetune.yaml
    # one node, 8 GPUs, DDP / ZeRO-2 / ZeRO-3
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml --num_processes 8 recipes/finetune.py \
        --config recipes/configs/biomedgpt/base_finetune.yaml
    accelerate launch --config_file accelerate_configs/zero3.yaml --num_processes 8 recipes/finetune.py \
        --config recipes/configs/biomedgpt/large_zero3_finetune.yaml train.lr=5e-5
    # Slurm, N nodes (see the site settings at the top of the script)
    sbatch --nodes 4 launch/slurm_multi_node.sbatch recipes/finetune.py \
        --config recipes/configs/biomedgpt/xlarge_zero3_finetune.yaml

Without --config it fine-tunes the `mini` preset on all six tasks of the embedded synthetic data. Resume after a crash
or preemption with `train.resume=auto` (the newest complete checkpoint of train.output_dir); SIGTERM (Slurm
preemption) writes a checkpoint and exits. Export a checkpoint with `scaling export RUN_DIR`. Instruction tuning is
this recipe with data.instruction=true: recipes/instruct.py runs it with the embedded instruction job as its default.
"""

from __future__ import annotations

from pathlib import Path

from scaling.data.instruct import instruction_formatter
from scaling.data.loading import all_records, evaluation_sources, load_sources, require_records, training_sources
from scaling.logging import console, get_logger
from scaling.training.batches import BatchStream
from scaling.training.loop import train
from scaling.training.run import (
    build_tokenizer_and_model,
    evaluate_after_training,
    exempt_from_cycle_collection,
    finish_training,
    prepare_for_training,
    resume,
    run_recipe,
    start_run,
)

log = get_logger("recipes.finetune")


def main(argv: list[str] | None = None) -> None:
    # 1. config validated before any work, logging, processes, precision, trackers, seed
    cfg, accelerator = start_run(argv, __doc__.splitlines()[0])
    run_dir = Path(cfg.train.output_dir)

    # 2. data: the training sources with their records; the held-out datasets, checked before training starts
    sources = training_sources(cfg, accelerator)
    train_data = require_records(load_sources(sources, cfg.data))
    held_out = []
    if cfg.eval.after_training:
        held_out = require_records(load_sources(evaluation_sources(cfg, sources), cfg.data, cfg.eval.max_samples))
    exempt_from_cycle_collection()  # the records live as long as the run

    # 3. tokenizer, model (+ PEFT), and this rank's batch stream (instruction prompts with data.instruction)
    tokenizer, model = build_tokenizer_and_model(cfg, accelerator, train_data)
    formatter = instruction_formatter(cfg, all_records(train_data))
    stream = BatchStream(train_data, cfg, tokenizer, model.config.image_size, accelerator.process_index,
                         accelerator.num_processes, instruction=formatter)

    # 4. optimizer, schedule, EMA; one prepare() for the launch topology
    prepared = prepare_for_training(accelerator, model, cfg)
    accelerator.init_trackers(run_dir.name)

    # 5. resume: weights, optimizer, schedule, RNG, EMA and the exact data position
    start_step = resume(cfg, accelerator, stream, prepared)

    # 6. train; final checkpoint, export (EMA weights when enabled), loss curve
    step = train(cfg, accelerator, prepared, stream, start_step)
    finish_training(cfg, accelerator, prepared, tokenizer, stream, step)

    # 7. evaluation of the trained model on the held-out datasets, with the prompts it was trained on
    metrics = {}
    if held_out:
        metrics = evaluate_after_training(cfg, accelerator, prepared.model, tokenizer, held_out, formatter)
    if accelerator.is_main_process:
        print_summary(run_dir, step, metrics)
    accelerator.end_training()


def print_summary(run_dir: Path, step: int, metrics: dict[str, float]) -> None:
    """Accuracy per held-out dataset (closed / open for VQA) and where everything is."""
    console.print(f"[bold]training done[/bold]: {step} steps")
    for key in sorted(k for k in metrics if k.endswith(("closed_accuracy", "open_accuracy", "/accuracy"))):
        console.print(f"  {key:<40} {metrics[key]:6.2f}")
    if metrics:
        console.print(f"  report   {run_dir / 'eval' / 'report.html'}  (also report.md, report.json)")
    console.print(f"  model    {run_dir / 'export'}")
    console.print(f"  metrics  {run_dir / 'metrics.jsonl'}, loss curve {run_dir / 'loss.png'}")


if __name__ == "__main__":
    run_recipe(main)
