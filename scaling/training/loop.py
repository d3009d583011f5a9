"""The training loop: one iteration = one optimizer step over `gradient_accumulation_steps` micro-batches.

    step = train(cfg, accelerator, prepared, stream, start_step)

Rank-synchronised decisions (skip a step whose loss is not finite, stop on SIGTERM) use one small all-reduce each,
so every rank takes the same branch and no collective is left waiting.
"""

from __future__ import annotations

import signal
import sys

import torch

from scaling.config import Config
from scaling.logging import get_logger
from scaling.training.batches import BatchStream
from scaling.training.checkpoint import save_checkpoint, trainer_state
from scaling.training.distributed import unwrapped, uses_deepspeed
from scaling.training.tracking import TrainingProgress

log = get_logger(__name__)


class StopSignal:
    """Remembers SIGTERM (Slurm preemption, `scancel`) so the loop can checkpoint at the next step boundary."""

    def __init__(self):
        self.received = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True


def loss_step(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training loss of one micro-batch (only the labelled positions are projected onto the vocabulary)."""
    return model(**batch, return_logits=False).loss


def all_ranks(accelerator, flag: bool) -> bool:
    """Whether `flag` holds on every rank (sync point)."""
    total = accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum").item()
    return total == accelerator.num_processes


def any_rank(accelerator, flag: bool) -> bool:
    """Whether `flag` holds on some rank (sync point)."""
    return accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum").item() > 0


def train(cfg: Config, accelerator, prepared, stream: BatchStream, start_step: int) -> int:
    """Train from `start_step` to train.max_steps; returns the last completed step.

    `prepared` holds the model, optimizer, scheduler and EMA as `prepare_for_training` returned them.
    """
    args, run_dir = cfg.train, cfg.train.output_dir
    model, optimizer, scheduler, ema = prepared.model, prepared.optimizer, prepared.scheduler, prepared.ema
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
                    loss = loss_step(model, batch)
                    usable = all_ranks(accelerator, bool(torch.isfinite(loss.detach())))  # sync point
                    # Every micro-batch goes through backward, so the accumulation window stays the same for the
                    # launcher's engine: DDP's gradients of a poisoned window are dropped below; DeepSpeed finds the
                    # non-finite gradients at the window's end, skips that step and clears the whole window.
                    accelerator.backward(loss)
                    if usable:
                        loss_sum += loss.detach()
                    finite = finite and usable
            # --- optimizer step, or a skipped one ---
            if not finite:
                if deepspeed and not optimizer.step_was_skipped:
                    raise FloatingPointError(deepspeed_applied_nonfinite(step + 1))
                optimizer.zero_grad(set_to_none=True)
                attempts_at_step += 1
                nonfinite_in_a_row += 1
                nonfinite_total += 1
                log.warning("non-finite loss at step %d (attempt %d): step skipped (%d in a row, %d in total)",
                            step + 1, attempts_at_step, nonfinite_in_a_row, nonfinite_total)
                if nonfinite_in_a_row >= args.max_nonfinite_steps:
                    raise FloatingPointError(too_many_nonfinite(cfg, nonfinite_in_a_row, prepared.checkpoint))
                continue
            grad_norm = None
            if args.max_grad_norm > 0:  # DeepSpeed clips inside its step (gradient_clipping) and reports the norm
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step, attempts_at_step, nonfinite_in_a_row = step + 1, 0, 0
            if ema is not None:
                ema.update(unwrapped(accelerator, model))

            # --- bookkeeping: mean loss over ranks (sync point), step log, progress ---
            loss_mean = accelerator.reduce(loss_sum / args.gradient_accumulation_steps, reduction="mean").item()
            lr = scheduler.get_last_lr()[0]
            speed = progress.update(step, loss_mean, lr, samples_per_step)
            row = {"loss": loss_mean, "lr": lr, "samples_per_s": speed, "nonfinite_skipped": nonfinite_total,
                   "images_skipped": stream.images_skipped}
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            accelerator.log(row, step=step)
            if step % args.log_every == 0:
                log.info("step %d/%d  loss %.4f  lr %.2e  %.1f samples/s", step, args.max_steps, loss_mean, lr, speed)

            # --- checkpoint every save_every steps, and on SIGTERM (sync point: all ranks agree to stop) ---
            preempted = any_rank(accelerator, stop.received)
            if step % args.save_every == 0 or preempted:
                prepared.checkpoint = save_checkpoint(accelerator, run_dir, step, trainer_state(cfg, stream),
                                                      args.keep_last, ema, parent=prepared.checkpoint)
            if preempted:
                log.warning("SIGTERM received: checkpoint of step %d written; exiting (resume with "
                            "train.resume=auto)", step)
                accelerator.end_training()
                sys.exit(128 + signal.SIGTERM)
    return step


def too_many_nonfinite(cfg: Config, in_a_row: int, checkpoint) -> str:
    """The stop message: what is intact, and what to change, given the run's own settings."""
    args = cfg.train
    if checkpoint is not None:
        intact = f"The newest checkpoint, {checkpoint}, holds the last good state"
        restart = "then resume with train.resume=auto (the new values apply from the resumed step)"
    else:
        intact = f"No checkpoint was written yet (train.save_every={args.save_every})"
        restart = "then start the run again"
    advice = [f"lower train.lr (now {args.lr:g})"]
    if args.max_grad_norm == 0:
        advice.append("set train.max_grad_norm (e.g. 1.0) to clip gradients")
    if args.mixed_precision == "fp16":
        advice.append("use bf16 instead of fp16")
    return (f"{in_a_row} optimizer steps in a row had a non-finite loss (train.max_nonfinite_steps="
            f"{args.max_nonfinite_steps}); stopping. {intact}: {', '.join(advice)}, {restart}")


def deepspeed_applied_nonfinite(step: int) -> str:
    return (f"step {step} had a non-finite loss, and DeepSpeed applied the update instead of skipping it (its "
            "overflow check is off in this configuration: fp32 without gradient clipping, or bf16.check_grad_overflow "
            "false). The weights are no longer finite; the newest checkpoint is intact. Set train.max_grad_norm > 0 "
            "or use bf16/fp16 with the overflow check, then resume with train.resume=auto")
