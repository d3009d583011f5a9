"""BiomedGPT's fine-tuning TSVs (no header, tab-separated, images as base64 of the original file bytes): read and write.

Columns per task (BiomedGPT datasets.md / file_dataset.py):
  vqa        question_id, image_id, question, answers ("conf|!+answer", &&-joined), object, image
  caption    uniq_id, image_id, caption (&&-joined references), objects (empty), image
  classify   image, label_index, label_name                              (MedMNIST)
  nli        sentence1, sentence2, label (0 maybe, 1 yes, 2 no), genre   (MedNLI)
  summarize  source, target
  qa         question_id, question, context, answer                      (this toolkit's layout; BiomedGPT has none)
Formats without an id column get positional ids `<file stem>-<row>`. Text cells cannot hold tabs or newlines, so
whitespace is collapsed on write; everything else (ids, text, answers, confidences, image bytes) round-trips exactly.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from scaling.data.records import BadRecord, DataError, ImageRef, Record, RecordCollector, require_text
from scaling.data.sources.common import decode_line, find_split_file, iter_lines, read_json
from scaling.data.sources.pathvqa import safe_load_pickle
from scaling.data.tasks import normalize_answer, normalize_whitespace

NAME = "biomedgpt_tsv"
TASK = None  # given by the `task` option
SPLITS = ("train", "validation", "test")
SPLIT_FILES = {"train": ["train.tsv"], "validation": ["val.tsv", "valid.tsv", "validation.tsv", "dev.tsv"],
               "test": ["test.tsv"]}
COLUMNS = {
    "vqa": ("question_id", "image_id", "question", "answers", "object", "image"),
    "caption": ("uniq_id", "image_id", "caption", "objects", "image"),
    "classify": ("image", "label_index", "label_name"),
    "nli": ("sentence1", "sentence2", "label", "genre"),
    "summarize": ("source", "target"),
    "qa": ("question_id", "question", "context", "answer"),
}
NLI_LABELS = {"0": "maybe", "1": "yes", "2": "no"}
ANSWER_SEP, CONF_SEP = "&&", "|!+"


def load(path: Path, split: str, out: RecordCollector, task: str | None = None, ans2label: str | None = None) -> None:
    """Reads one split (`{split}.tsv` in the folder `path`, or the file `path`) of the given task's layout."""
    if task not in COLUMNS:
        raise DataError(f"biomedgpt_tsv needs task= one of {', '.join(COLUMNS)} (got {task!r})")
    file = path if path.is_file() else find_split_file(path, split, SPLIT_FILES, NAME)
    for index, raw in iter_lines(file):
        with out.reading(file, index):
            cells = decode_line(raw).split("\t")
            if len(cells) != len(COLUMNS[task]):
                raise BadRecord("wrong column count", "<line>", f"write the {task} columns {', '.join(COLUMNS[task])}",
                                detail=f"{len(cells)} columns instead of {len(COLUMNS[task])}")
            out.add(PARSERS[task](dict(zip(COLUMNS[task], cells, strict=True)), f"{file.stem}-{index}", file, index))
    add_candidates(out.records, task, ans2label, path)


def decode_image(cell: str) -> ImageRef:
    """BiomedGPT decodes with urlsafe_b64decode, which also accepts standard base64 ('+' and '/')."""
    try:
        data = base64.urlsafe_b64decode(cell.strip())
    except (binascii.Error, ValueError) as error:
        raise BadRecord("undecodable image base64", "image", "store the image as base64 of the file bytes",
                        detail=str(error)) from None
    if not data:
        raise BadRecord("missing image", "image", "store the image as base64 of the file bytes")
    return ImageRef(data=data)


def parse_answers(cell: str) -> list[tuple[str, float]]:
    """'1.0|!+yes&&0.5|!+no' → [('yes', 1.0), ('no', 0.5)], best first; a bare answer counts as confidence 1."""
    answers = []
    for item in cell.split(ANSWER_SEP):
        conf, _, answer = item.rpartition(CONF_SEP) if CONF_SEP in item else ("1.0", "", item)
        try:
            answers.append((normalize_whitespace(answer), float(conf)))
        except ValueError:
            raise BadRecord("wrong value type", "answers", "write answers as confidence|!+answer",
                            detail=f"confidence {conf!r}") from None
    answers = [(a, c) for a, c in answers if a]
    if not answers:
        raise BadRecord("missing answer", "answers", "give every question an answer")
    return sorted(answers, key=lambda pair: -pair[1])


def parse_vqa(row: dict, _: str, file: Path, index: int) -> Record:
    answers = parse_answers(row["answers"])
    return Record(id=require_text(row, "question_id", "give every question an id"), task="vqa",
                  image=decode_image(row["image"]),
                  text={"question": require_text(row, "question", "write the question"), "object": row["object"]},
                  target=answers[0][0], targets=[a for a, _ in answers],
                  attributes={"image_id": row["image_id"], "answer_confidences": dict(answers)},
                  source=str(file), index=index)


def parse_caption(row: dict, _: str, file: Path, index: int) -> Record:
    references = [normalize_whitespace(c) for c in row["caption"].split(ANSWER_SEP) if c.strip()]
    if not references:
        raise BadRecord("missing answer", "caption", "write the caption")
    return Record(id=require_text(row, "uniq_id", "give every caption an id"), task="caption",
                  image=decode_image(row["image"]), text={}, target=references[0], targets=references,
                  attributes={"image_id": row["image_id"]}, source=str(file), index=index)


def parse_classify(row: dict, row_id: str, file: Path, index: int) -> Record:
    if not row["label_index"].strip().isdigit():
        raise BadRecord("wrong value type", "label_index", "write the class index as an integer",
                        detail=f"got {row['label_index']!r}")
    return Record(id=row_id, task="classify", image=decode_image(row["image"]), text={},
                  target=require_text(row, "label_name", "write the class name"),
                  attributes={"label": int(row["label_index"])}, source=str(file), index=index)


def parse_nli(row: dict, row_id: str, file: Path, index: int) -> Record:
    label = row["label"].strip()
    if label not in NLI_LABELS:
        raise BadRecord("unknown label", "label", "use 0 (neutral), 1 (entailment) or 2 (contradiction)",
                        detail=f"got {label!r}")
    return Record(id=row_id, task="nli", image=None,
                  text={"sentence1": require_text(row, "sentence1", "write the premise"),
                        "sentence2": require_text(row, "sentence2", "write the hypothesis")},
                  target=NLI_LABELS[label], attributes={"genre": row["genre"]}, source=str(file), index=index)


def parse_summarize(row: dict, row_id: str, file: Path, index: int) -> Record:
    return Record(id=row_id, task="summarize", image=None,
                  text={"source": require_text(row, "source", "write the article")},
                  target=require_text(row, "target", "write the summary"), source=str(file), index=index)


def parse_qa(row: dict, _: str, file: Path, index: int) -> Record:
    return Record(id=require_text(row, "question_id", "give every question an id"), task="qa", image=None,
                  text={"question": require_text(row, "question", "write the question"),
                        "context": require_text(row, "context", "write the context")},
                  target=require_text(row, "answer", "give the answer"), candidates=["yes", "no", "maybe"],
                  source=str(file), index=index)


PARSERS = {"vqa": parse_vqa, "caption": parse_caption, "classify": parse_classify, "nli": parse_nli,
           "summarize": parse_summarize, "qa": parse_qa}


def add_candidates(records: list[Record], task: str, ans2label: str | None, path: Path) -> None:
    """VQA: the answers of ans2label (BiomedGPT's answer→index pkl/json), else of the folder's train and validation
    TSVs (BiomedGPT's trainval answers), else of the file read; classify: the class names in the file."""
    if task == "vqa":
        candidates, origin = vqa_candidates(records, ans2label, path)
    elif task == "classify":
        candidates = [name for _, name in sorted({(r.attributes["label"], r.target) for r in records})]
        origin = "class names found in the file read"
    else:
        return
    for record in records:
        record.candidates = candidates
        record.attributes["candidates_from"] = origin


def vqa_candidates(records: list[Record], ans2label: str | None, path: Path) -> tuple[list[str], str]:
    """(normalised candidate answers, where they come from)."""
    if ans2label:
        table = safe_load_pickle(Path(ans2label)) if ans2label.endswith(".pkl") else read_json(Path(ans2label))
        return sorted({normalize_answer(a) for a in table}), f"answers of {Path(ans2label).name}"
    files = [f for split in ("train", "validation") for f in [path / n for n in SPLIT_FILES[split]] if f.is_file()]
    if path.is_dir() and files:
        answers = {normalize_answer(a) for f in files for a in tsv_answers(f)}
        return sorted(answers), f"answers of {'+'.join(f.name for f in files)}"
    return (sorted({normalize_answer(a) for r in records for a in r.targets}),
            "answers of the file read itself (its own references are among them; pass ans2label)")


def tsv_answers(file: Path) -> list[str]:
    """The answers column of a VQA TSV, without decoding its images; unreadable rows give none."""
    answers = []
    for _, raw in iter_lines(file):
        cells = raw.split(b"\t")
        if len(cells) == len(COLUMNS["vqa"]):
            try:
                answers += [a for a, _ in parse_answers(decode_line(cells[3]))]
            except BadRecord:
                continue
    return answers


def write(records: list[Record], file: Path) -> int:
    """Writes records of one task as a BiomedGPT TSV; returns the number of rows."""
    tasks = {r.task for r in records}
    if len(tasks) > 1:
        raise DataError(f"one TSV holds one task; got {', '.join(sorted(tasks))}. Fix: convert each task apart")
    if not records:
        file.write_text("", encoding="utf-8")
        return 0
    task = tasks.pop()
    file.parent.mkdir(parents=True, exist_ok=True)
    with file.open("w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write("\t".join(clean(cell) for cell in ROW_WRITERS[task](record)) + "\n")
    return len(records)


def clean(cell: str) -> str:
    return normalize_whitespace(str(cell))


def encode_image(record: Record) -> str:
    if record.image is None:
        raise DataError(f"{record.source}: record {record.index} ({record.id}) has no image to write")
    return base64.b64encode(record.image.read_bytes()).decode("ascii")


def vqa_row(r: Record) -> list[str]:
    confidences = r.attributes.get("answer_confidences", {})
    answers = ANSWER_SEP.join(f"{confidences.get(a, 1.0)}{CONF_SEP}{a}" for a in r.targets)
    return [r.id, r.attributes.get("image_id", r.id), r.text["question"], answers, r.text.get("object", ""),
            encode_image(r)]


def caption_row(r: Record) -> list[str]:
    return [r.id, r.attributes.get("image_id", r.id), ANSWER_SEP.join(r.targets), "", encode_image(r)]


def classify_row(r: Record) -> list[str]:
    label = r.candidates.index(r.target) if r.candidates and r.target in r.candidates else r.attributes["label"]
    return [encode_image(r), str(label), r.target]


def nli_row(r: Record) -> list[str]:
    label = {answer: code for code, answer in NLI_LABELS.items()}[r.target]
    return [r.text["sentence1"], r.text["sentence2"], label, r.attributes.get("genre", "")]


ROW_WRITERS = {
    "vqa": vqa_row,
    "caption": caption_row,
    "classify": classify_row,
    "nli": nli_row,
    "summarize": lambda r: [r.text["source"], r.target],
    "qa": lambda r: [r.id, r.text["question"], r.text["context"], r.target],
}
