"""Multi-task fine-tuning of BiomedGPT over a mixture of biomedical sources (VQA, captioning, classification, NLI,
summarisation, QA), under Accelerate: one CPU or GPU, DDP, DeepSpeed ZeRO-1/2/3 (+ offload), several machines.

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

Resume after a crash or preemption with `train.resume=auto` (the newest complete checkpoint of train.output_dir);
SIGTERM (Slurm preemption) writes a checkpoint and exits. Export a checkpoint with `scaling export RUN_DIR`.
Test-only fault injection: SCALING_FAULT_NONFINITE="STEP:COUNT" makes the loss non-finite on the first COUNT attempts
at optimizer step STEP; SCALING_FAULT_KILL_DURING_SAVE=STEP (see scaling/training/checkpoint.py).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from scaling.config import Config, Runtime, parse_cli, save_config
from scaling.logging import get_logger, setup_logging
from scaling.models.biomedgpt import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from scaling.models.biomedgpt.tokenization import load_tokenizer, train_bpe_tokenizer
from scaling.training.batches import BatchStream, load_split, tokenizer_corpus, training_sources
from scaling.training.checkpoint import (
    TOKENIZER_DIR,
    CheckpointError,
    export_from_run,
    find_resume,
    load_checkpoint,
    save_checkpoint,
    save_run_model_info,
)
from scaling.training.distributed import (
    build_accelerator,
    cast_for_deepspeed,
    fill_deepspeed_auto,
    log_parameter_shares,
    uses_deepspeed,
)
from scaling.training.ema import EMA
from scaling.training.optim import build_optimizer, build_scheduler
from scaling.training.tracking import TrainingProgress, plot_loss, truncate_metrics

log = get_logger("recipes.finetune")

FAULT_NONFINITE = "SCALING_FAULT_NONFINITE"


def build_tokenizer(cfg: Config, accelerator, train_records):
    """The configured tokenizer, or a BPE trained on the training text (rank 0 trains, the others read it)."""
    path = cfg.model.tokenizer or cfg.model.checkpoint
    if path:
        return load_tokenizer(path)
    run_tokenizer = Path(cfg.train.output_dir) / TOKENIZER_DIR
    with accelerator.main_process_first():
        if accelerator.is_main_process and not run_tokenizer.is_dir():
            train_bpe_tokenizer(tokenizer_corpus(train_records)).save_pretrained(run_tokenizer)
    return load_tokenizer(run_tokenizer)


def build_model(cfg: Config, tokenizer) -> BiomedGPTForConditionalGeneration:
    """Preset (or checkpoint) + config overrides, gradient checkpointing, frozen embeddings, PEFT."""
    overrides = {"label_smoothing": cfg.train.label_smoothing, **cfg.model.overrides}
    if cfg.model.image_size is not None:
        overrides["image_size"] = cfg.model.image_size
    if cfg.model.dropout is not None:
        overrides["dropout"] = cfg.model.dropout
    if cfg.model.drop_path_rate is not None:
        overrides["encoder_drop_path_rate"] = overrides["decoder_drop_path_rate"] = cfg.model.drop_path_rate
    if cfg.model.checkpoint:
        model = BiomedGPTForConditionalGeneration.from_pretrained(
            cfg.model.checkpoint, attn_implementation=cfg.model.attn_implementation, **overrides)
    else:
        config = BiomedGPTConfig.from_preset(cfg.model.preset, vocab_size=len(tokenizer), **overrides)
        config._attn_implementation = cfg.model.attn_implementation
        model = BiomedGPTForConditionalGeneration(config)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.peft.enabled:
        from scaling.adapters import apply_peft, count_trainable, print_trainable

        model = apply_peft(model, cfg.peft)
        print_trainable(count_trainable(model))
    if cfg.train.freeze_embeddings:  # after PEFT's trainable policy; tied, so the output projection freezes too
        model.get_input_embeddings().weight.requires_grad_(False)
    return model


class StopSignal:
    """Remembers SIGTERM (Slurm preemption, `scancel`) so the loop can checkpoint at the next step boundary."""

    def __init__(self):
        self.received = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True


def injected_nonfinite(step: int, attempt: int) -> bool:
    """Test-only: SCALING_FAULT_NONFINITE="STEP:COUNT" poisons the first COUNT attempts at optimizer step STEP."""
    spec = os.environ.get(FAULT_NONFINITE)
    if not spec:
        return False
    at, count = (int(x) for x in spec.split(":"))
    return step == at and attempt < count


def train(cfg: Config, accelerator, model, optimizer, scheduler, stream: BatchStream, start_step: int,
          ema: EMA | None) -> int:
    """The training loop: one iteration = one optimizer step over `gradient_accumulation_steps` micro-batches.

    Returns the last completed step. Rank-synchronised decisions (skip a non-finite step, stop on SIGTERM) use one
    small all-reduce each, so every rank takes the same branch and no collective is left waiting.
    """
    args, run_dir = cfg.train, cfg.train.output_dir
    stop = StopSignal()
    step, attempts_at_step, nonfinite_in_a_row, nonfinite_total = start_step, 0, 0, 0
    samples_per_step = args.batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    deepspeed = uses_deepspeed(accelerator)
    progress = TrainingProgress(args.max_steps, step, enabled=accelerator.is_main_process and cfg.logging.progress)
    model.train()
    with progress:
        while step < args.max_steps:
            # --- forward/backward over the micro-batches of one optimizer step ---
            loss_sum = torch.zeros((), device=accelerator.device)
            finite = True
            for _ in range(args.gradient_accumulation_steps):
                batch = stream.next_batch(accelerator.device)
                with accelerator.accumulate(model):
                    loss = model(**batch, return_logits=False).loss
                    if injected_nonfinite(step + 1, attempts_at_step):
                        loss = loss * float("nan")
                    # sync point: all ranks agree whether this micro-batch is usable
                    usable = accelerator.reduce(torch.isfinite(loss.detach()).float(), reduction="sum").item()
                    usable = usable == accelerator.num_processes
                    if usable or not deepspeed:
                        # DDP expects a backward after every forward: a poisoned micro-batch's gradients are
                        # discarded below. DeepSpeed steps inside backward, so there a bad loss never enters it.
                        accelerator.backward(loss)
                    if usable:
                        loss_sum += loss.detach()
                    finite = finite and usable
            # --- optimizer step, or a skipped one ---
            if not finite:
                optimizer.zero_grad(set_to_none=True)
                attempts_at_step += 1
                nonfinite_in_a_row += 1
                nonfinite_total += 1
                log.warning("non-finite loss at step %d (attempt %d): step skipped (%d in a row, %d in total)",
                            step + 1, attempts_at_step, nonfinite_in_a_row, nonfinite_total)
                if nonfinite_in_a_row >= args.max_nonfinite_steps:
                    raise FloatingPointError(
                        f"{nonfinite_in_a_row} optimizer steps in a row had a non-finite loss (train."
                        f"max_nonfinite_steps={args.max_nonfinite_steps}); stopping. The last good checkpoint in "
                        f"{run_dir}/checkpoints is intact: lower train.lr, enable train.max_grad_norm or use bf16 "
                        "instead of fp16, then resume with train.resume=auto")
                continue
            grad_norm = None
            if args.max_grad_norm > 0:  # DeepSpeed clips inside its step (gradient_clipping) and reports the norm
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step, attempts_at_step, nonfinite_in_a_row = step + 1, 0, 0
            if ema is not None:
                ema.update(accelerator.unwrap_model(model))

            # --- bookkeeping: mean loss over ranks (sync point), step log, progress ---
            loss_mean = accelerator.reduce(loss_sum / args.gradient_accumulation_steps, reduction="mean").item()
            lr = scheduler.get_last_lr()[0]
            speed = progress.update(step, loss_mean, lr, samples_per_step)
            row = {"loss": loss_mean, "lr": lr, "samples_per_s": speed, "nonfinite_skipped": nonfinite_total}
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            accelerator.log(row, step=step)
            if step % args.log_every == 0:
                log.info("step %d/%d  loss %.4f  lr %.2e  %.1f samples/s", step, args.max_steps, loss_mean, lr, speed)

            # --- checkpoint every save_every steps, and on SIGTERM (sync point: all ranks agree to stop) ---
            preempted = accelerator.reduce(torch.tensor(float(stop.received), device=accelerator.device),
                                           reduction="sum").item() > 0
            if step % args.save_every == 0 or preempted:
                save_checkpoint(accelerator, run_dir, step, {"data": stream.state_dict()}, args.keep_last, ema)
            if preempted:
                log.warning("SIGTERM received: checkpoint of step %d written; exiting (resume with "
                            "train.resume=auto)", step)
                accelerator.end_training()
                sys.exit(128 + signal.SIGTERM)
    return step


def train_and_export(cfg: Config, accelerator, model, tokenizer, stream: BatchStream):
    """Steps 4-7 of both recipes: prepare for the topology, resume, train, final checkpoint, export, loss curve.

    Returns the prepared model and the last completed step.
    """
    run_dir = Path(cfg.train.output_dir)
    # 4. optimizer, schedule, EMA; one prepare() call wraps everything for the launch topology
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    fill_deepspeed_auto(accelerator, cfg)
    model = cast_for_deepspeed(accelerator, model)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    log_parameter_shares(accelerator, model)
    ema = EMA(accelerator.unwrap_model(model), cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    accelerator.init_trackers(run_dir.name)

    # 5. resume: weights, optimizer, schedule, RNG, EMA and the exact data position
    start_step = resume(cfg, accelerator, stream, ema)

    # 6. train, then the final checkpoint
    step = train(cfg, accelerator, model, optimizer, scheduler, stream, start_step, ema)
    stream.close()
    if step % cfg.train.save_every:
        save_checkpoint(accelerator, run_dir, step, {"data": stream.state_dict()}, cfg.train.keep_last, ema)

    # 7. export a save_pretrained directory (EMA weights when enabled), loss curve
    if ema is not None:
        ema.copy_to(accelerator.unwrap_model(model))
    export_from_run(accelerator, model, tokenizer, run_dir / "export")
    if accelerator.is_main_process:
        plot_loss(run_dir)
    return model, step


def start_run(argv: list[str] | None, description: str) -> tuple[Config, Accelerator]:
    """What every training recipe begins with: the config (YAML + overrides, validated against the launch environment
    before any work), logging into the run directory, the Accelerator, the resolved config.yaml and the seed."""
    cfg, config_path = parse_cli(argv, description)
    cfg.validate(Runtime.from_env(), source=config_path)
    setup_logging(cfg.train.output_dir, cfg.logging.level)
    accelerator = build_accelerator(cfg)  # processes, precision, trackers
    if accelerator.is_main_process:
        save_config(cfg, cfg.train.output_dir)
    set_seed(cfg.train.seed)  # identical weights on every rank, then per-rank data order
    return cfg, accelerator


def load_data_and_model(cfg: Config, accelerator, tasks: tuple[str, ...] | None = None):
    """Training sources (the synthetic data's `tasks` when none are configured), their train records, the tokenizer
    and the model; the model and tokenizer info is written into the run directory."""
    sources = training_sources(cfg, accelerator, tasks=tasks)
    train_records = load_split(sources, cfg.data, "train")
    tokenizer = build_tokenizer(cfg, accelerator, train_records)
    model = build_model(cfg, tokenizer)
    if accelerator.is_main_process:
        save_run_model_info(Path(cfg.train.output_dir), model.config, tokenizer)
    return sources, train_records, tokenizer, model


def main(argv: list[str] | None = None) -> None:
    # 1-2. config validated before any work, logging, processes, precision, trackers, seed
    cfg, accelerator = start_run(argv, __doc__.splitlines()[0])
    run_dir = Path(cfg.train.output_dir)

    # 3. data, tokenizer, model
    sources, train_records, tokenizer, model = load_data_and_model(cfg, accelerator)
    stream = BatchStream(train_records, sources, cfg, tokenizer, model.config.image_size,
                         accelerator.process_index, accelerator.num_processes)

    # 4-7. prepare, resume, train, final checkpoint, export, loss curve
    model, step = train_and_export(cfg, accelerator, model, tokenizer, stream)
    if accelerator.is_main_process:
        log.info("done: %d steps, export in %s, metrics in %s", step, run_dir / "export", run_dir / "metrics.jsonl")
    accelerator.end_training()


def resume(cfg: Config, accelerator, stream: BatchStream, ema: EMA | None) -> int:
    """Load the checkpoint train.resume points at (none: start at step 0); drop step-log lines it will redo."""
    path = find_resume(cfg.train.output_dir, cfg.train.resume)
    if path is None:
        if cfg.train.resume == "auto":
            log.info("train.resume=auto: no complete checkpoint in %s, starting at step 0", cfg.train.output_dir)
        start = 0
    else:
        state = load_checkpoint(accelerator, path, ema)
        stream.load_state_dict(state["data"])
        start = state["step"]
        log.info("resumed from %s at step %d", path, start)
    if accelerator.is_main_process:
        dropped = truncate_metrics(cfg.train.output_dir, start)
        if dropped:
            log.info("dropped %d step-log lines after step %d (those steps are redone)", dropped, start)
    accelerator.wait_for_everyone()
    return start


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, FloatingPointError) as err:
        get_logger("recipes.finetune").error("%s", err)
        sys.exit(1)
