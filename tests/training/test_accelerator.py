"""Accelerator construction without a launcher: precision choice, trackers, DeepSpeed "auto" filling."""

import os

import pytest

from scaling.config import load_config
from scaling.training.distributed import cpu_threads, resolve_mixed_precision, trackers
from scaling.training.tracking import MetricsLog


@pytest.mark.parametrize(("launcher", "config", "expected"), [
    (None, "bf16", "bf16"),          # plain `python recipe.py`: the config decides
    ("no", "bf16", "bf16"),          # `accelerate launch` without --mixed_precision passes 'no'
    ("bf16", "no", "bf16"),          # the launcher asks for it
    ("fp16", "bf16", "fp16"),        # an explicit launcher flag wins (with a warning)
])
def test_mixed_precision_from_launcher_or_config(monkeypatch, launcher, config, expected):
    if launcher is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    assert resolve_mixed_precision(load_config(None, [f"train.mixed_precision='{config}'"])) == expected


def test_jsonl_tracker_always_tensorboard_on_request(tmp_path):
    cfg = load_config(None, [f"train.output_dir={tmp_path}"])
    assert [type(t) for t in trackers(cfg)] == [MetricsLog]
    cfg = load_config(None, [f"train.output_dir={tmp_path}", "logging.tensorboard=true"])
    assert trackers(cfg)[1:] == ["tensorboard"]


def test_cpu_threads_share_the_cores_among_local_processes(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert cpu_threads(0) == cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores * 2))
    assert cpu_threads(0) == 1
    assert cpu_threads(3) == 3
