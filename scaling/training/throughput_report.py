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
    "mfu_of_matmul_peak": (">=", 0.50),
    "toolkit_overhead": ("<=", 0.05),
    "kv_cache_speedup": (">=", 3.0),
    "batched_generation_speedup": (">=", 5.0),
    "loader_vs_step": (">=", 5.0),
}
"""Targets on this project's reference CPU (base preset, bf16); on an H100/H200 aim for MFU >= 0.45."""


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
