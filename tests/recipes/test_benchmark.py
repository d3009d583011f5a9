"""The benchmark recipe end to end on the test preset: a couple of steps, every section (BART side by side
included), JSON + Markdown outputs; and the FLOPs-only mode on the meta device. No timing assertions: the numbers
depend on the machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARK = [sys.executable, str(ROOT / "recipes" / "benchmark.py"), "--preset", "test", "--precision", "bf16"]


def run_benchmark(*args: str) -> None:
    done = subprocess.run([*BENCHMARK, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.slow
def test_benchmark_runs_every_section_on_the_test_preset_with_bart_side_by_side(tmp_path):
    run_benchmark("--batch", "2", "--image-size", "32", "--src-len", "16", "--tgt-len", "4", "--steps", "1",
                  "--repeats", "1", "--gen-batch", "2", "--new-tokens", "4", "--beams", "2", "--text-shape", "2,24,6",
                  "--loader-batches", "2", "--workers", "1", "--out", str(tmp_path))

    results = json.loads((tmp_path / "benchmark.json").read_text())
    assert results["shape"] == {"name": "vqa", "preset": "test", "precision": "bf16", "batch": 2, "image_size": 32,
                                "image_tokens": 4, "src_len": 16, "tgt_len": 4, "encoder_length": 20,
                                "vocab_size": 1000, "compile": False}
    positive = ("step_time_s", "bare_step_time_s", "samples_per_s", "tokens_per_s", "flops_per_step",
                "matmul_peak_flops", "mfu_of_matmul_peak", "peak_memory_bytes", "loader_samples_per_s",
                "loader_vs_step", "generation_tokens_per_s", "kv_cache_speedup", "kv_cache_decode_speedup",
                "batched_generation_speedup", "batched_decode_speedup", "beam_search_s_per_prompt",
                "constrained_s_per_prompt", "bart_step_ratio", "bart_generation_ratio", "bart_ours_kv_cache_speedup",
                "bart_flops_per_step", "bart_ours_flops_per_step")
    assert all(results[key] > 0 for key in positive), {k: results[k] for k in positive}
    assert results["tokens_per_s"] == pytest.approx(results["image_tokens_per_s"] + results["text_tokens_per_s"])
    flops = results["flops"]
    assert flops["total"] == results["flops_per_step"] == sum(flops[p] for p in ("resnet", "encoder", "decoder",
                                                                                  "lm_head"))
    assert 0 < results["generation_encoder_share"] < 1
    assert results["batched_generation_bound"] > results["batched_generation_speedup"]
    assert len(results["step_times_s"]["toolkit"]) == len(results["step_times_s"]["bare"]) == 1
    assert results["matmul_peaks_flops"] == [results["matmul_peak_flops"]]  # one window per turn of the loops
    assert len(results["generation_times_s"]) == 2
    assert results["bart_shape"] == {"batch": 2, "src_len": 24, "tgt_len": 6, "new_tokens": 4}
    times = results["bart_times_s"]
    assert len(times["step"]["ours"]) == len(times["step"]["bart"]) == len(times["generation"]["bart"]) == 1
    # the same transformer work on both sides: OFA adds only its position-bias projections
    assert results["bart_flops_per_step"] < results["bart_ours_flops_per_step"] < 1.2 * results["bart_flops_per_step"]

    markdown = (tmp_path / "benchmark.md").read_text()
    for row in ("FLOPs by part", "toolkit overhead", "MFU (of measured matmul peak)", "data loader / step consumption",
                "KV cache speedup: generate() / decoding alone", "batched vs one-by-one",
                "batched vs one-by-one generate() if batched decoding took no time", "beam search (2 beams)",
                "constrained to 500 answers", "text-only training step vs BART", "cached greedy generation vs BART",
                "peak memory"):
        assert f"| {row}" in markdown
    assert markdown.count("(met)") + markdown.count("(missed)") == 10
    assert "| metric | measured | target |" in markdown and "preset test" in markdown


@pytest.mark.slow
def test_flops_only_mode_counts_on_the_meta_device_without_timing(tmp_path):
    run_benchmark("--flops-only", "--shape", "caption", "--image-size", "64", "--out", str(tmp_path))
    results = json.loads((tmp_path / "benchmark.json").read_text())
    assert results["shape"]["name"] == "caption" and results["shape"]["tgt_len"] == 64
    assert results["flops"]["total"] == results["flops_per_step"] > 0 and results["parameters"] > 0
    assert "step_time_s" not in results and "device" not in results
    assert "FLOPs only (meta device)" in (tmp_path / "benchmark.md").read_text()
