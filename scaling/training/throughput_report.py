"""The benchmark's report: the measured numbers as JSON and as a Markdown table with the targets beside them.

    write_report(results, out_dir)     # benchmark.json, benchmark.md, and the table on the console
"""

from __future__ import annotations

import json
from pathlib import Path

from scaling.logging import get_logger
from scaling.training.memory import format_bytes

log = get_logger(__name__)

TARGETS = {
    "mfu_of_matmul_peak": (">=", 0.60),
    "toolkit_overhead": ("<=", 0.05),
    "kv_cache_speedup": (">=", 3.0),
    "kv_cache_decode_speedup": (">=", 3.0),
    "batched_generation_speedup": (">=", 5.0),
    "batched_decode_speedup": (">=", 5.0),
    "loader_vs_step": (">=", 5.0),
    "bart_step_ratio": ("<=", 1.0),
    "bart_generation_ratio": ("<=", 1.0),
    "bart_ours_kv_cache_speedup": (">=", 3.0),
}
"""Targets on this project's reference CPU (base preset, bf16, the vqa shape); on an H100/H200 aim for MFU >= 0.45."""

PERCENT_TARGETS = {"mfu_of_matmul_peak", "toolkit_overhead"}


def write_report(results: dict, out_dir: Path) -> None:
    """benchmark.json, benchmark.md, and the table on the console."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "benchmark.json").write_text(json.dumps(results, indent=2))
    markdown = markdown_table(results)
    (out_dir / "benchmark.md").write_text(markdown)
    print(markdown)
    log.info("wrote %s and %s", out_dir / "benchmark.json", out_dir / "benchmark.md")


def markdown_table(r: dict) -> str:
    """The measured numbers with their targets; the shape and device on top. Parts that did not run are left out."""
    rows = flops_rows(r)
    for present, section in (("step_time_s", step_rows), ("loader_samples_per_s", loader_rows),
                             ("kv_cache_speedup", generation_rows), ("beam_search_s_per_prompt", search_rows),
                             ("bart_step_ratio", bart_rows), ("compile_speedup", compile_rows)):
        if present in r:
            rows += section(r)
    lines = ["| metric | measured | target |", "|---|---|---|", *(f"| {a} | {b} | {c} |" for a, b, c in rows)]
    return header(r) + "\n".join(lines) + "\n"


def header(r: dict) -> str:
    """The shape, model size and where it ran."""
    s = r["shape"]
    image = f"image {s['image_size']} px ({s['image_tokens']} patches)" if s["image_size"] else "no image"
    where = (f"on {r['device']}, {r['processes']} process(es), {r['distributed']}" if "device" in r
             else "FLOPs only (meta device)")
    return (f"Benchmark: preset {s['preset']} ({r['parameters'] / 1e6:.4g}M parameters), {s['precision']}, shape "
            f"{s['name']}: batch {s['batch']}, {image}, src {s['src_len']}, tgt {s['tgt_len']}, {where}\n\n")


def flops_rows(r: dict) -> list[tuple[str, str, str]]:
    """FLOPs of one training step, in total and by part."""
    flops = r["flops"]
    parts = ", ".join(f"{name.replace('_', ' ')} {flops[name] / flops['total']:.0%}"
                      for name in ("resnet", "encoder", "decoder", "lm_head"))
    return [("FLOPs per training step (forward + backward)", f"{flops['total'] / 1e9:.4g} GFLOP", ""),
            ("FLOPs by part", parts, "")]


def step_rows(r: dict) -> list[tuple[str, str, str]]:
    """Training step, throughput, MFU, memory."""
    s = r["shape"]
    return [
        ("training step (toolkit)", f"{r['step_time_s'] * 1000:.0f} ms", ""),
        ("training step (bare torch loop)", f"{r['bare_step_time_s'] * 1000:.0f} ms", ""),
        ("toolkit overhead", f"{r['toolkit_overhead']:+.1%}", target("toolkit_overhead", r)),
        ("samples/s" + (" per process" if r["processes"] > 1 else ""), f"{r['samples_per_s']:.2f}", ""),
        ("tokens/s (image + text)", f"{r['tokens_per_s']:.0f} ({r['image_tokens_per_s']:.0f} + "
                                    f"{r['text_tokens_per_s']:.0f})", ""),
        ("achieved", f"{r['achieved_flops'] / 1e9:.4g} GFLOP/s", ""),
        (f"{s['precision']} matmul peak (best of {len(r['matmul_peaks_flops'])} windows between the step timings)",
         f"{r['matmul_peak_flops'] / 1e9:.1f} GFLOP/s (lowest {min(r['matmul_peaks_flops']) / 1e9:.1f})", ""),
        ("MFU (of measured matmul peak)", f"{r['mfu_of_matmul_peak']:.1%} (bare loop "
                                          f"{r['bare_mfu_of_matmul_peak']:.1%})", target("mfu_of_matmul_peak", r)),
        ("peak memory", format_bytes(r["peak_memory_bytes"]), ""),
    ]


def loader_rows(r: dict) -> list[tuple[str, str, str]]:
    """The recipes' batch stream against the step."""
    return [
        (f"data loader ({r['loader_workers']} image threads)", f"{r['loader_samples_per_s']:.1f} samples/s", ""),
        ("data loader, images in the calling thread", f"{r['loader_in_process_samples_per_s']:.1f} samples/s", ""),
        ("data loader / step consumption", f"{r['loader_vs_step']:.1f}x", target("loader_vs_step", r)),
    ]


def generation_rows(r: dict) -> list[tuple[str, str, str]]:
    """KV cache and batching, for whole generate() calls and for decoding alone."""
    return [
        ("greedy generation, batched, KV cache", f"{r['generation_tokens_per_s']:.1f} tokens/s (encoder "
                                                 f"{r['generation_encoder_share']:.0%} of the time)", ""),
        ("KV cache speedup: generate() / decoding alone", f"{r['kv_cache_speedup']:.1f}x / "
                                                         f"{r['kv_cache_decode_speedup']:.1f}x",
         f"{target('kv_cache_speedup', r)} / {target('kv_cache_decode_speedup', r)}"),
        ("batched vs one-by-one: generate() / decoding alone", f"{r['batched_generation_speedup']:.1f}x / "
                                                               f"{r['batched_decode_speedup']:.1f}x",
         f"{target('batched_generation_speedup', r)} / {target('batched_decode_speedup', r)}"),
        ("batched vs one-by-one generate() if batched decoding took no time (the encoder's bound)",
         f"{r['batched_generation_bound']:.1f}x", ""),
    ]


def search_rows(r: dict) -> list[tuple[str, str, str]]:
    """Beam search and trie-constrained decoding."""
    return [
        (f"beam search ({r['search_beams']} beams), batched", f"{r['beam_search_s_per_prompt'] * 1000:.0f} ms/prompt",
         ""),
        (f"constrained to {r['constrained_candidates']} answers ({r['search_beams']} beams)",
         f"{r['constrained_s_per_prompt'] * 1000:.0f} ms/prompt", ""),
    ]


def bart_rows(r: dict) -> list[tuple[str, str, str]]:
    """The text-only path against transformers' BART of the same dimensions."""
    b = r["bart_shape"]
    shape = f"batch {b['batch']}, {b['src_len']} + {b['tgt_len']} tokens"
    return [
        (f"text-only training step vs BART ({shape})", f"{r['bart_ours_step_time_s'] * 1000:.0f} / "
                                                       f"{r['bart_step_time_s'] * 1000:.0f} ms = "
                                                       f"{r['bart_step_ratio']:.2f}x", target("bart_step_ratio", r)),
        ("FLOPs per step, ours / BART", f"{r['bart_ours_flops_per_step'] / 1e9:.4g} / "
                                        f"{r['bart_flops_per_step'] / 1e9:.4g} GFLOP", ""),
        (f"cached greedy generation vs BART ({b['new_tokens']} tokens)",
         f"{r['bart_ours_generation_s'] * 1000:.0f} / {r['bart_generation_s'] * 1000:.0f} ms = "
         f"{r['bart_generation_ratio']:.2f}x", target("bart_generation_ratio", r)),
        ("KV cache speedup at this shape", f"{r['bart_ours_kv_cache_speedup']:.1f}x",
         target("bart_ours_kv_cache_speedup", r)),
    ]


def compile_rows(r: dict) -> list[tuple[str, str, str]]:
    """torch.compile against eager."""
    return [
        ("torch.compile: first step (compilation)", f"{r['compile_first_step_s']:.0f} s", ""),
        ("torch.compile vs eager step", f"{r['compile_step_time_s'] * 1000:.0f} / "
                                        f"{r['compile_eager_step_time_s'] * 1000:.0f} ms: "
                                        f"{r['compile_speedup']:.2f}x eager's speed", ""),
    ]


def target(name: str, results: dict) -> str:
    """'>= 60% (met)' style cell."""
    op, value = TARGETS[name]
    measured = results[name]
    met = measured >= value if op == ">=" else measured <= value
    shown = f"{value:.0%}" if name in PERCENT_TARGETS else f"{value:g}x"
    return f"{op} {shown} ({'met' if met else 'missed'})"
