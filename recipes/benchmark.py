"""Benchmark: training-step speed, MFU, toolkit overhead, data-loader throughput, generation speed and peak memory,
all measured in one run on one device, written as JSON and a Markdown table with the targets beside the numbers.

    # this CPU (small default shapes; a few minutes)
    python recipes/benchmark.py --preset base --precision bf16
    # a GPU, the shapes of a real run
    python recipes/benchmark.py --preset base --precision bf16 --batch 32 --image-size 384 --src-len 128 --tgt-len 32
    # under a launch topology: the toolkit loop runs under it, the bare loop beside it on every rank
    accelerate launch --config_file accelerate_configs/zero2.yaml recipes/benchmark.py --preset large --batch 8

What is measured (`--out`/benchmark.json, benchmark.md):
  * toolkit step: the training loop of recipes/finetune.py (Accelerator, AdamW, schedule, clipping, its sync points)
    on fixed synthetic batches of the given shape; samples/s and tokens/s (image patches + encoder and decoder text);
  * bare step: the same batches through a plain forward/backward/AdamW loop (autocast, fused AdamW as in the
    toolkit): the toolkit overhead is the ratio of the two step times;
  * MFU: FLOPs of one forward+backward counted by torch's FlopCounterMode / step time / the dense matmul throughput
    of the same dtype measured on the same device in the same run;
  * data loader: the recipes' BatchStream (mixture, image decode + augment in `--workers` threads, tokenize, pad)
    over synthetic records, in samples/s, against what one training step consumes;
  * generation: greedy decoding of `--new-tokens` tokens with and without the KV cache, and a batch of
    `--gen-batch` prompts against the same prompts one by one;
  * peak memory: CUDA max allocated, or the process's peak RSS on CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from scaling.config import load_config
from scaling.environment import require_supported_versions
from scaling.logging import get_logger
from scaling.models.biomedgpt import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from scaling.training.distributed import build_accelerator, fill_deepspeed_auto
from scaling.training.memory import format_bytes, peak_memory, reset_peak_memory
from scaling.training.optim import build_optimizer, build_scheduler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune import train  # noqa: E402 - the recipe's own training loop is what gets timed

log = get_logger("recipes.benchmark")

TARGETS = {
    "mfu_of_matmul_peak": (">=", 0.50),
    "toolkit_overhead": ("<=", 0.05),
    "kv_cache_speedup": (">=", 3.0),
    "batched_generation_speedup": (">=", 5.0),
    "loader_vs_step": (">=", 5.0),
}
"""Targets on this project's reference CPU (base preset, bf16); on an H100/H200 aim for MFU >= 0.45."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    require_supported_versions()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="base", help="model size preset")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"),
                   help="autocast dtype of the training and generation loops (fp32 = none)")
    p.add_argument("--batch", type=int, default=4, help="micro-batch per process")
    p.add_argument("--image-size", type=int, default=128, help="input resolution (patches = (size / 16)^2)")
    p.add_argument("--src-len", type=int, default=32, help="encoder text tokens")
    p.add_argument("--tgt-len", type=int, default=8, help="decoder tokens")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per repeat")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    p.add_argument("--repeats", type=int, default=2, help="alternating toolkit/bare repeats; the fastest counts")
    p.add_argument("--gen-batch", type=int, default=16, help="prompts generated together (and one by one)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per prompt")
    p.add_argument("--loader-batches", type=int, default=12, help="batches drawn to time the data loader")
    p.add_argument("--workers", type=int, default=2, help="image threads of the batch stream (data.num_workers)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op CPU threads (default: torch's, or 1 when the load average exceeds the core count: "
                        "on an oversubscribed CPU OpenMP barrier stalls otherwise dominate small ops)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (toolkit and bare loops)")
    p.add_argument("--skip", nargs="*", default=[], choices=("loader", "generation"), help="parts to leave out")
    p.add_argument("--out", default="runs/benchmark", help="directory for benchmark.json and benchmark.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    # 1. arguments, launch topology, model
    args = parse_args(argv)
    threads = args.threads or (1 if cpu_oversubscribed() else None)
    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(args.out)
    cfg = load_config(None, [f"train.output_dir={out_dir / 'run'}", f"train.batch_size={args.batch}",
                             f"train.max_steps={args.warmup + args.steps * args.repeats}", "train.save_every=1000000",
                             "train.log_every=1000000", f"train.mixed_precision={mixed_precision(args.precision)}",
                             "logging.progress=false"])
    accelerator = build_accelerator(cfg)
    torch.manual_seed(0)
    model = build_benchmark_model(args)
    batches = synthetic_batches(model.config, args, accelerator.device)
    results = {"shape": shape_of(args, model.config), "device": device_name(accelerator.device),
               "processes": accelerator.num_processes, "distributed": str(accelerator.distributed_type),
               "threads": torch.get_num_threads(), "parameters": sum(p.numel() for p in model.parameters())}

    # 2. dense matmul peak of the same dtype on the same device (this run's ceiling for MFU)
    log.info("benchmark %s: measuring the %s matmul peak", results["shape"], args.precision)
    results["matmul_peak_flops"] = matmul_peak(compute_dtype(args.precision), accelerator.device)

    # 3. FLOPs of one training forward+backward (eager), then the optional torch.compile of both loops' models
    log.info("counting FLOPs of one training step")
    bare_model = copy.deepcopy(model).to(accelerator.device)
    results["flops_per_step"] = step_flops(bare_model, batches[0], args.precision, accelerator.device)
    if args.compile:
        model, bare_model = torch.compile(model), torch.compile(bare_model)

    # 4. toolkit loop (recipes/finetune.py) and bare loop on the same batches, alternating to share the noise
    log.info("timing %d x %d steps of the toolkit and the bare loop", args.repeats, args.steps)
    reset_peak_memory(accelerator.device)
    toolkit = ToolkitLoop(cfg, accelerator, model, batches, args)
    bare = BareLoop(bare_model, batches, args, accelerator.device)
    toolkit.run(args.warmup)
    bare.run(args.warmup)
    toolkit_times, bare_times = [], []
    for _ in range(args.repeats):
        toolkit_times.append(toolkit.run(args.steps) / args.steps)
        bare_times.append(bare.run(args.steps) / args.steps)
    results["peak_memory_bytes"] = peak_memory(accelerator.device)
    results.update(step_metrics(results, min(toolkit_times), min(bare_times), args))
    results["step_times_s"] = {"toolkit": toolkit_times, "bare": bare_times}

    # 5. data loader alone: the recipes' batch stream over synthetic records, with and without image threads
    if "loader" not in args.skip:
        log.info("timing the data loader")
        results.update(loader_throughput(args, model.config.image_size, results["samples_per_s"]))

    # 6. generation: KV cache on/off, batched vs one by one
    if "generation" not in args.skip:
        log.info("timing generation")
        results.update(generation_throughput(accelerator.unwrap_model(model), batches[0], args, accelerator.device))

    # 7. report
    if accelerator.is_main_process:
        write_report(results, out_dir)
    accelerator.wait_for_everyone()
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Model, batches, dtypes


def cpu_oversubscribed() -> bool:
    """A CPU-only host whose 1-minute load average exceeds its cores (other jobs share them)."""
    return not torch.cuda.is_available() and os.getloadavg()[0] > (os.cpu_count() or 1)


def mixed_precision(precision: str) -> str:
    return "no" if precision == "fp32" else precision


def compute_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(precision: str, device: torch.device):
    """The autocast context accelerate uses for `precision` (none for fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=compute_dtype(precision))


def build_benchmark_model(args: argparse.Namespace) -> BiomedGPTForConditionalGeneration:
    config = BiomedGPTConfig.from_preset(args.preset, image_size=args.image_size, label_smoothing=0.1)
    return BiomedGPTForConditionalGeneration(config)


def synthetic_batches(config, args: argparse.Namespace, device: torch.device, count: int = 2) -> list[dict]:
    """Fixed batches of the benchmark shape: every text slot filled (no padding), one image per sample."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        batch = {
            "input_ids": torch.randint(4, config.vocab_size, (args.batch, args.src_len), generator=generator),
            "attention_mask": torch.ones(args.batch, args.src_len, dtype=torch.long),
            "pixel_values": torch.randn(args.batch, 3, args.image_size, args.image_size, generator=generator),
            "patch_masks": torch.ones(args.batch, dtype=torch.bool),
            "labels": torch.randint(4, config.vocab_size, (args.batch, args.tgt_len), generator=generator),
        }
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def shape_of(args: argparse.Namespace, config) -> dict:
    patches = (args.image_size // 16) ** 2
    return {"preset": args.preset, "precision": args.precision, "batch": args.batch, "image_size": args.image_size,
            "image_tokens": patches, "src_len": args.src_len, "tgt_len": args.tgt_len,
            "encoder_length": patches + args.src_len, "vocab_size": config.vocab_size, "compile": args.compile}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        model(**batch, return_logits=False).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------------------------------
# Training loops


class FixedBatches:
    """A BatchStream stand-in for the recipe's loop: the same prepared batches in turn."""

    def __init__(self, batches: list[dict]):
        self.batches, self.position = batches, 0

    def next_batch(self, device: torch.device) -> dict:
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position}


class ToolkitLoop:
    """recipes/finetune.py's `train` on fixed batches, continued `steps` at a time."""

    def __init__(self, cfg, accelerator, model, batches: list[dict], args: argparse.Namespace):
        optimizer = build_optimizer(model, cfg.train)
        scheduler = build_scheduler(optimizer, cfg.train)
        fill_deepspeed_auto(accelerator, cfg)
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        self.cfg, self.accelerator, self.stream = cfg, accelerator, FixedBatches(batches)
        self.step = 0

    def run(self, steps: int) -> float:
        """Run `steps` more optimizer steps; seconds taken."""
        self.cfg.train.max_steps = self.step + steps
        synchronize(self.accelerator.device)
        start = time.perf_counter()
        self.step = train(self.cfg, self.accelerator, self.model, self.optimizer, self.scheduler, self.stream,
                          self.step, ema=None)
        synchronize(self.accelerator.device)
        return time.perf_counter() - start


class BareLoop:
    """The same work without the toolkit: autocast forward, backward, clipping, AdamW, zero_grad. AdamW is torch's
    fused kernel on CUDA and CPU, as in the toolkit, so the overhead compares like with like."""

    def __init__(self, model, batches: list[dict], args: argparse.Namespace, device: torch.device):
        self.model, self.batches, self.precision, self.device = model.train(), batches, args.precision, device
        fused = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, **fused)
        self.position = 0

    def run(self, steps: int) -> float:
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


def step_metrics(results: dict, toolkit_s: float, bare_s: float, args: argparse.Namespace) -> dict:
    """Throughput, MFU and overhead from the fastest repeat of each loop."""
    shape = results["shape"]
    image_tokens = args.batch * shape["image_tokens"]
    text_tokens = args.batch * (args.src_len + args.tgt_len)
    flops = results["flops_per_step"]
    return {
        "step_time_s": toolkit_s,
        "bare_step_time_s": bare_s,
        "samples_per_s": args.batch / toolkit_s,
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


def loader_throughput(args: argparse.Namespace, image_size: int, step_samples_per_s: float) -> dict:
    """Samples/s of the recipes' BatchStream over synthetic records (mixture, image decode + augment, tokenize, pad):
    with `--workers` image threads, and with the images transformed in the calling thread."""
    from scaling.config import SourceArgs
    from scaling.data.synthetic import generate_synthetic
    from scaling.models.biomedgpt.tokenization import train_bpe_tokenizer
    from scaling.training.batches import BatchStream, load_split, tokenizer_corpus

    # The fixed benchmark shape truncates prompts on purpose; the Collator's truncation warnings are noise here.
    logging.getLogger("scaling.data.collate").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        data = generate_synthetic(Path(tmp) / "synthetic", n_images=48, seed=0, image_size=image_size)
        sources = [SourceArgs(name=s.loader, path=str(s.path), options=dict(s.options)) for s in data.sources.values()]
        records = load_split(sources, load_config(None, []).data, "train")
        tokenizer = train_bpe_tokenizer(tokenizer_corpus(records))

        def stream(workers: int) -> BatchStream:
            cfg = load_config(None, [f"data.num_workers={workers}", f"train.batch_size={args.batch}",
                                     f"data.max_src_len={args.src_len}", f"data.max_tgt_len={args.tgt_len}"])
            return BatchStream(records, sources, cfg, tokenizer, image_size, rank=0, world_size=1)

        threaded = samples_per_s(stream(args.workers), args.loader_batches, args.batch)
        in_process = samples_per_s(stream(0), args.loader_batches, args.batch)
    return {"loader_samples_per_s": threaded, "loader_in_process_samples_per_s": in_process,
            "loader_workers": args.workers, "loader_vs_step": threaded / step_samples_per_s}


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


def generation_throughput(model, batch: dict, args: argparse.Namespace, device: torch.device) -> dict:
    """Greedy decoding tokens/s: KV cache vs none (batched), and a batch of prompts vs the same prompts one by one."""
    model.eval()
    prompts = {k: v[:1].repeat(args.gen_batch, *[1] * (v.dim() - 1)) for k, v in batch.items() if k != "labels"}
    # Vary the prompts so no cache of identical rows can help the batch.
    prompts["input_ids"] = torch.randint(4, model.config.vocab_size, prompts["input_ids"].shape, device=device)

    def timed(inputs: dict, use_cache: bool) -> float:
        synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode(), autocast(args.precision, device):
            out = model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False, num_beams=1, use_cache=use_cache)
        synchronize(device)
        assert out.shape[1] >= args.new_tokens, out.shape
        return time.perf_counter() - start

    timed({k: v[:1] for k, v in prompts.items()}, True)  # warm-up
    cached = timed(prompts, True)
    uncached = timed(prompts, False)
    one_by_one = sum(timed({k: v[i:i + 1] for k, v in prompts.items()}, True) for i in range(args.gen_batch))
    tokens = args.gen_batch * args.new_tokens
    model.train()
    return {
        "generation_tokens_per_s": tokens / cached,
        "generation_uncached_tokens_per_s": tokens / uncached,
        "generation_one_by_one_tokens_per_s": tokens / one_by_one,
        "kv_cache_speedup": uncached / cached,
        "batched_generation_speedup": one_by_one / cached,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Report


def write_report(results: dict, out_dir: Path) -> None:
    """benchmark.json, benchmark.md, and the table on the console."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "benchmark.json").write_text(json.dumps(results, indent=2))
    markdown = markdown_table(results)
    (out_dir / "benchmark.md").write_text(markdown)
    print(markdown)
    log.info("wrote %s and %s", out_dir / "benchmark.json", out_dir / "benchmark.md")


def markdown_table(r: dict) -> str:
    """The measured numbers with their targets; the shape and device on top."""
    s = r["shape"]
    rows = [
        ("training step (toolkit)", f"{r['step_time_s'] * 1000:.0f} ms", ""),
        ("training step (bare torch loop)", f"{r['bare_step_time_s'] * 1000:.0f} ms", ""),
        ("toolkit overhead", f"{r['toolkit_overhead']:+.1%}", target("toolkit_overhead", r)),
        ("samples/s" + (" per process" if r["processes"] > 1 else ""), f"{r['samples_per_s']:.2f}", ""),
        ("tokens/s (image + text)", f"{r['tokens_per_s']:.0f} ({r['image_tokens_per_s']:.0f} + "
                                    f"{r['text_tokens_per_s']:.0f})", ""),
        ("FLOPs per step (FlopCounterMode)", f"{r['flops_per_step'] / 1e9:.1f} GFLOP", ""),
        ("achieved", f"{r['achieved_flops'] / 1e9:.1f} GFLOP/s", ""),
        (f"{s['precision']} matmul peak (measured)", f"{r['matmul_peak_flops'] / 1e9:.1f} GFLOP/s", ""),
        ("MFU (of measured matmul peak)", f"{r['mfu_of_matmul_peak']:.1%} (bare loop "
                                          f"{r['bare_mfu_of_matmul_peak']:.1%})", target("mfu_of_matmul_peak", r)),
        ("peak memory", format_bytes(r["peak_memory_bytes"]), ""),
    ]
    if "loader_samples_per_s" in r:
        rows += [
            (f"data loader ({r['loader_workers']} image threads)", f"{r['loader_samples_per_s']:.1f} samples/s",
             ""),
            ("data loader, images in the calling thread", f"{r['loader_in_process_samples_per_s']:.1f} samples/s", ""),
            ("data loader / step consumption", f"{r['loader_vs_step']:.1f}x", target("loader_vs_step", r)),
        ]
    if "kv_cache_speedup" in r:
        rows += [
            ("greedy generation, batched, KV cache", f"{r['generation_tokens_per_s']:.1f} tokens/s", ""),
            ("KV cache speedup", f"{r['kv_cache_speedup']:.1f}x", target("kv_cache_speedup", r)),
            ("batched vs one-by-one speedup", f"{r['batched_generation_speedup']:.1f}x",
             target("batched_generation_speedup", r)),
        ]
    header = (f"Benchmark: preset {s['preset']}, {s['precision']}, batch {s['batch']}, image {s['image_size']} px "
              f"({s['image_tokens']} patches), src {s['src_len']}, tgt {s['tgt_len']}, on {r['device']}, "
              f"{r['processes']} process(es), {r['distributed']}\n\n")
    lines = ["| metric | measured | target |", "|---|---|---|", *(f"| {a} | {b} | {c} |" for a, b, c in rows)]
    return header + "\n".join(lines) + "\n"


def target(name: str, results: dict) -> str:
    """'>= 50% (met)' style cell."""
    op, value = TARGETS[name]
    measured = results[name]
    met = measured >= value if op == ">=" else measured <= value
    shown = f"{value:.0%}" if name in ("mfu_of_matmul_peak", "toolkit_overhead") else f"{value:g}x"
    return f"{op} {shown} ({'met' if met else 'missed'})"


if __name__ == "__main__":
    main()
