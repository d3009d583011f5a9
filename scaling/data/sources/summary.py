"""What a dataset holds (split sizes, counts per task / answer type / category, formatted samples) and conversion
to BiomedGPT TSV or instruction JSON: the library behind `scaling data inspect` and `scaling data convert`."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from scaling.data.records import DataError, Record, SplitNotFound
from scaling.data.sources import biomedgpt_tsv, get_source, load_source
from scaling.data.tasks import get_task


@dataclass
class SplitSummary:
    """Counts and a few formatted samples of one split."""

    split: str
    n_records: int = 0
    skipped: Counter = field(default_factory=Counter)
    tasks: Counter = field(default_factory=Counter)
    answer_types: Counter = field(default_factory=Counter)
    categories: Counter = field(default_factory=Counter)
    samples: list[tuple[str, str, str]] = field(default_factory=list)
    """(id, prompt, target) as the model sees them."""
    missing: str | None = None
    """Why the split is absent (no file for it), else None."""


def summarize_split(split: str, records: list[Record], skipped: Counter, n_samples: int) -> SplitSummary:
    summary = SplitSummary(split, len(records), skipped)
    for record in records:
        summary.tasks[record.task] += 1
        summary.answer_types[record.answer_type or "-"] += 1
        summary.categories[str(record.attributes.get("category") or "-")] += 1
    step = max(1, len(records) // max(1, n_samples))  # spread the samples over the split
    for record in records[::step][:n_samples]:
        task = get_task(record.task)
        summary.samples.append((record.id, task.prompt(record), task.target(record)))
    return summary


def inspect_source(name: str, path: str | Path, splits: list[str] | None = None, n_samples: int = 3,
                   **options) -> list[SplitSummary]:
    """Summaries of the requested splits (default: every split the source can have; absent ones are marked)."""
    summaries = []
    for split in splits or get_source(name).splits:
        try:
            result = load_source(name, path, split, **options)
        except SplitNotFound as error:
            summaries.append(SplitSummary(split, missing=str(error)))
            continue
        summaries.append(summarize_split(split, result.records, result.skipped, n_samples))
    return summaries


def _counts(counter: Counter) -> str:
    return ", ".join(f"{key} {count:,}" for key, count in counter.most_common()) or "-"


def render_summaries(name: str, summaries: list[SplitSummary], console: Console | None = None) -> None:
    """Rich tables: one row per split, then the samples."""
    console = console or Console()
    table = Table(title=f"{name}: splits")
    for column in ("split", "records", "skipped", "tasks", "answer types", "categories"):
        table.add_column(column, overflow="fold")
    for s in summaries:
        if s.missing:
            table.add_row(s.split, "-", "-", f"[dim]{s.missing}[/dim]", "", "")
        else:
            table.add_row(s.split, f"{s.n_records:,}", _counts(s.skipped), _counts(s.tasks), _counts(s.answer_types),
                          _counts(s.categories))
    console.print(table)
    samples = Table(title=f"{name}: samples (prompt → target)")
    for column in ("split", "id", "prompt", "target"):
        samples.add_column(column, overflow="fold")
    for s in summaries:
        for record_id, prompt, target in s.samples:
            samples.add_row(s.split, record_id, repr(prompt), repr(target))
    console.print(samples)


def convert_source(name: str, path: str | Path, split: str, to: str, out: str | Path, seed: int = 0,
                   **options) -> dict:
    """Writes one split as a BiomedGPT TSV (`to='tsv'`) or an instruction JSON (`to='instruct'`, LLaVA-Med
    format, read back by the `llava_med` source); returns what was written."""
    result = load_source(name, path, split, **options)
    out = Path(out)
    if to == "tsv":
        n_rows = biomedgpt_tsv.write(result.records, out)
        written = {"file": str(out), "rows": n_rows, "reload": {"source": "biomedgpt_tsv",
                                                               "task": result.records[0].task if n_rows else None}}
    elif to == "instruct":
        from scaling.data.instruct import CandidatePools, InstructionFormatter, write_instruction_file

        formatter = InstructionFormatter(CandidatePools.from_records(result.records), seed=seed)
        reload = write_instruction_file(result.records, formatter, out)
        written = {"file": str(out), "rows": len(result.records), "reload": {"source": "llava_med", **reload}}
    else:
        raise DataError(f"cannot convert to {to!r}; choose tsv or instruct")
    written["skipped"] = dict(result.skipped)
    return written


def parse_options(pairs: list[str]) -> dict:
    """['q_lang=zh', 'validation_fraction=0.1', 'class_names=["a","b"]'] → options; values are JSON when they
    parse as JSON, else strings."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DataError(f"option {pair!r} is not key=value")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options
