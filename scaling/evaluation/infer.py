"""Single-sample inference: one image and question (or a text-only task) through a checkpoint, prompted and decoded
as the checkpoint's run trained and evaluated it (its export's inference.json).

    answer = infer("runs/instruct/export", "vqa", {"question": "is there a lesion?"}, image="scan.jpg")
    answer = infer(ckpt, "nli", text={"sentence1": "...", "sentence2": "..."})   # scored over yes / no / maybe
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from scaling.config import EvalArgs
from scaling.data.records import ImageRef, Record
from scaling.data.tasks import Task, get_task
from scaling.evaluation.checkpoints import DECODING_KEYS, load_for_eval
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


def inference_prompt(task: Task, record: Record, instruction: dict | None) -> str:
    """The task's BiomedGPT prompt, or, for an instruction-tuned export, its recorded template with the given
    candidates as the options (the open template without candidates)."""
    if instruction is None:
        return task.prompt(record)
    from scaling.data.instruct import format_options, question_text

    options = task.candidates(record)
    template = instruction["with_options"] if options else instruction["without_options"]
    return " " + template.format(question=question_text(record), options=format_options(options or []))


def infer_decoding(settings: dict, task: Task, record: Record, overrides: dict | None):
    """The recorded eval.* decoding with the given overrides (None values ignored); modes that need candidates fall
    back to free generation when the input has none."""
    keys = {**settings["eval"], **{k: v for k, v in (overrides or {}).items() if v is not None}}
    args = EvalArgs(**{k: keys[k] for k in DECODING_KEYS})
    decoding = args.decoding(task.decoding)
    if decoding.mode != "generate" and not task.candidates(record):  # no answers to constrain to or score
        decoding = dataclasses.replace(args, mode="generate").decoding(task.decoding)
    return decoding


def infer(checkpoint: str | Path, task_name: str, text: dict[str, str] | None = None, image: str | Path | None = None,
          candidates: Sequence[str] | None = None, decoding: dict | None = None, base: str | Path | None = None,
          prompt_type: str | None = None, device: str | None = None) -> dict:
    """{"prediction", "prompt", "mode", "settings", "scores" (score mode: log-probability per candidate)}.

    Prompt layout, prompt/target lengths, instruction template and decoding come from the export's inference.json;
    `decoding` ({"mode", "beam", "max_new_tokens", ...}) and `prompt_type` override them.
    """
    from scaling.data.collate import Collator, Sample

    record = make_record(task_name, text or {}, image, candidates)
    task = get_task(record.task)
    model, tokenizer, info = load_for_eval(checkpoint, base)
    settings = info["inference"]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    chosen = infer_decoding(settings, task, record, decoding)
    collator = Collator(tokenizer, model.config.image_size, settings["max_src_len"], settings["max_tgt_len"],
                        prompt_type or settings["prompt_type"])
    sample = Sample(record.id, task.name, inference_prompt(task, record, settings["instruction"]), "", record.image)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collator([sample]).items()}
    out = {"prompt": sample.prompt, "mode": chosen.mode, "settings": {**settings, "prompt_type": collator.prompt_type}}
    with torch.no_grad():
        if chosen.mode == "score":
            candidate_set = CandidateCache(task, tokenizer)(record)
            answers, scores = score_batch(model, tokenizer, batch, chosen, [candidate_set])
            return {**out, "prediction": answers[0], "scores": dict(zip(candidate_set.answers, scores[0],
                                                                          strict=True))}
        sets = [CandidateCache(task, tokenizer)(record)] if chosen.mode == "constrained" else None
        return {**out, "prediction": generate_batch(model, tokenizer, batch, chosen, sets)[0]}
