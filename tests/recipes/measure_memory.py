"""Test launcher: run a recipe and record each process's memory through seams of the library.

    accelerate launch ... tests/recipes/measure_memory.py recipes/finetune.py --config ... key=value ...

Every process writes <train.output_dir>/memory_rank<r>.json: `before_model` (bytes in use when the model is about to
be built: the runtime, the data, the tokenizer), `setup_peak` (the peak while the model is built and sharded: every
rank builds it whole before ZeRO partitions it), `training_peak` (the peak of the training loop alone) and `run_peak`
(the peak through the final checkpoint and the export). Bytes are CUDA allocated on a GPU, the resident set
size on a CPU (scaling.training.memory).
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import scaling.training.loop as loop
import scaling.training.run as run
from scaling.training.memory import current_memory, peak_memory, reset_peak_memory

MEASURED: dict[str, int] = {}


def measure_memory() -> None:
    build, train, finish = run.build_tokenizer_and_model, loop.train, run.finish_training

    def build_tokenizer_and_model(cfg, accelerator, train_data):
        MEASURED["before_model"] = current_memory(accelerator.device)
        return build(cfg, accelerator, train_data)

    def train_and_measure(cfg, accelerator, prepared, stream, start_step):
        MEASURED["setup_peak"] = peak_memory(accelerator.device)
        reset_peak_memory(accelerator.device)
        step = train(cfg, accelerator, prepared, stream, start_step)
        MEASURED["training_peak"] = peak_memory(accelerator.device)
        return step

    def finish_training(cfg, accelerator, prepared, tokenizer, stream, step):
        export = finish(cfg, accelerator, prepared, tokenizer, stream, step)
        MEASURED["run_peak"] = peak_memory(accelerator.device)
        out = Path(cfg.train.output_dir) / f"memory_rank{accelerator.process_index}.json"
        out.write_text(json.dumps({**MEASURED, "device": accelerator.device.type}))
        return export

    run.build_tokenizer_and_model, loop.train, run.finish_training = (build_tokenizer_and_model, train_and_measure,
                                                                      finish_training)


def main() -> None:
    recipe, *recipe_args = sys.argv[1:]
    measure_memory()
    sys.argv = [recipe, *recipe_args]
    runpy.run_path(recipe, run_name="__main__")


if __name__ == "__main__":
    main()
