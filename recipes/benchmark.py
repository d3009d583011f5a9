"""Benchmark: training-step speed, MFU, FLOPs by part, toolkit overhead, data-loader throughput, generation speed
(KV cache, batching, beam search, constrained decoding), transformers' BART of the same dimensions side by side, and
peak memory, all measured in one run on one device, written as JSON and a Markdown table with the targets beside
the numbers.

    # the users' shapes: BiomedGPT-Base VQA fine-tuning at 384 px (the default), captioning at 480 px
    python recipes/benchmark.py --preset base --precision bf16
    python recipes/benchmark.py --preset base --precision bf16 --shape caption --skip bart
    # FLOPs only, on the meta device: any size, no memory or time
    python recipes/benchmark.py --preset xlarge --flops-only
    # torch.compile against eager as well (compilation takes minutes)
    python recipes/benchmark.py --preset base --precision bf16 --compile
    # under a launch topology: the toolkit loop runs under it, the bare loop beside it on every rank
    accelerate launch --config_file accelerate_configs/zero2.yaml recipes/benchmark.py --preset large --batch 8

What is measured (`--out`/benchmark.json, benchmark.md):
  * FLOPs of one training forward + backward by FlopCounterMode on the meta device, in total and by part (ResNet,
    encoder layers, decoder, LM head);
  * toolkit step: the training loop every recipe runs (scaling.training.loop after prepare_for_training: Accelerator,
    AdamW, schedule, clipping, its sync points) on fixed synthetic batches of the shape; samples/s and tokens/s
    (image patches + encoder and decoder text);
  * bare step: the same batches through a plain forward/backward/AdamW loop (autocast, fused AdamW as in the
    toolkit): the toolkit overhead is the ratio of the two step times;
  * MFU: FLOPs per step / step time / the dense matmul throughput of the same dtype measured on the same device in
    the same run (the best of 1-second windows taken before each turn of the step timings);
  * data loader: the recipes' BatchStream (mixture, image decode + augment in `--workers` threads, tokenize, pad)
    over synthetic records, in samples/s, against what one training step consumes;
  * generation: greedy decoding of `--new-tokens` tokens with and without the KV cache, and a batch of
    `--gen-batch` prompts against the same prompts one by one, for whole generate() calls and for decoding alone;
    beam search and decoding constrained to a trie of 500 answers;
  * BART: the text-only path against transformers' BART with the same width, depth, heads, FFN and vocabulary,
    training steps and cached generation taking turns on the same batches (`--text-shape`);
  * compile (`--compile`): a torch.compile'd bare loop against the eager one;
  * peak memory: CUDA max allocated, or the process's peak RSS on CPU.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path

import torch

from scaling.config import Config, load_config
from scaling.environment import require_supported_versions
from scaling.logging import get_logger
from scaling.models.biomedgpt import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from scaling.training.distributed import build_accelerator, unwrapped
from scaling.training.memory import peak_memory, reset_peak_memory
from scaling.training.run import prepare_for_training
from scaling.training.throughput import (
    DTYPES,
    SHAPES,
    BareLoop,
    BatchShape,
    ToolkitLoop,
    against_bart,
    alternating,
    compiled_vs_eager,
    cpu_oversubscribed,
    device_name,
    generation_throughput,
    loader_throughput,
    matmul_peak,
    search_throughput,
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
    p.add_argument("--shape", default="vqa", choices=sorted(SHAPES),
                   help="named batch shape: " + "; ".join(f"{name} {s.batch} x ({s.image_size} px, {s.src_len} + "
                                                          f"{s.tgt_len} tokens)" for name, s in SHAPES.items()))
    p.add_argument("--batch", type=int, help="micro-batch per process (default: the shape's)")
    p.add_argument("--image-size", type=int, help="input resolution, patches = (size / 16)^2; 0 = text only")
    p.add_argument("--src-len", type=int, help="encoder text tokens (default: the shape's)")
    p.add_argument("--tgt-len", type=int, help="decoder tokens (default: the shape's)")
    p.add_argument("--flops-only", action="store_true", help="count FLOPs and parameters on the meta device only")
    p.add_argument("--steps", type=int, default=2, help="timed optimizer steps per repeat")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    p.add_argument("--repeats", type=int, default=4, help="alternating repeats of compared loops; the fastest counts")
    p.add_argument("--gen-batch", type=int, default=16, help="prompts generated together (and one by one)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt")
    p.add_argument("--beams", type=int, default=5, help="beam size of the beam-search and constrained timings")
    p.add_argument("--text-shape", default="8,256,32", help="batch,src,tgt of the text-only comparison with BART")
    p.add_argument("--loader-batches", type=int, default=12, help="batches drawn to time the data loader")
    p.add_argument("--workers", type=int, default=2, help="image threads of the batch stream (data.num_workers)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op CPU threads (default: torch's, or 1 when the load average exceeds the core count: "
                        "on an oversubscribed CPU OpenMP barrier stalls otherwise dominate small ops)")
    p.add_argument("--compile", action="store_true", help="also time a torch.compile'd bare loop against eager")
    p.add_argument("--skip", nargs="*", default=[], choices=("loader", "generation", "search", "bart"),
                   help="parts to leave out")
    p.add_argument("--out", default="runs/benchmark", help="directory for benchmark.json and benchmark.md")
    args = p.parse_args(argv)
    try:
        batch, src_len, tgt_len = (int(n) for n in args.text_shape.split(","))
    except ValueError:
        p.error(f"--text-shape wants batch,src,tgt (three integers), got {args.text_shape!r}")
    args.text_shape = BatchShape(batch, 0, src_len, tgt_len)
    return args


def main(argv: list[str] | None = None) -> dict:
    # 1. arguments, the model's config, FLOPs per step by part (meta device: any size)
    args = parse_args(argv)
    shape = batch_shape(args)
    resolution = {"image_size": shape.image_size} if shape.image_size else {}
    config = BiomedGPTConfig.from_preset(args.preset, label_smoothing=0.1, **resolution)
    results = {"shape": shape_of(args, shape, config), "parameters": parameter_count(config),
               "flops": step_flops(config, shape)}
    results["flops_per_step"] = results["flops"]["total"]
    if args.flops_only:
        write_report(results, Path(args.out))
        return results

    # 2. launch topology, model, fixed batches of the benchmark shape
    threads = args.threads or (1 if cpu_oversubscribed() else None)
    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(args.out)
    cfg = benchmark_config(args, shape, out_dir)
    accelerator = build_accelerator(cfg)
    torch.manual_seed(0)
    model = BiomedGPTForConditionalGeneration(config)
    batches = synthetic_batches(config, shape, accelerator.device)
    results.update({"device": device_name(accelerator.device), "processes": accelerator.num_processes,
                    "distributed": str(accelerator.distributed_type), "threads": torch.get_num_threads()})

    # 3. the toolkit's loop (one prepare() for the launch topology, as the recipes do) and the bare loop on the same
    #    batches, taking turns to share the noise; before each turn, the dense matmul peak of the same dtype on the
    #    same device (the best of these windows is this run's ceiling for MFU)
    log.info("benchmark %s: timing %d x %d steps of the toolkit and the bare loop, and the %s matmul peak",
             results["shape"], args.repeats, args.steps, args.precision)
    reset_peak_memory(accelerator.device)
    bare = BareLoop(copy.deepcopy(model).to(accelerator.device), batches, args.precision, accelerator.device)
    loops = {"toolkit": ToolkitLoop(cfg, accelerator, prepare_for_training(accelerator, model, cfg), batches),
             "bare": bare}
    for loop in loops.values():
        loop.run(args.warmup)
    peaks = []
    results["step_times_s"] = alternating(
        loops, args.steps, args.repeats,
        before_each=lambda: peaks.append(matmul_peak(DTYPES[args.precision], accelerator.device)))
    results["matmul_peaks_flops"], results["matmul_peak_flops"] = peaks, max(peaks)
    results["peak_memory_bytes"] = peak_memory(accelerator.device)
    results.update(step_metrics(results, min(results["step_times_s"]["toolkit"]), min(results["step_times_s"]["bare"])))
    del loops, bare

    # 4. data loader alone: the recipes' batch stream over synthetic records (images: none for a text-only shape)
    if "loader" not in args.skip and shape.image_size:
        log.info("timing the data loader")
        results.update(loader_throughput(shape, args.workers, args.loader_batches, results["samples_per_s"]))

    # 5. generation: KV cache on/off, batched vs one by one; beam search and constrained decoding
    generating = unwrapped(accelerator, model)
    if "generation" not in args.skip:
        log.info("timing generation")
        results.update(generation_throughput(generating, batches[0], args.precision, args.gen_batch, args.new_tokens,
                                             accelerator.device))
    if "search" not in args.skip:
        log.info("timing beam search and constrained decoding")
        results.update(search_throughput(generating, batches[0], args.precision, args.gen_batch, args.new_tokens,
                                         args.beams, accelerator.device))

    # 6. the text-only path against transformers' BART of the same dimensions
    if "bart" not in args.skip:
        log.info("timing the text-only path against BART")
        results.update(against_bart(config, args.text_shape, args.precision, accelerator.device, args.steps,
                                    args.repeats, args.new_tokens))

    # 7. torch.compile against eager
    if args.compile:
        log.info("timing torch.compile against eager (compiling first)")
        results.update(compiled_vs_eager(copy.deepcopy(generating), batches, args.precision, accelerator.device,
                                         args.steps, args.repeats))

    # 8. report
    if accelerator.is_main_process:
        write_report(results, out_dir)
    accelerator.wait_for_everyone()
    return results


def batch_shape(args: argparse.Namespace) -> BatchShape:
    """The named shape with the given overrides."""
    overrides = {"batch": args.batch, "image_size": args.image_size, "src_len": args.src_len, "tgt_len": args.tgt_len}
    return dataclasses.replace(SHAPES[args.shape], **{k: v for k, v in overrides.items() if v is not None})


def benchmark_config(args: argparse.Namespace, shape: BatchShape, out_dir: Path) -> Config:
    """The run config the toolkit loop reads: the benchmark's batch, steps and precision; no checkpoints, step logs
    or progress bars inside the timed steps."""
    precision = "no" if args.precision == "fp32" else args.precision
    return load_config(None, [f"train.output_dir={out_dir / 'run'}", f"train.batch_size={shape.batch}",
                              f"train.max_steps={args.warmup + args.steps * args.repeats}", "train.save_every=1000000",
                              "train.log_every=1000000", f"train.mixed_precision={precision}",
                              "logging.progress=false"])


def parameter_count(config: BiomedGPTConfig) -> int:
    """Parameters of the model (built on the meta device, tied weights once)."""
    with torch.device("meta"):
        return sum(p.numel() for p in BiomedGPTForConditionalGeneration(config).parameters())


def shape_of(args: argparse.Namespace, shape: BatchShape, config) -> dict:
    """The benchmark's shape as benchmark.json records it."""
    return {"name": args.shape, "preset": args.preset, "precision": args.precision, "batch": shape.batch,
            "image_size": shape.image_size, "image_tokens": shape.image_tokens, "src_len": shape.src_len,
            "tgt_len": shape.tgt_len, "encoder_length": shape.image_tokens + shape.src_len,
            "vocab_size": config.vocab_size, "compile": args.compile}


if __name__ == "__main__":
    main()
