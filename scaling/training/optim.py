"""AdamW with decay / no-decay parameter groups, and warm-up followed by cosine, linear or constant decay."""

from __future__ import annotations

import inspect
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from scaling.config import TrainArgs

NO_DECAY_TABLES = ("embed_positions", "embed_image_positions", "rel_pos_table", "type_embedding")
"""2-d tables that get no weight decay (position and type embeddings); all 1-d tensors (biases, norms) get none too."""


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight matrices with decay; biases, norms, scalars and position tables without."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or any(table in name for table in NO_DECAY_TABLES):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, args: TrainArgs, deepspeed_cpu_adam: bool = False) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: the fused kernel on CUDA and CPU (about 4x faster than foreach on CPU for
    the base preset), foreach elsewhere; DeepSpeed's CPU Adam when asked (ZeRO-Offload with
    zero_force_ds_cpu_optimizer, DeepSpeed's default)."""
    groups = parameter_groups(model, args.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters: check peft.* (everything frozen?) and "
                         "train.freeze_embeddings")
    if deepspeed_cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # JIT-builds its C++ op with gcc on first use

        return DeepSpeedCPUAdam(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, adamw_mode=True)
    kwargs = {}
    signature = inspect.signature(torch.optim.AdamW).parameters
    fusable = all(p.device.type in ("cuda", "cpu") for g in groups for p in g["params"])
    if fusable and "fused" in signature:
        kwargs["fused"] = True
    elif "foreach" in signature:
        kwargs["foreach"] = True
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, **kwargs)


def lr_lambda(step: int, warmup_steps: int, total_steps: int, kind: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warm-up, then the chosen decay."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainArgs) -> LambdaLR:
    """LambdaLR stepped once per optimizer step; its state (last_epoch) is what resume restores."""
    warmup = int(args.warmup_ratio * args.max_steps)

    def schedule(step: int) -> float:
        return lr_lambda(step, warmup, args.max_steps, args.scheduler)

    return LambdaLR(optimizer, schedule)
