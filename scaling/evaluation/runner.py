"""Evaluate a model on datasets of records, sharded across ranks, and write the report.

    metrics = evaluate_model(model, tokenizer, held_out, cfg, accelerator, out_dir, collator)  # training recipes
    metrics["vqa_rad/test/closed_accuracy"], metrics["vqa_rad/test/open_accuracy"]

Samples are split across processes by accelerate's sharded DataLoader; the last batch is padded with repeated
samples so every rank runs the same number of batches (ZeRO-3 needs every forward on every rank), and
`gather_for_metrics` drops the repeats. Each gathered batch carries the samples' indices, so the predictions are put
back in dataset order and checked complete and unique: N processes give exactly the predictions of one.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from rich.progress import track
from torch.utils.data import DataLoader

from scaling.config import Config, DataArgs, Decoding
from scaling.data.collate import format_record
from scaling.data.loading import SourceSplit, load_sources
from scaling.data.records import DataError, Record
from scaling.data.sources import get_source
from scaling.data.tasks import Task, get_task
from scaling.evaluation.baselines import compute_baselines
from scaling.evaluation.checkpoints import settings_config
from scaling.evaluation.generate import CandidateCache, predict_batch
from scaling.evaluation.metrics import compute_metrics, normalize_vqa_answer, sample_hits
from scaling.evaluation.report import (
    new_report,
    records_fingerprint,
    sample_rows,
    write_predictions,
    write_report,
)
from scaling.logging import get_logger
from scaling.training.distributed import unwrapped

log = get_logger(__name__)


def _fallback_without_candidates(decoding: Decoding, records: Sequence[Record], task: Task, name: str,
                                 explicit: bool) -> Decoding:
    """Auto mode decodes freely when a dataset has no answer list (instruction data); an explicit mode refuses."""
    if decoding.mode == "generate" or all(task.candidates(r) for r in records):
        return decoding
    if explicit:
        missing = next(r for r in records if not task.candidates(r))
        raise ValueError(f"{name}: eval.mode={decoding.mode} needs candidate answers, but record {missing.id!r} "
                         f"({missing.source}, index {missing.index}) has none; use eval.mode=generate or auto")
    log.warning("%s: no candidate answers in the records, decoding freely instead of %s", name, decoding.mode)
    return dataclasses.replace(decoding, mode="generate")


# ---------------------------------------------------------------------------------------------------------------------
# Sharded prediction


def _index_loader(records: Sequence[Record], collator, batch_size: int) -> DataLoader:
    """Batches of records collated for the model, each carrying the dataset positions of its samples.

    With the prompt in the decoder (prev_output) the records are batched in order of prompt length: decoding runs
    once per prefix length within a batch, so a batch of mixed lengths would cost up to one call per sample.
    """
    order = list(range(len(records)))
    if collator.prompt_type == "prev_output":
        order.sort(key=collator.prompt_lengths(records).__getitem__)

    def collate(indices: list[int]) -> dict:
        return {**collator([records[i] for i in indices]), "index": torch.tensor(indices)}

    return DataLoader(order, batch_size=batch_size, shuffle=False, collate_fn=collate)


def _count_synchronizer(accelerator: Accelerator):
    """max over ranks of a local count of collective calls (generate calls, scoring forwards) for lockstep ranks."""
    if accelerator.num_processes == 1:
        return None

    def sync(count: int) -> int:
        return int(accelerator.gather(torch.tensor([count], device=accelerator.device)).max())

    return sync


def predict_records(model, tokenizer, records: Sequence[Record], task: Task, decoding: Decoding,
                    accelerator: Accelerator, collator, batch_size: int, description: str = "evaluating",
                    progress: bool = True) -> list[str]:
    """Predictions for `records` in their order, computed on every rank's shard and gathered without repeats."""
    loader = accelerator.prepare_data_loader(_index_loader(records, collator, batch_size))
    generator = unwrapped(accelerator, model)
    synced = accelerator.num_processes > 1  # ranks stop generating at different lengths; ZeRO-3 needs lockstep
    candidates, sync_count = CandidateCache(task, tokenizer), _count_synchronizer(accelerator)
    positions, predictions = [], []
    was_training = generator.training
    generator.eval()
    steps = track(loader, description=description, disable=not (progress and accelerator.is_main_process),
                  transient=True)
    with torch.no_grad(), accelerator.autocast():
        for batch in steps:
            indices = batch["index"].tolist()
            texts = predict_batch(generator, tokenizer, batch, [records[i] for i in indices], task, decoding,
                                  candidates, synced_gpus=synced, sync_count=sync_count)
            positions += accelerator.gather_for_metrics(indices, use_gather_object=True)
            predictions += accelerator.gather_for_metrics(texts, use_gather_object=True)
    generator.train(was_training)
    return _in_dataset_order(positions, predictions, len(records))


def _in_dataset_order(positions: list[int], predictions: list[str], n: int) -> list[str]:
    """Gathered predictions placed at their dataset positions; a repeat or a gap is an error, never silent."""
    ordered: list[str | None] = [None] * n
    for position, prediction in zip(positions, predictions, strict=True):
        if ordered[position] is not None:
            raise RuntimeError(f"sample {position} was predicted twice after gathering; the sharded loader "
                               "padded more than gather_for_metrics removed")
        ordered[position] = prediction
    missing = [i for i, p in enumerate(ordered) if p is None]
    if missing:
        raise RuntimeError(f"{len(missing)} samples were never predicted (first: {missing[0]})")
    return ordered


# ---------------------------------------------------------------------------------------------------------------------
# One (checkpoint, dataset) evaluation → one report entry


def evaluate_dataset(model, tokenizer, split: SourceSplit, cfg: Config, accelerator: Accelerator, collator,
                     checkpoint: dict, out_dir: str | Path) -> dict:
    """Predict, score and describe one dataset of one task: the evaluation entry of report.json (scores with their
    definitions, the other protocols' scores, the candidates, and baselines fitted on the source's train split)."""
    records, name = split.records, split.label
    task = get_task(records[0].task)
    mixed = sorted({r.task for r in records} - {task.name})
    if mixed:
        raise ValueError(f"{name}: one dataset must hold one task, found {task.name} and {', '.join(mixed)}")
    decoding = _fallback_without_candidates(cfg.eval.decoding(task.decoding), records, task, name,
                                            explicit=cfg.eval.mode != "auto")
    start = time.perf_counter()
    predictions = predict_records(model, tokenizer, records, task, decoding, accelerator, collator,
                                  cfg.eval.batch_size, f"{checkpoint['name']} · {name}", cfg.logging.progress)
    seconds = time.perf_counter() - start
    evaluation = {
        "run": 0, "checkpoint": checkpoint,
        "dataset": {"name": name, "n": len(records), **split.describe()},
        "task": task.name, "mode": decoding.mode, "decoding": decoding.as_dict(), "primary": task.metrics[0],
        "prompt_type": collator.prompt_type, "candidates": candidate_summary(records, task, decoding),
        "timing": {"seconds": seconds, "samples_per_s": len(records) / max(seconds, 1e-9),
                   "processes": accelerator.num_processes},
        "predictions": predictions,
    }
    if accelerator.is_main_process:
        metrics = compute_metrics(task.name, predictions, records)
        hits = sample_hits(task.name, predictions, records)
        file = Path(out_dir) / "predictions" / f"{_slug(checkpoint['name'])}__{_slug(name)}.jsonl"
        write_predictions(file, records, predictions, hits)
        evaluation["dataset"]["fingerprint"] = records_fingerprint(records)  # reads every image: main process only
        shown = records[:cfg.eval.report_samples]
        prompts = [format_record(r, collator.instruction).prompt.strip() for r in shown]  # as the model read them
        evaluation.update(metrics=metrics, baselines=dataset_baselines(split, task, cfg.data),
                          predictions_file=str(file.relative_to(out_dir)),
                          samples=sample_rows(shown, predictions, hits, len(shown), prompts))
        log.info("%s on %s: %s", checkpoint["name"], name,
                 ", ".join(f"{k}={v:.2f}" for k, v in metrics["scores"].items()))
    return evaluation


def candidate_summary(records: Sequence[Record], task: Task, decoding: Decoding) -> dict | None:
    """The answers constrained or scored modes chose among: how many, from where, and how many references they hold
    (a reference outside the list cannot be predicted); None for free decoding."""
    if decoding.mode == "generate":
        return None
    lists = {tuple(task.candidates(r) or ()) for r in records}
    sizes = sorted({len(answers) for answers in lists})
    origins = sorted({str(r.attributes.get("candidates_from") or "") for r in records} - {""})
    if not origins:
        origins = ["the task's fixed labels" if type(task).candidates is not Task.candidates
                   else "the records' own candidate lists"]
    listed = sum(normalize_vqa_answer(r.target) in {normalize_vqa_answer(c) for c in task.candidates(r) or ()}
                 for r in records if r.target is not None)
    return {"count": sizes[0] if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}", "lists": len(lists),
            "origin": "; ".join(origins), "references_listed": listed, "n": len(records)}


def dataset_baselines(split: SourceSplit, task: Task, data: DataArgs) -> dict:
    """Baselines fitted on the train split of the evaluated source: {"fitted_on", "rows"}, or {"unavailable": why}."""
    source = split.source
    if "train" not in get_source(source.name).splits:
        return {"unavailable": f"source {source.name} has no train split to fit baselines on"}
    try:
        [train] = load_sources([dataclasses.replace(source, split="train", label=None)], data)
    except DataError as error:
        return {"unavailable": f"its train split could not be read: {error}"}
    labelled = [r for r in train.records if r.task == task.name and r.target is not None]
    if not labelled:
        return {"unavailable": f"no labelled {task.name} records in the {source.name} train split"}
    itself = " (the evaluated split itself)" if source.split == "train" else ""
    return {"fitted_on": f"{source.name} train split, {len(labelled)} records{itself}",
            "rows": compute_baselines(task.name, labelled, split.records)}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def model_info(model, name: str, path: str | None = None, fingerprint: str | None = None) -> dict:
    """The checkpoint entry of a report; parameters counted as stored (ZeRO-3 shards report their full size)."""
    parameters = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return {"name": name, "path": path, "fingerprint": fingerprint, "parameters": parameters}


def run_entry(cfg: Config, accelerator: Accelerator, seconds: float) -> dict:
    """The `runs` entry of a report: config, environment, total time."""
    import transformers

    return {"config": cfg.to_dict(), "timing": {"total_s": seconds},
            "environment": {"processes": accelerator.num_processes, "device": str(accelerator.device),
                            "distributed_type": str(accelerator.distributed_type.value),
                            "mixed_precision": accelerator.mixed_precision, "torch": torch.__version__,
                            "transformers": transformers.__version__}}


def finish_report(evaluations: list[dict], cfg: Config, accelerator: Accelerator, out_dir: str | Path,
                  seconds: float) -> dict[str, Path] | None:
    """Write report.json/.md/.html on the main process (predictions live in their own files, not in the report)."""
    if not accelerator.is_main_process:
        return None
    entries = [{k: v for k, v in e.items() if k != "predictions"} for e in evaluations]
    paths = write_report(new_report([run_entry(cfg, accelerator, seconds)], entries), out_dir)
    log.info("report: %s", paths["html"])
    return paths


def flat_metrics(evaluations: list[dict]) -> dict[str, float]:
    """{"<dataset>/<score>": value} of every evaluation that has metrics (the main process's view)."""
    out = {}
    for e in evaluations:
        for key, value in e.get("metrics", {}).get("scores", {}).items():
            out[f"{e['dataset']['name']}/{key}"] = value
    return out


def evaluate_model(model, tokenizer, datasets: Sequence[SourceSplit], cfg: Config, accelerator: Accelerator,
                   out_dir: str | Path, collator, name: str | None = None) -> dict:
    """Evaluate an (already prepared) model on held-out datasets, write the report into `out_dir`.

    `collator` is `eval_collator(...)` with the prompts the model was trained on. Every rank must call this; the
    returned metrics are complete on the main process ({} elsewhere).
    """
    start = time.perf_counter()
    checkpoint = model_info(unwrapped(accelerator, model), name or cfg.model.checkpoint or cfg.model.preset,
                            cfg.model.checkpoint)
    evaluations = [evaluate_dataset(model, tokenizer, split, cfg, accelerator, collator, checkpoint, out_dir)
                   for split in datasets]
    finish_report(evaluations, cfg, accelerator, out_dir, time.perf_counter() - start)
    return flat_metrics(evaluations)


def eval_collator(tokenizer, cfg: Config, model_config, instruction=None, checkpoint: dict | None = None):
    """The training collator at the model's resolution with the prompt layout and lengths the checkpoint's export
    recorded (else the configured ones) and, with data.instruction, the training run's instruction formatter
    (scaling.data.instruct.instruction_formatter)."""
    from scaling.data.collate import Collator

    if checkpoint is not None and "inference" in checkpoint:
        cfg = settings_config(cfg, checkpoint["inference"])
    return Collator(tokenizer, model_config.image_size, cfg.data.max_src_len, cfg.data.max_tgt_len,
                    cfg.data.prompt_type, instruction=instruction)
