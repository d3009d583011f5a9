"""Test launcher: run a recipe with a fault injected from outside, through a seam of the library.

    python tests/recipes/inject_fault.py nonfinite=3:2 recipes/finetune.py --config ... key=value ...
    accelerate launch ... tests/recipes/inject_fault.py kill_during_save=4 recipes/finetune.py ...

Faults (each process of a launch applies them to itself):
  nonfinite=FIRST:COUNT    micro-batch losses FIRST .. FIRST+COUNT-1 (counted from 1 in this process) are NaN:
                           `scaling.training.loop.loss_step` is wrapped. With one micro-batch per step and a fresh
                           start, that poisons the first COUNT attempts at optimizer step FIRST.
  kill_during_save=STEP    the process SIGKILLs itself when it is about to mark step STEP's checkpoint complete:
                           `scaling.training.checkpoint.write_manifest` is wrapped (it runs on the main process).
  step_seconds=S           every micro-batch's loss takes S seconds longer (`scaling.training.loop.loss_step` is
                           wrapped), so a test that stops the run after step N is sure to land before the run ends,
                           however fast the host.
  skip_batches=N           the batch stream hands out N micro-batches that are never trained on before training
                           starts: `scaling.training.loop.train` is wrapped (the reference for a window that the
                           non-finite guard throws away).
"""

from __future__ import annotations

import itertools
import os
import runpy
import signal
import sys
import time

import scaling.training.checkpoint as checkpoint
import scaling.training.loop as loop


def poison_losses(first: int, count: int) -> None:
    real, calls = loop.loss_step, itertools.count(1)

    def loss_step(model, batch):
        loss = real(model, batch)
        return loss * float("nan") if first <= next(calls) < first + count else loss

    loop.loss_step = loss_step


def kill_during_save(at_step: int) -> None:
    real = checkpoint.write_manifest

    def write_manifest(directory, step, world_size, parent=None):
        if step == at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(directory, step, world_size, parent)

    checkpoint.write_manifest = write_manifest


def slow_steps(seconds: float) -> None:
    real = loop.loss_step

    def loss_step(model, batch):
        time.sleep(seconds)
        return real(model, batch)

    loop.loss_step = loss_step


def skip_batches(count: int) -> None:
    real = loop.train

    def train(cfg, accelerator, prepared, stream, start_step):
        for _ in range(count):
            stream.next_batch(accelerator.device)
        return real(cfg, accelerator, prepared, stream, start_step)

    loop.train = train


FAULTS = {"nonfinite": lambda spec: poison_losses(*map(int, spec.split(":"))),
          "kill_during_save": lambda spec: kill_during_save(int(spec)),
          "step_seconds": lambda spec: slow_steps(float(spec)),
          "skip_batches": lambda spec: skip_batches(int(spec))}


def main() -> None:
    faults = list(itertools.takewhile(lambda arg: "=" in arg and not arg.endswith(".py"), sys.argv[1:]))
    recipe, *recipe_args = sys.argv[1 + len(faults):]
    for fault in faults:
        name, spec = fault.split("=", 1)
        FAULTS[name](spec)
    sys.argv = [recipe, *recipe_args]
    runpy.run_path(recipe, run_name="__main__")


if __name__ == "__main__":
    main()
