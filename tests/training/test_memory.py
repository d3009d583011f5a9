"""Memory: ZeRO formulas, parameter counts against the real model, the activation estimate against measured CPU runs,
and model states against real 2-process DeepSpeed ZeRO-0/2/3 runs.

This file is also the ZeRO worker: `accelerate launch ... tests/training/test_memory.py OUT_DIR`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from memory_probes import TensorMemoryTracker, current_memory, zero_model_state_bytes

from scaling.cli import main as cli_main
from scaling.models.biomedgpt.configuration import BiomedGPTConfig
from scaling.models.biomedgpt.modeling import BiomedGPTForConditionalGeneration
from scaling.training.memory import peak_memory, reset_peak_memory
from scaling.training.memory_estimate import (
    ParameterCount,
    activation_bytes,
    count_parameters,
    estimate_memory,
    fit,
    model_state_bytes,
    parse_size,
)

ROOT = Path(__file__).resolve().parents[2]
PSI = 1_000_000
TOLERANCE = 0.15


# ---------------------------------------------------------------------------------------------------------------------
# ZeRO formulas


@pytest.mark.parametrize("stage, gpus, expected", [
    (0, 8, (2, 2, 12)),
    (1, 8, (2, 2, 12 / 8)),
    (2, 8, (2, 2 / 8, 12 / 8)),
    (3, 8, (2 / 8, 2 / 8, 12 / 8)),
    (3, 1, (2, 2, 12)),
])
def test_mixed_precision_model_states_follow_zero_partitioning(stage, gpus, expected):
    states = model_state_bytes(ParameterCount(PSI, PSI, 0), "bf16", stage, gpus)
    assert (states["parameters"], states["gradients"], states["optimizer_states"]) == tuple(
        round(e * PSI) for e in expected)
    assert states["cpu_offloaded"] == 0


def test_fp32_without_mixed_precision_is_4_4_8():
    states = model_state_bytes(ParameterCount(PSI, PSI, 0), "fp32", 0, 4)
    assert (states["parameters"], states["gradients"], states["optimizer_states"]) == (4 * PSI, 4 * PSI, 8 * PSI)


def test_offload_moves_optimizer_states_and_stage3_weights_to_the_host():
    stage2 = model_state_bytes(ParameterCount(PSI, PSI, 0), "bf16", 2, 4, "cpu")
    assert stage2["optimizer_states"] == 0 and stage2["cpu_offloaded"] == 12 * PSI // 4
    assert stage2["parameters"] == 2 * PSI
    stage3 = model_state_bytes(ParameterCount(PSI, PSI, 0), "bf16", 3, 4, "cpu")
    assert stage3["parameters"] == stage3["optimizer_states"] == 0
    assert stage3["cpu_offloaded"] == (12 + 2) * PSI // 4
    with pytest.raises(ValueError, match="offload needs ZeRO stage"):
        model_state_bytes(ParameterCount(PSI, PSI, 0), "bf16", 0, 1, "cpu")


def test_peft_keeps_frozen_weights_only_and_qlora_stores_them_in_4_bits():
    states = model_state_bytes(ParameterCount(PSI, 1000, 0), "bf16", 0, 1)
    assert states == {"parameters": 2 * PSI, "gradients": 2 * 1000, "optimizer_states": 12 * 1000,
                      "cpu_offloaded": 0}
    qlora = model_state_bytes(ParameterCount(PSI, 1000, PSI // 2), "bf16", 0, 1)
    assert 2 * PSI // 2 + 0.5 * PSI // 2 < qlora["parameters"] < 2 * PSI // 2 + 0.52 * PSI // 2


def test_parameter_counts_match_the_real_model_and_the_ofa_sizes():
    model = BiomedGPTForConditionalGeneration(BiomedGPTConfig.from_preset("test"))
    assert count_parameters("test").total == sum(p.numel() for p in model.parameters())
    # OFA README: tiny 33M, base 180M (BiomedGPT-B 182M), large 470M, huge 930M.
    for preset, millions in (("tiny", 33), ("base", 182), ("large", 473), ("xlarge", 929)):
        assert round(count_parameters(preset).total / 1e6) == millions
    lora = count_parameters("base", "lora")
    assert 0 < lora.trainable < 0.01 * lora.total and lora.quantized == 0
    assert count_parameters("base", "qlora").quantized > 0.5 * lora.total


def test_estimate_checkpointing_saves_memory_and_fit_lists_only_fitting_configurations():
    est = estimate_memory("large", 3, 8, "cpu", "lora", "bf16", 8, 480, 128, 32)
    assert est.activations_checkpointed < est.activations_full
    assert est.total == est.model_states + est.activations_full
    assert not estimate_memory("xlarge", 0, 1, batch=64, image_size=480).fits(parse_size("80GB"))
    found = fit("24GB", "base", gpus=2, image_size=384, batches=(1, 8, 64), peft_methods=("none", "lora"))
    assert found and all(e.fits(parse_size("24GB")) for e in found)
    assert {e.peft for e in found} == {"none", "lora"}


def test_cli_prints_the_table_and_the_verdict(capsys):
    argv = ["estimate-memory", "--preset", "large", "--zero", "3", "--gpus", "8", "--offload", "cpu", "--peft", "lora",
            "--precision", "bf16", "--batch", "8", "--image-size", "480", "--src-len", "128", "--tgt-len", "32",
            "--gpu-memory", "80GB"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "optimizer states" in out and "activations (checkpointed)" in out and "fits" in out
    assert cli_main(["estimate-memory", "--preset", "xlarge", "--batch", "64", "--image-size", "480", "--gpu-memory",
                     "16GB"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    assert cli_main(["estimate-memory", "--preset", "base", "--gpus", "2", "--fit", "24GB", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r["total"] <= 0.9 * 24 * 2**30 for r in rows)
    assert cli_main(["estimate-memory", "--preset", "base", "--gpu-memory", "lots"]) == 2


# ---------------------------------------------------------------------------------------------------------------------
# Measurement helpers and the activation estimate against measured CPU runs


def test_peak_memory_sees_a_large_allocation_and_resets():
    reset_peak_memory()
    before = peak_memory()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB
    assert peak_memory() - before > 60 * 2**20 and current_memory() > 0
    del block
    reset_peak_memory()
    assert peak_memory() < before + 60 * 2**20


def measured_activation_peak(preset, batch, image_size, src_len, tgt_len, precision, checkpointing) -> int:
    """Peak bytes above the weights during forward + backward, less the weight gradients it creates."""
    torch.manual_seed(0)
    config = BiomedGPTConfig.from_preset(preset, image_size=image_size)
    model = BiomedGPTForConditionalGeneration(config).train()
    model = model.to(torch.bfloat16) if precision == "bf16" else model  # DeepSpeed runs the module in bf16
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    dtype = next(model.parameters()).dtype
    inputs = {
        "input_ids": torch.randint(4, config.vocab_size, (batch, src_len)),
        "attention_mask": torch.ones(batch, src_len, dtype=torch.long),
        "pixel_values": torch.randn(batch, 3, image_size, image_size, dtype=dtype),
        "patch_masks": torch.ones(batch, dtype=torch.bool),
        "labels": torch.randint(4, config.vocab_size, (batch, tgt_len)),
    }
    with TensorMemoryTracker() as tracker:
        model(**inputs).loss.backward()
    return tracker.peak - sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("batch, image_size, src_len, tgt_len, precision, checkpointing", [
    (8, 64, 64, 16, "bf16", False),
    (4, 128, 128, 32, "fp32", False),
    (4, 128, 128, 32, "bf16", True),
])
def test_activation_estimate_within_15_percent_of_measured_cpu_run(batch, image_size, src_len, tgt_len, precision,
                                                                   checkpointing):
    measured = measured_activation_peak("mini", batch, image_size, src_len, tgt_len, precision, checkpointing)
    config = BiomedGPTConfig.from_preset("mini", image_size=image_size)
    estimated = activation_bytes(config, batch, image_size, src_len, tgt_len, precision, checkpointing,
                                 device="cpu")["total"]
    assert abs(estimated - measured) / measured < TOLERANCE, (estimated, measured)


# ---------------------------------------------------------------------------------------------------------------------
# Model states of real 2-process DeepSpeed runs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_zero_worker(stage: int, out_dir: Path) -> None:
    """`accelerate launch` this file as a 2-process DeepSpeed job (the shipped config for stages 1-3)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--main_process_port",
                str(free_port())]
    if stage:
        launcher += ["--config_file", str(ROOT / "accelerate_configs" / f"zero{stage}.yaml")]
    else:
        launcher += ["--use_deepspeed", "--zero_stage", "0", "--num_machines", "1", "--dynamo_backend", "no"]
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, "--mixed_precision", "bf16", __file__, str(out_dir)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-6000:]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_zero_model_states_of_two_cpu_ranks_match_the_estimate(stage, tmp_path):
    launch_zero_worker(stage, tmp_path)
    params = count_parameters("test")
    expected = model_state_bytes(params, "bf16", stage, gpus=2)
    for rank in range(2):
        measured = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert measured["stage"] == stage and measured["world_size"] == 2
        for key in ("parameters", "gradients", "optimizer_states"):
            error = abs(measured[key] - expected[key]) / expected[key]
            assert error < TOLERANCE, f"ZeRO-{stage} rank {rank} {key}: measured {measured[key]}, " \
                                      f"estimated {expected[key]} ({error:.1%} off)"


def zero_worker(out_dir: Path) -> None:
    """Two optimizer steps of the test preset under the launched DeepSpeed config; write this rank's model states."""
    from scaling.config import load_config
    from scaling.training.distributed import build_accelerator, fill_deepspeed_auto, zero_stage
    from scaling.training.optim import build_optimizer

    cfg = load_config(None, [f"train.output_dir={out_dir}", "train.batch_size=2", "train.mixed_precision=bf16"])
    accelerator = build_accelerator(cfg)
    fill_deepspeed_auto(accelerator, cfg)
    torch.manual_seed(0)
    config = BiomedGPTConfig.from_preset("test")
    # DeepSpeed bf16 casts parameters only; the ResNet's BatchNorm running statistics must follow (CPU batch_norm
    # rejects bf16 input with fp32 statistics), so the whole module goes to bf16 first. Buffers are not model states.
    model = BiomedGPTForConditionalGeneration(config).to(torch.bfloat16)
    engine, _ = accelerator.prepare(model, build_optimizer(model, cfg.train))

    def loss() -> torch.Tensor:
        batch = {"input_ids": torch.randint(4, config.vocab_size, (2, 8)),
                 "pixel_values": torch.randn(2, 3, 32, 32, dtype=torch.bfloat16),
                 "patch_masks": torch.ones(2, dtype=torch.bool),
                 "labels": torch.randint(4, config.vocab_size, (2, 4))}
        return engine(**batch).loss

    accelerator.backward(loss())  # a full step (accelerate steps the engine inside backward): Adam states exist
    engine.backward(loss())  # gradients of the second step are live, before its optimizer step
    states = zero_model_state_bytes(engine)
    states.update(stage=zero_stage(accelerator), world_size=accelerator.num_processes)
    (out_dir / f"rank{accelerator.process_index}.json").write_text(json.dumps(states))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    zero_worker(Path(sys.argv[1]))
