"""Instruction tuning of BiomedGPT: every sample becomes an instruction (MILE-style templates with answer options,
LLaVA-Med conversations), then zero-shot evaluation on held-out questions, under Accelerate at any scale.

The embedded default needs no arguments and no downloads: it generates the synthetic radiology dataset (cached),
trains a BPE tokenizer on it, instruction-tunes the `mini` preset on a 2-core CPU, exports the model, evaluates it on
questions about held-out images and prints closed / open accuracy and where the report is:

    accelerate launch recipes/instruct.py

Launch (from the repository root; `key=value` overrides follow the config):

    # one process, CPU or GPU
    accelerate launch recipes/instruct.py --config recipes/configs/biomedgpt/tiny_instruct.yaml
    # one node, 8 GPUs, DDP / ZeRO-3
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml --num_processes 8 recipes/instruct.py \
        --config recipes/configs/biomedgpt/base_instruct.yaml
    accelerate launch --config_file accelerate_configs/zero3.yaml --num_processes 8 recipes/instruct.py \
        --config recipes/configs/biomedgpt/large_zero3_instruct.yaml train.lr=2e-5
    # Slurm, N nodes (see the site settings at the top of the script)
    sbatch --nodes 4 launch/slurm_multi_node.sbatch recipes/instruct.py \
        --config recipes/configs/biomedgpt/xlarge_zero3_instruct.yaml

Instruction tuning is a setting of the one training path (data.instruction=true), so this script is an alias: it runs
recipes/finetune.py, with recipes/configs/biomedgpt/mini_instruct.yaml (the embedded job) as the default config.
Resume with `train.resume=auto`; SIGTERM (Slurm preemption) writes a checkpoint and exits.
"""

import runpy
import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parent
DEFAULT_CONFIG = RECIPES / "configs" / "biomedgpt" / "mini_instruct.yaml"


def main() -> None:
    if not any(arg == "--config" or arg.startswith("--config=") for arg in sys.argv[1:]):
        sys.argv[1:1] = ["--config", str(DEFAULT_CONFIG)]
    runpy.run_path(str(RECIPES / "finetune.py"), run_name="__main__")


if __name__ == "__main__":
    main()
