"""Throughput instruments: the toolkit's training loop and a bare torch loop timed on the same batches, FLOPs per
step and MFU against a dense-matmul peak measured on the same device, data-loader and generation speed.

    shape = BatchShape(batch=4, image_size=128, src_len=32, tgt_len=8)
    batches = synthetic_batches(model.config, shape, device)
    peak = matmul_peak(torch.bfloat16, device)                  # FLOP/s, this run's ceiling for MFU
    flops = step_flops(bare_model, batches[0], "bf16", device)   # one forward + backward
    toolkit = ToolkitLoop(cfg, accelerator, prepare_for_training(accelerator, model, cfg), batches)
    bare = BareLoop(bare_model, batches, "bf16", device)
    seconds = toolkit.run(steps), bare.run(steps)

Every timer synchronises the device before reading the clock, so CUDA's queued kernels count where they run.
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from scaling.training.loop import loss_step, train

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class BatchShape:
    """A micro-batch with every text slot filled (no padding) and one image per sample."""

    batch: int
    image_size: int
    src_len: int
    tgt_len: int

    @property
    def image_tokens(self) -> int:
        """Patches per image: the ResNet downsamples by 16."""
        return (self.image_size // 16) ** 2


# ---------------------------------------------------------------------------------------------------------------------
# Device, dtype, batches


def cpu_oversubscribed() -> bool:
    """A CPU-only host whose 1-minute load average exceeds its cores (other jobs share them)."""
    return not torch.cuda.is_available() and os.getloadavg()[0] > (os.cpu_count() or 1)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with the intra-op thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(precision: str, device: torch.device):
    """The autocast context accelerate uses for `precision` (none for fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def synthetic_batches(config, shape: BatchShape, device: torch.device, count: int = 2) -> list[dict]:
    """`count` fixed random batches of `shape` on `device` (seeded: every run draws the same)."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        batch = {
            "input_ids": torch.randint(4, config.vocab_size, (shape.batch, shape.src_len), generator=generator),
            "attention_mask": torch.ones(shape.batch, shape.src_len, dtype=torch.long),
            "pixel_values": torch.randn(shape.batch, 3, shape.image_size, shape.image_size, generator=generator),
            "patch_masks": torch.ones(shape.batch, dtype=torch.bool),
            "labels": torch.randint(4, config.vocab_size, (shape.batch, shape.tgt_len), generator=generator),
        }
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


# ---------------------------------------------------------------------------------------------------------------------
# FLOPs and the matmul ceiling


def matmul_peak(dtype: torch.dtype, device: torch.device, seconds: float = 2.0) -> float:
    """Dense square-matmul FLOP/s of `dtype` on `device` (the best of a few timed runs)."""
    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up: kernel selection, AMX/tensor-core initialisation
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        synchronize(device)
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start))
    return best


def step_flops(model, batch: dict, precision: str, device: torch.device) -> int:
    """FLOPs of one forward + backward (matmuls, convolutions, attention) as counted by FlopCounterMode."""
    model.train()
    counter = FlopCounterMode(display=False)
    with counter, autocast(precision, device):
        loss_step(model, batch).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------------------------------
# Timed training loops


class FixedBatches:
    """A BatchStream stand-in for the training loop: the same prepared batches in turn."""

    images_skipped = 0  # the step log's count of undecodable images: these batches are decoded already

    def __init__(self, batches: list[dict]):
        self.batches, self.position = batches, 0

    def next_batch(self, device: torch.device) -> dict:
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position}


class ToolkitLoop:
    """The library's training loop (`scaling.training.loop.train`) on fixed batches, continued `steps` at a time."""

    def __init__(self, cfg, accelerator, prepared, batches: list[dict]):
        self.cfg, self.accelerator, self.prepared = cfg, accelerator, prepared
        self.stream, self.step = FixedBatches(batches), 0

    def run(self, steps: int) -> float:
        """Run `steps` more optimizer steps; seconds taken."""
        self.cfg.train.max_steps = self.step + steps
        synchronize(self.accelerator.device)
        start = time.perf_counter()
        self.step = train(self.cfg, self.accelerator, self.prepared, self.stream, self.step)
        synchronize(self.accelerator.device)
        return time.perf_counter() - start


class BareLoop:
    """The same work without the toolkit, written independently of it on purpose: autocast forward, backward,
    clipping, AdamW, zero_grad. AdamW is torch's fused kernel on CUDA and CPU, as in the toolkit, so the overhead
    compares like with like."""

    def __init__(self, model, batches: list[dict], precision: str, device: torch.device):
        self.model, self.batches, self.precision, self.device = model.train(), batches, precision, device
        fused = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, **fused)
        self.position = 0

    def run(self, steps: int) -> float:
        """Run `steps` more optimizer steps; seconds taken."""
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            batch = self.batches[self.position % len(self.batches)]
            self.position += 1
            with autocast(self.precision, self.device):
                loss = self.model(**batch, return_logits=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)
        return time.perf_counter() - start


def step_metrics(results: dict, toolkit_s: float, bare_s: float) -> dict:
    """Throughput, MFU and overhead from the fastest repeat of each loop (`results` holds the shape, the FLOPs per
    step and the matmul peak)."""
    shape = results["shape"]
    image_tokens = shape["batch"] * shape["image_tokens"]
    text_tokens = shape["batch"] * (shape["src_len"] + shape["tgt_len"])
    flops = results["flops_per_step"]
    return {
        "step_time_s": toolkit_s,
        "bare_step_time_s": bare_s,
        "samples_per_s": shape["batch"] / toolkit_s,
        "image_tokens_per_s": image_tokens / toolkit_s,
        "text_tokens_per_s": text_tokens / toolkit_s,
        "tokens_per_s": (image_tokens + text_tokens) / toolkit_s,
        "achieved_flops": flops / toolkit_s,
        "mfu_of_matmul_peak": flops / toolkit_s / results["matmul_peak_flops"],
        "bare_mfu_of_matmul_peak": flops / bare_s / results["matmul_peak_flops"],
        "toolkit_overhead": toolkit_s / bare_s - 1.0,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Data loader


def loader_throughput(shape: BatchShape, workers: int, batches: int, step_samples_per_s: float) -> dict:
    """Samples/s of the recipes' BatchStream over synthetic records (mixture, image decode + augment, tokenize, pad):
    with `workers` image threads, and with the images transformed in the calling thread."""
    from scaling.config import SourceArgs, load_config
    from scaling.data.loading import load_sources
    from scaling.data.synthetic import generate_synthetic
    from scaling.models.biomedgpt.tokenization import train_bpe_tokenizer
    from scaling.training.batches import BatchStream
    from scaling.training.run import tokenizer_corpus

    # The fixed benchmark shape truncates prompts on purpose; the Collator's truncation warnings are noise here.
    logging.getLogger("scaling.data.collate").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        data = generate_synthetic(Path(tmp) / "synthetic", n_images=48, seed=0, image_size=shape.image_size)
        sources = [SourceArgs(name=s.loader, path=str(s.path), options=dict(s.options)) for s in data.sources.values()]
        train_data = load_sources(sources, load_config(None, []).data)
        tokenizer = train_bpe_tokenizer(tokenizer_corpus(train_data))

        def stream(threads: int) -> BatchStream:
            cfg = load_config(None, [f"data.num_workers={threads}", f"train.batch_size={shape.batch}",
                                     f"data.max_src_len={shape.src_len}", f"data.max_tgt_len={shape.tgt_len}"])
            return BatchStream(train_data, cfg, tokenizer, shape.image_size, rank=0, world_size=1)

        threaded = samples_per_s(stream(workers), batches, shape.batch)
        in_process = samples_per_s(stream(0), batches, shape.batch)
    return {"loader_samples_per_s": threaded, "loader_in_process_samples_per_s": in_process,
            "loader_workers": workers, "loader_vs_step": threaded / step_samples_per_s}


def samples_per_s(stream, batches: int, batch_size: int) -> float:
    """Samples/s over `batches` batches after the first (thread start-up excluded); the stream is closed after."""
    cpu = torch.device("cpu")
    stream.next_batch(cpu)
    start = time.perf_counter()
    for _ in range(batches):
        stream.next_batch(cpu)
    elapsed = time.perf_counter() - start
    stream.close()
    return batches * batch_size / elapsed


# ---------------------------------------------------------------------------------------------------------------------
# Generation


def generation_throughput(model, batch: dict, precision: str, prompts: int, new_tokens: int,
                          device: torch.device) -> dict:
    """Greedy decoding tokens/s: KV cache vs none (batched), and `prompts` prompts together vs one by one."""
    model.eval()
    inputs = {k: v[:1].repeat(prompts, *[1] * (v.dim() - 1)) for k, v in batch.items() if k != "labels"}
    # Vary the prompts so no cache of identical rows can help the batch.
    inputs["input_ids"] = torch.randint(4, model.config.vocab_size, inputs["input_ids"].shape, device=device)

    def timed(kwargs: dict, use_cache: bool) -> float:
        synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode(), autocast(precision, device):
            out = model.generate(**kwargs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 num_beams=1, use_cache=use_cache)
        synchronize(device)
        assert out.shape[1] >= new_tokens, out.shape
        return time.perf_counter() - start

    timed({k: v[:1] for k, v in inputs.items()}, True)  # warm-up
    cached = timed(inputs, True)
    uncached = timed(inputs, False)
    one_by_one = sum(timed({k: v[i:i + 1] for k, v in inputs.items()}, True) for i in range(prompts))
    tokens = prompts * new_tokens
    model.train()
    return {
        "generation_tokens_per_s": tokens / cached,
        "generation_uncached_tokens_per_s": tokens / uncached,
        "generation_one_by_one_tokens_per_s": tokens / one_by_one,
        "kv_cache_speedup": uncached / cached,
        "batched_generation_speedup": one_by_one / cached,
    }
