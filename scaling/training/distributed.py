"""The Accelerator: the one place that knows about CPU/gloo, DeepSpeed "auto" values, precision and trackers.

    accelerator = build_accelerator(cfg)     # before the model is built (ZeRO-3 init, seeding)
    fill_deepspeed_auto(accelerator, cfg)    # before accelerator.prepare(...)

Recipes never construct an Accelerator themselves, so every launch topology (one CPU, one GPU, DDP, ZeRO-1/2/3,
offload, several machines, Slurm) takes the same path.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    DynamoBackend,
    InitProcessGroupKwargs,
    ProjectConfiguration,
)

from scaling.config import Config
from scaling.logging import get_logger
from scaling.training.tracking import MetricsLog

log = get_logger(__name__)

PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)
"""Long enough for rank 0 to write a ZeRO-3 export while the others wait at a barrier."""


def build_accelerator(cfg: Config) -> Accelerator:
    """Accelerator for the current launch: gloo on CPU-only hosts, precision, accumulation, jsonl (+ tensorboard)."""
    # multi-task batches leave parts of the model unused (no image in a text-only batch, image-code layers)
    handlers: list = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    launched = "LOCAL_RANK" in os.environ  # torchrun / accelerate launch / deepspeed started this process
    if launched and not torch.cuda.is_available():
        # Without an explicit backend accelerate treats a CPU-only DeepSpeed launch as one process and DeepSpeed's
        # batch-size check fails; gloo gives DDP and ZeRO a working process group on CPUs.
        handlers.append(InitProcessGroupKwargs(backend="gloo", timeout=PROCESS_GROUP_TIMEOUT))
    elif launched:
        handlers.append(InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT))
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    accelerator = Accelerator(
        # several processes on a CPU-only host without DeepSpeed: accelerate's MULTI_CPU mode (DDP over gloo);
        # DeepSpeed must not get cpu=True (accelerate switches it off then)
        cpu=launched and not torch.cuda.is_available() and not deepspeed,
        mixed_precision=resolve_mixed_precision(cfg),
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        dynamo_backend="inductor" if cfg.train.compile else None,  # None: the launcher's --dynamo_backend
        log_with=trackers(cfg),
        project_config=ProjectConfiguration(project_dir=cfg.train.output_dir,
                                            logging_dir=os.path.join(cfg.train.output_dir, "tensorboard")),
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,  # the loop steps the scheduler once per optimizer step itself
    )
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.train.cpu_threads))
        keep_freed_memory()
        keep_compiled_kernels()
        log.info("CPU: %d intra-op threads per process", torch.get_num_threads())
    backend = accelerator.state.dynamo_plugin.backend
    if backend != DynamoBackend.NO:  # train.compile or the launcher's --dynamo_backend
        log.info("torch.compile (%s): the first step compiles the model, and the first batch of another length "
                 "compiles it once more for every length (minutes each on a CPU)", backend.value.lower())
    return accelerator


GLIBC_MALLOC_TUNING = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> None:
    """glibc malloc: serve large tensors from the heap and keep what is freed for the next step.

    By default every activation above malloc's mmap threshold (at most 32 MiB) is mapped afresh and page-faulted in
    at every step: at BiomedGPT-Base 384 px that was 1.3 s of system time in an 11 s step on one CPU thread; with
    this, none, and 10 % shorter steps (peak RSS +3 %). A no-op where the C library is not glibc, and where the
    user tunes malloc through its MALLOC_*_ environment variables (e.g. to measure memory that freed tensors return).
    """
    if any(name in os.environ for name in GLIBC_MALLOC_TUNING):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (AttributeError, OSError):
        return
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # malloc.h
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 2**31 - 1)
    mallopt(m_top_pad, 64 << 20)


ONEDNN_CACHE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_CAPACITY = 8192


def keep_compiled_kernels() -> None:
    """Let oneDNN keep 8x more compiled kernels (its primitive cache; 1,024 by default).

    Every matmul and convolution shape gets its own JIT-compiled kernel, and batches padded to their longest sample
    bring new shapes at every step: the default job meets 46 (prompt, target) length pairs in its 2,000 steps, and
    with the default cache its steps over a stream of 31 pairs took 7-13 % longer per token than over a cycle of 10
    (1-2 % with 4,096 or 8,192 entries; peak RSS unchanged), in paired rounds. oneDNN reads the variable when it
    first compiles a kernel, so this must run before the first matmul; a value of the user's own wins.
    """
    os.environ.setdefault(ONEDNN_CACHE, str(ONEDNN_CACHE_CAPACITY))


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def under_launcher() -> bool:
    """Whether a launcher started this process: torchrun / accelerate launch with several processes (LOCAL_RANK) or
    a single-process `accelerate launch` (ACCELERATE_USE_CPU is always set by it)."""
    return "LOCAL_RANK" in os.environ or "ACCELERATE_USE_CPU" in os.environ


def die_with_launcher() -> None:
    """Under a launcher, have Linux send this process SIGTERM when the launcher dies.

    The training loop then writes a checkpoint at the next step boundary and exits, instead of training on as an
    orphan beside a restarted job; a SIGTERM that kills a single-process `accelerate launch` (e.g. `docker stop`)
    reaches the run the same way. No effect off Linux or without a launcher.
    """
    if not under_launcher() or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("could not ask to be stopped with the launcher (prctl: %s)", os.strerror(ctypes.get_errno()))
    elif os.getppid() == 1:  # the launcher died before the request: re-parented to init
        os.kill(os.getpid(), signal.SIGTERM)


def cpu_threads(requested: int) -> int:
    """`requested`, or the cores this process may use divided among the processes started on this machine."""
    if requested:
        return requested
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return max(1, len(os.sched_getaffinity(0)) // local_processes)


def resolve_mixed_precision(cfg: Config) -> str:
    """The launcher's --mixed_precision when it asks for one, else train.mixed_precision."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher != "no" and cfg.train.mixed_precision not in ("no", launcher):
        log.warning("accelerate launch asks for mixed_precision=%s, the config for %s; using %s",
                    launcher, cfg.train.mixed_precision, launcher)
    return launcher if launcher != "no" else cfg.train.mixed_precision


def trackers(cfg: Config) -> list:
    """A JSONL metrics log always; tensorboard when enabled and installed."""
    out: list = [MetricsLog(cfg.train.output_dir)]
    if cfg.logging.tensorboard:
        try:
            import tensorboard  # noqa: F401

            out.append("tensorboard")
        except ImportError:
            log.warning("logging.tensorboard=true but the tensorboard package is not installed; logging to jsonl only")
    return out


def unwrapped(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, out of its DDP or DeepSpeed wrapper and out of torch.compile's, whose parameter names
    would gain an `_orig_mod.` prefix (accelerate keeps that wrapper unless told otherwise)."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Accelerator) -> int:
    """The ZeRO stage of this launch (0 without DeepSpeed)."""
    if not uses_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def fill_deepspeed_auto(accelerator: Accelerator, cfg: Config) -> None:
    """Replace the DeepSpeed JSON's "auto" batch, accumulation and clipping values by the recipe config's."""
    if not uses_deepspeed(accelerator):
        return
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    values = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "train_batch_size": cfg.train.batch_size * cfg.train.gradient_accumulation_steps * accelerator.num_processes,
        "gradient_clipping": cfg.train.max_grad_norm,
    }
    for key, value in values.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            log.warning("DeepSpeed config sets %s=%s, the recipe config implies %s; DeepSpeed's value wins",
                        key, ds[key], value)


def optimizer_offload(accelerator: Accelerator) -> str:
    """Where DeepSpeed keeps the optimizer states: "none" (on the device, or no DeepSpeed), "cpu" or "nvme"."""
    if not uses_deepspeed(accelerator):
        return "none"
    zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    return str(zero.get("offload_optimizer", {}).get("device", "none") or "none")


def uses_deepspeed_cpu_adam(accelerator: Accelerator) -> bool:
    """Whether the optimizer must be DeepSpeed's CPU Adam: ZeRO-Offload with zero_force_ds_cpu_optimizer left at
    DeepSpeed's default (true). The shipped zero3_offload.json sets it false: torch's fused AdamW steps an offloaded
    partition as fast on the project's CPU host and needs no C++ build (accelerate_configs/deepspeed/README.md)."""
    if optimizer_offload(accelerator) == "none":
        return False
    return bool(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_force_ds_cpu_optimizer", True))


def cast_for_deepspeed(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """Under DeepSpeed bf16/fp16, cast the whole model (buffers included) before prepare().

    DeepSpeed casts parameters only; the ResNet's BatchNorm running statistics would stay float32 and
    `F.batch_norm` refuses mixed dtypes. Every parameter, PEFT adapters included, is then 16-bit on the device;
    DeepSpeed's optimizer keeps the fp32 master copy of the trainable ones.
    """
    if not uses_deepspeed(accelerator):
        return model
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    return model.to(dtype) if dtype is not None else model


def log_parameter_shares(accelerator: Accelerator, model) -> tuple[int, int]:
    """Log (every rank) how many parameter elements this rank holds: under ZeRO-3 about 1/N of them."""
    local = total = 0
    for param in unwrapped(accelerator, model).parameters():
        total += getattr(param, "ds_numel", param.numel())
        local += param.ds_tensor.numel() if hasattr(param, "ds_tensor") else param.numel()
    log.info("rank %d holds %d of %d parameter elements (%.1f%%, ZeRO stage %d)", accelerator.process_index, local,
             total, 100.0 * local / total, zero_stage(accelerator), extra={"all_ranks": True})
    return local, total
