"""The benchmark recipe end to end on the test preset: a couple of steps, every section, JSON + Markdown outputs.
No timing assertions: the numbers depend on the machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_benchmark_runs_on_the_test_preset_and_writes_json_and_markdown(tmp_path):
    cmd = [sys.executable, str(ROOT / "recipes" / "benchmark.py"), "--preset", "test", "--precision", "bf16",
           "--batch", "2", "--image-size", "32", "--src-len", "16", "--tgt-len", "4", "--steps", "1", "--repeats", "1",
           "--gen-batch", "2", "--new-tokens", "4", "--loader-batches", "2", "--workers", "1", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    results = json.loads((tmp_path / "benchmark.json").read_text())
    assert results["shape"] == {"preset": "test", "precision": "bf16", "batch": 2, "image_size": 32, "image_tokens": 4,
                                "src_len": 16, "tgt_len": 4, "encoder_length": 20, "vocab_size": 1000,
                                "compile": False}
    positive = ("step_time_s", "bare_step_time_s", "samples_per_s", "tokens_per_s", "flops_per_step",
                "matmul_peak_flops", "mfu_of_matmul_peak", "peak_memory_bytes", "loader_samples_per_s",
                "loader_vs_step", "generation_tokens_per_s", "kv_cache_speedup", "batched_generation_speedup")
    assert all(results[key] > 0 for key in positive), {k: results[k] for k in positive}
    assert results["tokens_per_s"] == pytest.approx(results["image_tokens_per_s"] + results["text_tokens_per_s"])
    # one training step of 2 x (4 + 16 + 4) tokens through a 2+2-layer d=64 model: FLOPs of the right magnitude
    assert 1e6 < results["flops_per_step"] < 1e10
    assert len(results["step_times_s"]["toolkit"]) == len(results["step_times_s"]["bare"]) == 1

    markdown = (tmp_path / "benchmark.md").read_text()
    for row in ("toolkit overhead", "MFU (of measured matmul peak)", "data loader / step consumption",
                "KV cache speedup", "batched vs one-by-one speedup", "peak memory"):
        assert f"| {row}" in markdown
    assert markdown.count("(met)") + markdown.count("(missed)") == 5
    assert "| metric | measured | target |" in markdown and "preset test" in markdown
