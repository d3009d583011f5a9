"""recipes/instruct.py: the embedded default job, shortened (same code path, fewer steps and images)."""

from __future__ import annotations

import json

import pytest
from recipe_runs import launch_args, logged_steps, losses, recipe_args, run

from scaling.training.checkpoint import list_checkpoints


@pytest.mark.slow
def test_shortened_default_run_trains_exports_and_reports(tmp_path):
    steps = 30
    done = run(launch_args("single_gpu.yaml", 1) + recipe_args(
        tmp_path, tmp_path / "cache", f"train.max_steps={steps}", "train.save_every=15", "data.synthetic_images=80",
        "eval.max_samples=48", recipe="instruct.py", config=None))
    output = done.stdout + done.stderr
    assert logged_steps(tmp_path) == list(range(1, steps + 1))
    curve = losses(tmp_path)
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5, curve
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000015", "step_00000030"]
    for name in ("config.yaml", "loss.png", "export/model.safetensors", "export/tokenizer.json",
                 "eval/report.json", "eval/report.md", "eval/report.html"):
        assert (tmp_path / name).is_file(), name
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["evaluations"] and report["evaluations"][0]["task"] == "vqa"
    assert "closed_accuracy" in output and "open_accuracy" in output and "report.html" in output
