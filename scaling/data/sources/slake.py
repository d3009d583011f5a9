"""SLAKE 1.0: `{train,validate,test}.json` (lists of QA) and `imgs/<img_name>`; English questions by default.

Candidates = the answers of `candidate_splits` in the chosen language; by default train and validation, as BiomedGPT
builds its trainval ans2label (test answers never join the list).
"""

from __future__ import annotations

from pathlib import Path

from scaling.data.records import ImageRef, Record, RecordCollector, normalize_answer_type, require_text
from scaling.data.sources.common import (
    as_row,
    candidates_origin,
    chosen_candidate_splits,
    find_split_file,
    image_path,
    read_json,
)
from scaling.data.sources.vqa_rad import answer_set

NAME = "slake"
TASK = "vqa"
SPLITS = ("train", "validation", "test")
SPLIT_FILES = {"train": ["train.json"], "validation": ["validate.json", "validation.json"], "test": ["test.json"]}
CANDIDATE_SPLITS = ("train", "validation")


def load(path: Path, split: str, out: RecordCollector, q_lang: str = "en",
         candidate_splits: list[str] | None = None) -> None:
    """Reads one split; `q_lang` 'en', 'zh' or 'all'. Other-language questions are counted as skipped."""
    file = find_split_file(path, split, SPLIT_FILES, NAME)
    splits = chosen_candidate_splits(candidate_splits, CANDIDATE_SPLITS, SPLITS, NAME)
    candidates = language_answer_set(path, q_lang, splits)
    for index, row in enumerate(read_json(file)):
        with out.reading(file, index):
            row = as_row(row)
            if q_lang != "all" and row.get("q_lang") != q_lang:
                out.skip(f"q_lang not {q_lang}")
                continue
            out.add(make_record(row, index, file, path / "imgs", candidates, candidates_origin(splits)))


def make_record(row: dict, index: int, file: Path, image_root: Path, candidates: list[str], origin: str) -> Record:
    return Record(
        id=str(row.get("qid", index)),
        task=TASK,
        image=ImageRef(image_path(image_root, require_text(row, "img_name", "name the image of every question"),
                                  "img_name")),
        text={"question": require_text(row, "question", "write the question"), "object": str(row.get("location") or "")},
        target=require_text(row, "answer", "give every question an answer"),
        candidates=candidates,
        answer_type=normalize_answer_type(row.get("answer_type")),
        attributes={"organ": row.get("location"), "modality": row.get("modality"),
                    "category": row.get("content_type"), "q_lang": row.get("q_lang"), "candidates_from": origin},
        source=str(file),
        index=index,
    )


def language_answer_set(root: Path, q_lang: str, splits: tuple[str, ...]) -> list[str]:
    """Answers of the given splits' files present, in the chosen language."""
    rows = []
    for split in splits:
        for name in SPLIT_FILES[split]:
            if (root / name).is_file():
                rows += [r for r in read_json(root / name)
                         if isinstance(r, dict) and (q_lang == "all" or r.get("q_lang") == q_lang)]
    return answer_set(rows)
