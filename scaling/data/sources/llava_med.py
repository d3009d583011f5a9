"""LLaVA-Med instruction data: a JSON list of {id, image, conversations: [{from: human|gpt, value}], domain?}.

Each human → gpt exchange becomes one vqa record: the human turn (without the `<image>` token) is the question,
the gpt turn the answer, and the earlier turns are kept as `text["context"]` ("USER: ...\\nASSISTANT: ...").
A file is the train split; a folder may hold `{train,validation,test}.json`.
"""

from __future__ import annotations

from pathlib import Path

from scaling.data.records import (
    BadRecord,
    ImageRef,
    Record,
    RecordCollector,
    SplitNotFound,
    normalize_answer_type,
    require_text,
)
from scaling.data.sources.common import as_row, find_split_file, image_path, read_json

NAME = "llava_med"
TASK = "vqa"
SPLITS = ("train", "validation", "test")
SPLIT_FILES = {"train": ["train.json"], "validation": ["validation.json", "val.json"], "test": ["test.json"]}
IMAGE_TOKEN = "<image>"
ROLES = {"human": "USER", "gpt": "ASSISTANT"}


def load(path: Path, split: str, out: RecordCollector, images_dir: str | None = None) -> None:
    """Reads one split; `images_dir` defaults to images/ next to the JSON."""
    if path.is_file() and split != "train":
        raise SplitNotFound(f"{path}: a single LLaVA-Med file is the train split")
    file = path if path.is_file() else find_split_file(path, split, SPLIT_FILES, NAME)
    image_root = Path(images_dir) if images_dir else file.parent / "images"
    rows = read_json(file)
    for index, row in enumerate(rows if isinstance(rows, list) else [rows]):
        records = []  # stays empty when the conversation itself is bad (and skipped)
        with out.reading(file, index):
            records = conversation_records(as_row(row), index, file, image_root)
        for record in records:
            with out.reading(file, index):
                out.add(record)


def conversation_records(row: dict, index: int, file: Path, image_root: Path) -> list[Record]:
    """One record per human→gpt exchange, earlier exchanges as context."""
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRecord("missing conversations", "conversations", "give a list of {from, value} turns")
    turns = [(as_row(t, "turn").get("from"), require_text(as_row(t, "turn"), "value", "write every turn"))
             for t in turns]
    has_image = isinstance(row.get("image"), str) and row["image"]
    image = ImageRef(image_path(image_root, row["image"], "image")) if has_image else None
    base_id = str(row.get("id", f"{file.stem}-{index}"))
    records, context = [], []
    for (role, question), (next_role, answer) in zip(turns, turns[1:], strict=False):
        if role == "human" and next_role == "gpt":
            records.append(Record(
                id=f"{base_id}-{len(records)}", task=TASK, image=image,
                text={"question": strip_image_token(question), "context": "\n".join(context)},
                target=answer, answer_type=answer_type(row),
                attributes={"turn": len(records), "modality": modality(row.get("domain")),
                            "category": row.get("category"), "source_task": row.get("task")},
                source=str(file), index=index))
        context.append(f"{ROLES.get(role, role)}: {strip_image_token(question)}")
    if not records:
        raise BadRecord("missing answer", "conversations", "alternate human and gpt turns")
    return records


def answer_type(row: dict) -> str | None:
    """OPEN/CLOSED when the file says (instruction files written by scaling.data.instruct do), else None."""
    return normalize_answer_type(row["answer_type"]) if row.get("answer_type") is not None else None


def strip_image_token(text: str) -> str:
    return " ".join(text.replace(IMAGE_TOKEN, " ").split())


def modality(domain) -> str | None:
    """LLaVA-Med's domain flags ({"chest_xray": true, ...}) → the first true one."""
    if isinstance(domain, dict):
        return next((name for name, flag in domain.items() if flag), None)
    return None
