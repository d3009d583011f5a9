"""VQA-RAD, original release: `VQA_RAD Dataset Public.json` (one list of QA) and `images/`.

Standard split by `phrase_type`: train = freeform + para (1,797), test = test_freeform + test_para (451).
Candidates = the answers of `candidate_splits`; by default train and test, as BiomedGPT's VQA-RAD preprocessing builds
trainval_ans2label_pubmedclip.pkl ("follow pubmedclip").
"""

from __future__ import annotations

from pathlib import Path

from scaling.data.records import ImageRef, Record, RecordCollector, check_path, normalize_answer_type, require_text
from scaling.data.sources.common import as_row, candidates_origin, chosen_candidate_splits, image_path, read_json
from scaling.data.tasks import normalize_answer

NAME = "vqa_rad"
TASK = "vqa"
SPLITS = ("train", "test")
FILE_NAME = "VQA_RAD Dataset Public.json"
PHRASE_TYPES = {"train": ("freeform", "para"), "test": ("test_freeform", "test_para")}
CANDIDATE_SPLITS = ("train", "test")
# the release's question types (VQA-RAD paper, Table 2) have a few misspellings in the file
_TYPE_SPELLINGS = {"ATRIB": "ATTRIB", "PRSE": "PRES"}


def load(path: Path, split: str, out: RecordCollector, images_dir: str | None = None,
         candidate_splits: list[str] | None = None) -> None:
    """Reads one split; `path` is the release folder or the JSON file itself."""
    file = path / FILE_NAME if path.is_dir() else path
    check_path(file, "VQA-RAD json", f"expected '{FILE_NAME}' from the OSF release")
    image_root = Path(images_dir) if images_dir else file.parent / "images"
    rows = read_json(file)
    splits = chosen_candidate_splits(candidate_splits, CANDIDATE_SPLITS, SPLITS, NAME)
    phrase_types = {t for s in splits for t in PHRASE_TYPES[s]}
    candidates = answer_set([r for r in rows if isinstance(r, dict) and r.get("phrase_type") in phrase_types])
    for index, row in enumerate(rows):
        with out.reading(file, index):
            row = as_row(row)
            if row.get("phrase_type") in PHRASE_TYPES[split]:
                out.add(make_record(row, index, file, image_root, candidates, candidates_origin(splits)))


def make_record(row: dict, index: int, file: Path, image_root: Path, candidates: list[str], origin: str) -> Record:
    types = question_types(row.get("question_type"))
    return Record(
        id=str(row.get("qid", index)),
        task=TASK,
        image=ImageRef(image_path(image_root, require_text(row, "image_name", "name the image file of every question"),
                                  "image_name")),
        text={"question": require_text(row, "question", "write the question"), "object": str(row.get("image_organ") or "")},
        target=require_text(row, "answer", "give every question an answer"),
        candidates=candidates,
        answer_type=normalize_answer_type(row.get("answer_type")),
        attributes={"organ": row.get("image_organ"), "category": ", ".join(types) or "OTHER",
                    "question_types": types, "phrase_type": row.get("phrase_type"), "candidates_from": origin},
        source=str(file),
        index=index,
    )


def question_types(value) -> list[str]:
    """'PRES, POS' → ['PRES', 'POS']; the record's category lists them all, and reports count it under each."""
    names = [_TYPE_SPELLINGS.get(t.strip().upper(), t.strip().upper()) for t in str(value or "").split(",")]
    return [name for name in names if name]


def answer_set(rows: list) -> list[str]:
    """Sorted normalised answers of all well-formed rows."""
    answers = {normalize_answer(row["answer"]) for row in rows
               if isinstance(row, dict) and isinstance(row.get("answer"), str | int | float)}
    return sorted(answer for answer in answers if answer)
