"""LoRA, IA3 and prefix tuning under real DeepSpeed ZeRO-3 with 2 CPU processes: train, save the adapter (gathered),
reload it into a fresh base model and reproduce the sharded model's outputs (peft#2892 saved empty tensors). QLoRA
(NF4) the same way under ZeRO-2, the highest stage config.QLORA_ZERO_STAGES accepts.

This file is also the worker: `accelerate launch ... tests/recipes/test_peft_zero3.py {zero3|zero2} OUT_DIR`.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
LAUNCHES = {
    # one ZeRO-3 launch covers the three methods, each on different components
    "zero3": {"lora": dict(vision="freeze", encoder="lora", decoder="lora"),
              "ia3": dict(vision="ia3", encoder="freeze", decoder="ia3"),
              "prefix": dict(vision="freeze", encoder="freeze", decoder="prefix")},
    # QLoRA under the highest stage config.QLORA_ZERO_STAGES accepts
    "zero2": {"qlora": dict(vision="freeze", encoder="lora", decoder="lora", quantize="nf4")},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("launch", LAUNCHES)
def test_adapters_train_save_and_reload_under_deepspeed(launch, tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / f"{launch}.yaml"), "--num_processes", "2", "--main_process_port",
           str(free_port()), __file__, launch, str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == set(LAUNCHES[launch])
    for method, result in results.items():
        assert result["zero_stage"] == int(launch[-1]), method
        if launch == "zero3":
            assert result["sharded"], method  # the trainable parameters really were partitioned
        assert result["tensors"] > 0 and result["empty_tensors"] == 0, method
        assert result["saved_names"] == result["trainable_names"], method
        assert result["trained_away_from_init"], method
        assert result["max_abs_diff"] < 1e-5, (method, result["max_abs_diff"])


# ---------------------------------------------------------------------------------------------------------------------
# Worker (runs on every rank)


def worker(launch: str, out_dir: Path) -> None:
    from safetensors.torch import load_file

    from scaling.adapters import ADAPTER_FILE, apply_peft, load_adapter, save_adapter
    from scaling.config import Config, PeftArgs, TrainArgs
    from scaling.models.biomedgpt import BiomedGPTConfig, BiomedGPTForConditionalGeneration
    from scaling.training.distributed import build_accelerator, fill_deepspeed_auto, zero_stage

    cfg = Config(train=TrainArgs(output_dir=str(out_dir), batch_size=2, max_grad_norm=1.0, mixed_precision="no"))
    accelerator = build_accelerator(cfg)
    fill_deepspeed_auto(accelerator, cfg)
    # Partition even the smallest tensors (adapters are tiny, below DeepSpeed's default persistence threshold): every
    # rank then holds empty local copies, the situation where an ungathered save writes empty tensors.
    if zero_stage(accelerator) == 3:
        accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    config = BiomedGPTConfig.from_preset("test")

    def base_model():
        torch.manual_seed(0)
        return BiomedGPTForConditionalGeneration(config)

    def batch(seed: int) -> dict:
        gen = torch.Generator().manual_seed(seed)
        return dict(input_ids=torch.randint(4, config.vocab_size, (2, 7), generator=gen),
                    pixel_values=torch.randn(2, 3, config.image_size, config.image_size, generator=gen),
                    patch_masks=torch.tensor([True, False]),
                    labels=torch.randint(4, config.vocab_size, (2, 5), generator=gen))

    results = {}
    for method, policy in LAUNCHES[launch].items():
        model = apply_peft(base_model(), PeftArgs(**policy, r=4))
        initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        engine, optimizer = accelerator.prepare(model, optimizer)
        engine.train()
        for step in range(3):  # different data per rank: the gradients are really reduced
            loss = engine(**batch(100 * accelerator.process_index + step)).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        engine.eval()
        with torch.no_grad():
            reference = engine(**batch(7)).logits  # collective forward of the sharded model
        unwrapped = accelerator.unwrap_model(engine)
        sharded = all(hasattr(p, "ds_id") and p.ds_tensor.numel() < p.ds_numel  # this rank holds a slice only
                      for p in unwrapped.parameters() if p.requires_grad)
        adapter_dir = out_dir / method
        save_adapter(unwrapped, adapter_dir, accelerator.is_main_process)
        if accelerator.is_main_process:
            saved = load_file(str(adapter_dir / ADAPTER_FILE))
            reloaded = load_adapter(base_model().eval(), adapter_dir)
            with torch.no_grad():
                diff = (reloaded(**batch(7)).logits - reference).abs().max().item()
            results[method] = {
                "zero_stage": zero_stage(accelerator),
                "sharded": sharded,
                "tensors": len(saved),
                "empty_tensors": sum(t.numel() == 0 for t in saved.values()),
                "saved_names": sorted(saved),
                "trainable_names": sorted(initial),
                "trained_away_from_init": any(not torch.equal(saved[n], t) for n, t in initial.items()),
                "max_abs_diff": diff,
            }
        accelerator.wait_for_everyone()
        accelerator.free_memory(engine, optimizer)
    if accelerator.is_main_process:
        (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    accelerator.end_training()


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
