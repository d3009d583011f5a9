"""MedNLI: `mli_{train,dev,test}_v1.jsonl`, one JSON object a line with sentence1, sentence2, gold_label.

Labels become the BiomedGPT answers: entailment → yes, contradiction → no, neutral → maybe. Rows whose
gold_label is '-' (no annotator majority) are dropped and counted, as BiomedGPT's mednli.py does.
"""

from __future__ import annotations

import json
from pathlib import Path

from scaling.data.records import BadRecord, Record, RecordCollector, require_text
from scaling.data.sources.common import as_row, decode_line, find_split_file, iter_lines

NAME = "mednli"
TASK = "nli"
SPLITS = ("train", "validation", "test")
SPLIT_FILES = {"train": ["mli_train_v1.jsonl", "train.jsonl"], "validation": ["mli_dev_v1.jsonl", "dev.jsonl"],
               "test": ["mli_test_v1.jsonl", "test.jsonl"]}
ANSWERS = {"entailment": "yes", "contradiction": "no", "neutral": "maybe"}


def load(path: Path, split: str, out: RecordCollector) -> None:
    """Reads one split; `path` is the folder with the jsonl files, or one jsonl file."""
    file = path if path.is_file() else find_split_file(path, split, SPLIT_FILES, NAME)
    for index, raw in iter_lines(file):
        with out.reading(file, index):
            row = parse_json_line(decode_line(raw))
            if row.get("gold_label") == "-":
                out.skip("no gold label ('-')")
                continue
            out.add(make_record(row, index, file))


def parse_json_line(line: str) -> dict:
    try:
        return as_row(json.loads(line))
    except json.JSONDecodeError as error:
        raise BadRecord("invalid JSON", "<line>", "write one JSON object per line", detail=error.msg) from None


def make_record(row: dict, index: int, file: Path) -> Record:
    label = require_text(row, "gold_label", "label the pair entailment, contradiction or neutral")
    if label not in ANSWERS:
        raise BadRecord("unknown label", "gold_label", f"use one of {', '.join(ANSWERS)}", detail=f"got {label!r}")
    return Record(
        id=str(row.get("pairID", f"{file.stem}-{index}")),
        task=TASK,
        image=None,
        text={"sentence1": require_text(row, "sentence1", "write the premise"),
              "sentence2": require_text(row, "sentence2", "write the hypothesis")},
        target=ANSWERS[label],
        attributes={"category": label},
        source=str(file),
        index=index,
    )
