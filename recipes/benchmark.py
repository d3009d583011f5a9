"""Benchmark: training-step speed, MFU, toolkit overhead, data-loader throughput, generation speed and peak memory,
all measured in one run on one device, written as JSON and a Markdown table with the targets beside the numbers.

    # this CPU (small default shapes; a few minutes)
    python recipes/benchmark.py --preset base --precision bf16
    # a GPU, the shapes of a real run
    python recipes/benchmark.py --preset base --precision bf16 --batch 32 --image-size 384 --src-len 128 --tgt-len 32
    # under a launch topology: the toolkit loop runs under it, the bare loop beside it on every rank
    accelerate launch --config_file accelerate_configs/zero2.yaml recipes/benchmark.py --preset large --batch 8

What is measured (`--out`/benchmark.json, benchmark.md):
  * toolkit step: the training loop every recipe runs (scaling.training.loop after prepare_for_training: Accelerator,
    AdamW, schedule, clipping, its sync points) on fixed synthetic batches of the given shape; samples/s and tokens/s
    (image patches + encoder and decoder text);
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
from pathlib import Path

import torch

from scaling.config import Config, load_config
from scaling.environment import require_supported_versions
from scaling.logging import get_logger
from scaling.models.biomedgpt import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from scaling.training.distributed import build_accelerator
from scaling.training.memory import peak_memory, reset_peak_memory
from scaling.training.run import prepare_for_training
from scaling.training.throughput import (
    DTYPES,
    BareLoop,
    BatchShape,
    ToolkitLoop,
    cpu_oversubscribed,
    device_name,
    generation_throughput,
    loader_throughput,
    matmul_peak,
    step_flops,
    step_metrics,
    synthetic_batches,
)
from scaling.training.throughput_report import write_report

log = get_logger("recipes.benchmark")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The benchmark's shape, lengths and parts (it reads no config file)."""
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
    # 1. arguments, launch topology, model, fixed batches of the benchmark shape
    args = parse_args(argv)
    threads = args.threads or (1 if cpu_oversubscribed() else None)
    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(args.out)
    cfg = benchmark_config(args, out_dir)
    accelerator = build_accelerator(cfg)
    torch.manual_seed(0)
    model = build_benchmark_model(args)
    shape = BatchShape(args.batch, args.image_size, args.src_len, args.tgt_len)
    batches = synthetic_batches(model.config, shape, accelerator.device)
    results = {"shape": shape_of(args, shape, model.config), "device": device_name(accelerator.device),
               "processes": accelerator.num_processes, "distributed": str(accelerator.distributed_type),
               "threads": torch.get_num_threads(), "parameters": sum(p.numel() for p in model.parameters())}

    # 2. dense matmul peak of the same dtype on the same device (this run's ceiling for MFU)
    log.info("benchmark %s: measuring the %s matmul peak", results["shape"], args.precision)
    results["matmul_peak_flops"] = matmul_peak(DTYPES[args.precision], accelerator.device)

    # 3. FLOPs of one training forward+backward (eager), then the optional torch.compile of both loops' models
    log.info("counting FLOPs of one training step")
    bare_model = copy.deepcopy(model).to(accelerator.device)
    results["flops_per_step"] = step_flops(bare_model, batches[0], args.precision, accelerator.device)
    if args.compile:
        model, bare_model = torch.compile(model), torch.compile(bare_model)

    # 4. the toolkit's loop (one prepare() for the launch topology, as the recipes do) and the bare loop on the same
    #    batches, alternating to share the noise
    log.info("timing %d x %d steps of the toolkit and the bare loop", args.repeats, args.steps)
    reset_peak_memory(accelerator.device)
    toolkit = ToolkitLoop(cfg, accelerator, prepare_for_training(accelerator, model, cfg), batches)
    bare = BareLoop(bare_model, batches, args.precision, accelerator.device)
    toolkit.run(args.warmup)
    bare.run(args.warmup)
    toolkit_times, bare_times = [], []
    for _ in range(args.repeats):
        toolkit_times.append(toolkit.run(args.steps) / args.steps)
        bare_times.append(bare.run(args.steps) / args.steps)
    results["peak_memory_bytes"] = peak_memory(accelerator.device)
    results.update(step_metrics(results, min(toolkit_times), min(bare_times)))
    results["step_times_s"] = {"toolkit": toolkit_times, "bare": bare_times}

    # 5. data loader alone: the recipes' batch stream over synthetic records, with and without image threads
    if "loader" not in args.skip:
        log.info("timing the data loader")
        results.update(loader_throughput(shape, args.workers, args.loader_batches, results["samples_per_s"]))

    # 6. generation: KV cache on/off, batched vs one by one
    if "generation" not in args.skip:
        log.info("timing generation")
        results.update(generation_throughput(accelerator.unwrap_model(model), batches[0], args.precision, args.gen_batch,
                                             args.new_tokens, accelerator.device))

    # 7. report
    if accelerator.is_main_process:
        write_report(results, out_dir)
    accelerator.wait_for_everyone()
    return results


def benchmark_config(args: argparse.Namespace, out_dir: Path) -> Config:
    """The run config the toolkit loop reads: the benchmark's batch, steps and precision; no checkpoints, step logs
    or progress bars inside the timed steps."""
    precision = "no" if args.precision == "fp32" else args.precision
    return load_config(None, [f"train.output_dir={out_dir / 'run'}", f"train.batch_size={args.batch}",
                              f"train.max_steps={args.warmup + args.steps * args.repeats}", "train.save_every=1000000",
                              "train.log_every=1000000", f"train.mixed_precision={precision}",
                              "logging.progress=false"])


def build_benchmark_model(args: argparse.Namespace) -> BiomedGPTForConditionalGeneration:
    """A randomly initialised model of the preset at the benchmark's resolution."""
    config = BiomedGPTConfig.from_preset(args.preset, image_size=args.image_size, label_smoothing=0.1)
    return BiomedGPTForConditionalGeneration(config)


def shape_of(args: argparse.Namespace, shape: BatchShape, config) -> dict:
    """The benchmark's shape as benchmark.json records it."""
    return {"preset": args.preset, "precision": args.precision, "batch": shape.batch, "image_size": shape.image_size,
            "image_tokens": shape.image_tokens, "src_len": shape.src_len, "tgt_len": shape.tgt_len,
            "encoder_length": shape.image_tokens + shape.src_len, "vocab_size": config.vocab_size,
            "compile": args.compile}


if __name__ == "__main__":
    main()
