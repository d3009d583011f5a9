"""PathVQA: `qas/{train,val,test}_vqa.pkl` (release pickles) or one JSON per split, images at `images/{split}/`.

The pickles are lists of dicts (`img_id, question_id, sent, label` with label = {answer: score}); they are read
with an unpickler that refuses every global except plain builtin containers, so a crafted file cannot run code.
The JSON export is a list of `{"image", "question", "answer"}` per split. Yes/no answers are CLOSED, others OPEN;
the category is the release's answer_type ('yes/no' or 'other'). Candidates = the answers of `candidate_splits`; by
default train and validation, as BiomedGPT's PathVQA trainval ans2label.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

from scaling.data.records import BadRecord, DataError, ImageRef, Record, RecordCollector, require_text
from scaling.data.sources.common import (
    as_row,
    candidates_origin,
    chosen_candidate_splits,
    find_split_file,
    image_path,
    read_json,
)
from scaling.data.sources.vqa_rad import answer_set

NAME = "pathvqa"
TASK = "vqa"
SPLITS = ("train", "validation", "test")
NATIVE_SPLIT = {"train": "train", "validation": "val", "test": "test"}
SPLIT_FILES = {split: [f"qas/{native}_vqa.pkl", f"qas/{native}.json", f"{native}.json", f"{native}_vqa.json"]
               for split, native in NATIVE_SPLIT.items()}
CANDIDATE_SPLITS = ("train", "validation")
_SAFE_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "str", "bytes", "int", "float", "bool"}


class _ContainersOnlyUnpickler(pickle.Unpickler):
    """Allows builtin containers and scalars only; any other global (os.system, numpy, ...) is refused."""

    def find_class(self, module: str, name: str):
        if module == "builtins" and name in _SAFE_BUILTINS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def safe_load_pickle(file: Path):
    """A pickle of plain lists/dicts/strings/numbers, with a DataError for anything else."""
    try:
        return _ContainersOnlyUnpickler(io.BytesIO(file.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise DataError(f"{file}: refused or unreadable pickle ({error}). Fix: PathVQA pickles must hold only "
                        "lists/dicts of strings and numbers; re-export it as JSON") from None


def read_rows(file: Path) -> list:
    rows = safe_load_pickle(file) if file.suffix == ".pkl" else read_json(file)
    if not isinstance(rows, list):
        raise DataError(f"{file}: expected a list of question records, got {type(rows).__name__}")
    return rows


def load(path: Path, split: str, out: RecordCollector, candidate_splits: list[str] | None = None) -> None:
    """Reads one split; `path` is the PathVQA folder holding qas/ and images/."""
    file = find_split_file(path, split, SPLIT_FILES, NAME)
    splits = chosen_candidate_splits(candidate_splits, CANDIDATE_SPLITS, SPLITS, NAME)
    candidates = answer_set([{"answer": a} for rows in split_rows(path, splits) for a in map(safe_answer, rows) if a])
    image_root = path / "images" / NATIVE_SPLIT[split]
    for index, row in enumerate(read_rows(file)):
        with out.reading(file, index):
            out.add(make_record(as_row(row), index, file, image_root, candidates, candidates_origin(splits)))


def make_record(row: dict, index: int, file: Path, image_root: Path, candidates: list[str], origin: str) -> Record:
    field = "img_id" if "img_id" in row else "image"
    image_id = require_text(row, field, "name the image of every question")
    answer = first_answer(row)
    return Record(
        id=str(row.get("question_id", f"{file.stem}-{index}")),
        task=TASK,
        image=ImageRef(image_path(image_root, image_id if Path(image_id).suffix else f"{image_id}.jpg", field)),
        text={"question": require_text(row, "sent" if "sent" in row else "question", "write the question")},
        target=answer,
        candidates=candidates,
        answer_type="CLOSED" if answer.lower() in ("yes", "no") else "OPEN",
        attributes={"category": row.get("answer_type") or ("yes/no" if answer.lower() in ("yes", "no") else "other"),
                    "question_type": row.get("question_type"), "candidates_from": origin},
        source=str(file),
        index=index,
    )


def first_answer(row: dict) -> str:
    """The answer: the first key of a pickle's label dict (as BiomedGPT's pathvqa.py), or the JSON answer."""
    label = row.get("label", row.get("answer"))
    if isinstance(label, dict):
        label = next(iter(label), None)
        if label is None:
            raise BadRecord("missing answer", "label", "give every question at least one answer")
    return require_text({"answer": label}, "answer", "give every question an answer")


def safe_answer(row) -> str | None:
    try:
        return first_answer(row) if isinstance(row, dict) else None
    except BadRecord:
        return None


def split_rows(path: Path, splits: tuple[str, ...]) -> list[list]:
    """The rows of the given splits' files present, for the candidate answer set."""
    found = []
    for split in splits:
        file = next((path / n for n in SPLIT_FILES[split] if (path / n).is_file()), None)
        if file is not None:
            found.append(read_rows(file))
    return found
