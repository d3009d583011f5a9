"""The one place a run's config becomes records: which sources, which split, and each source paired with its records.

    train = load_sources(training_sources(cfg, accelerator), cfg.data)              # [SourceSplit, ...]
    held_out = load_sources(evaluation_sources(cfg, training), cfg.data, cfg.eval.max_samples)

Without data.sources the run reads the embedded synthetic dataset (generated once by rank 0 under data.cache_dir);
without data.eval_sources it evaluates on the test split of the training sources that have one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from scaling.config import Config, DataArgs, SourceArgs
from scaling.data.records import DataError, Record
from scaling.data.sources import get_source, load_source
from scaling.logging import get_logger

log = get_logger(__name__)


@dataclass
class SourceSplit:
    """One configured source and the records of its split."""

    label: str
    """Unique name in the run: logs, mixture keys and report dataset names."""
    source: SourceArgs
    records: list[Record]
    skipped: dict[str, int]
    available: int
    """Records the split holds (before eval.max_samples)."""

    def describe(self) -> dict:
        """The dataset entry of a report."""
        return {"source": self.source.name, "split": self.source.split, "path": str(self.source.path),
                "skipped": dict(self.skipped), "available": self.available}


def training_sources(cfg: Config, accelerator) -> list[SourceArgs]:
    """data.sources, or the embedded synthetic dataset (data.synthetic_tasks, all six when empty)."""
    if cfg.data.sources:
        return cfg.data.sources
    from scaling.data.synthetic import generate_synthetic

    out_dir = Path(cfg.data.cache_dir) / "synthetic"
    with accelerator.main_process_first():  # rank 0 writes the files, the others then find them cached
        data = generate_synthetic(out_dir, cfg.data.synthetic_images, seed=synthetic_seed(cfg))
    tasks = cfg.data.synthetic_tasks or list(data.sources)
    return [SourceArgs(name=s.loader, path=str(s.path), split="train", options=dict(s.options),
                       label=f"synthetic/{task}") for task, s in data.sources.items() if task in tasks]


def synthetic_seed(cfg: Config) -> int:
    """The seed of the embedded synthetic data: data.synthetic_seed, else train.seed."""
    return cfg.train.seed if cfg.data.synthetic_seed is None else cfg.data.synthetic_seed


def evaluation_sources(cfg: Config, training: list[SourceArgs]) -> list[SourceArgs]:
    """data.eval_sources, else the test split of every training source that has one."""
    if cfg.data.eval_sources:
        return cfg.data.eval_sources
    return [dataclasses.replace(s, split="test") for s in training if "test" in get_source(s.name).splits]


def missing_paths(sources: list[SourceArgs]) -> list[str]:
    """A problem line per source whose dataset path does not exist (to report with the other config problems)."""
    return [f"data source {s.name!r}: {s.path} does not exist; pass the folder (or file) of the dataset release"
            for s in sources if s.path is not None and not Path(s.path).exists()]


def load_sources(sources: list[SourceArgs], data: DataArgs, max_samples: int | None = None) -> list[SourceSplit]:
    """Each source's split (its `split` field), at most `max_samples` records each; skipped records are logged."""
    out: list[SourceSplit] = []
    for source in sources:
        result = load_source(source.name, source.path, source.split, on_bad_record=data.on_bad_record,
                             **source.options)
        label = unique_label(source.label or f"{source.name}/{source.split}", {s.label for s in out})
        if result.skipped:
            log.warning("%s (%s): skipped %d bad records: %s", label, source.path, result.n_skipped,
                        dict(result.skipped))
        log.info("%s: %d records", label, len(result.records))
        out.append(SourceSplit(label, source, result.records[:max_samples], dict(result.skipped), len(result.records)))
    return out


def option_records(held_out: list[SourceSplit], data: DataArgs) -> list[Record]:
    """Where evaluation's instruction prompts draw answer options from without a training run at hand: the train
    split of each evaluated source (its evaluated records when the source has no train split, logged)."""
    records: list[Record] = []
    for split in held_out:
        if "train" in get_source(split.source.name).splits:
            train = dataclasses.replace(split.source, split="train", label=None)
            records += load_source(train.name, train.path, "train", on_bad_record=data.on_bad_record,
                                   **train.options).records
        else:
            log.warning("%s: no train split to draw instruction options from; using its own answers", split.label)
            records += split.records
    return records


def require_records(splits: list[SourceSplit]) -> list[SourceSplit]:
    """The splits, refusing any that holds no usable record (nothing to train on or score)."""
    for split in splits:
        if not split.records:
            raise DataError(f"{split.label} ({split.source.path}, split {split.source.split}) has no usable records"
                            f"{f' ({split.skipped} skipped)' if split.skipped else ''}; check the path and split")
    return splits


def unique_label(label: str, taken: set[str]) -> str:
    """`label`, or `label_2`, `label_3`, ... when a source of that name is already in the run."""
    candidate, n = label, 1
    while candidate in taken:
        n += 1
        candidate = f"{label}_{n}"
    return candidate


def records_by_label(splits: list[SourceSplit]) -> dict[str, list[Record]]:
    return {s.label: s.records for s in splits}


def all_records(splits: list[SourceSplit]) -> list[Record]:
    return [r for split in splits for r in split.records]
