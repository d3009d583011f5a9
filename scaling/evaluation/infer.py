"""Single-sample inference: one image and question (or a text-only task) through a checkpoint.

    answer = infer("runs/instruct/export", "vqa", image="scan.jpg", question="is there a lesion?")
    answer = infer(ckpt, "nli", text={"sentence1": "...", "sentence2": "..."})   # scored over yes / no / maybe
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from scaling.config import EvalArgs
from scaling.data.records import ImageRef, Record
from scaling.data.tasks import get_task
from scaling.evaluation.checkpoints import load_for_eval
from scaling.evaluation.generate import CandidateCache, generate_batch, score_batch


def make_record(task_name: str, text: dict[str, str], image: str | Path | None = None,
                candidates: Sequence[str] | None = None) -> Record:
    """An unlabeled record, checked like dataset records (missing image or text field → a clear error)."""
    task = get_task(task_name)
    if image is not None and not Path(image).is_file():
        raise FileNotFoundError(f"image {image} does not exist")
    record = Record(id="input", task=task.name, image=ImageRef(Path(image)) if image else None, text=dict(text),
                    target=None, candidates=list(candidates) if candidates else None, source="command line")
    missing = [k for k in task.text_fields if not record.text.get(k, "").strip()]
    if missing:
        raise ValueError(f"task {task.name} needs the text field(s) {', '.join(missing)}")
    if task.needs_image and record.image is None:
        raise ValueError(f"task {task.name} needs an image (--image)")
    return record


def infer(checkpoint: str | Path, task_name: str, text: dict[str, str] | None = None, image: str | Path | None = None,
          candidates: Sequence[str] | None = None, args: EvalArgs | None = None, base: str | Path | None = None,
          prompt_type: str = "none", device: str | None = None) -> dict:
    """{"prediction", "prompt", "mode", "scores" (score mode: log-probability per candidate)} for one input.

    `prompt_type` must be the one the checkpoint was trained with (prev_output for BiomedGPT's VQA fine-tuning).
    """
    from scaling.data.collate import Collator, Sample

    args = args or EvalArgs()
    record = make_record(task_name, text or {}, image, candidates)
    task = get_task(record.task)
    model, tokenizer, _ = load_for_eval(checkpoint, base)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    decoding = args.decoding(task.decoding)
    if decoding.mode != "generate" and not task.candidates(record):  # no answers to constrain to or score
        decoding = dataclasses.replace(args, mode="generate").decoding(task.decoding)
    collator = Collator(tokenizer, model.config.image_size, model.config.max_positions, 2, prompt_type)
    sample = Sample(record.id, task.name, task.prompt(record), "", record.image)  # no answer: an empty target
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collator([sample]).items()}
    out = {"prompt": sample.prompt, "mode": decoding.mode}
    with torch.no_grad():
        if decoding.mode == "score":
            candidate_set = CandidateCache(task, tokenizer)(record)
            answers, scores = score_batch(model, tokenizer, batch, decoding, [candidate_set])
            return {**out, "prediction": answers[0], "scores": dict(zip(candidate_set.answers, scores[0],
                                                                          strict=True))}
        sets = [CandidateCache(task, tokenizer)(record)] if decoding.mode == "constrained" else None
        return {**out, "prediction": generate_batch(model, tokenizer, batch, decoding, sets)[0]}
