"""Instruction formatting: MILE-style closed/open templates with answer options, LLaVA-style conversations.

MILE turns each VQA item into one of several instruction templates ("Question: ... Options: (a) x; (b) y ...
Answer:"); closed yes/no items get the two options yes/no, other items get the answer plus distractors drawn from
a pool of answers of the same kind (modality, plane, organ, ...), with the right answer at a uniform position.
Our wording is our own; the mechanics follow MILE ("Can LLMs' Tuning Methods Work in Medical Multimodal Domain?",
arXiv 2403.06407; TIMMY-CHAN/MILE `Instruction_dataset/RAD_instruction_data.json`, `data/vqa_dataset.py`).

    pools = CandidatePools.from_records(train_records)
    formatter = InstructionFormatter(pools, seed=0)
    instruction = formatter(record)          # .prompt, .target, .options, .answer_index
    write_instruction_file(records, formatter, "instruct/train.json")   # LLaVA-Med JSON, read by `llava_med`

Each record's template and options come from a RNG seeded by (seed, epoch, record id), so a record is formatted
the same way on every rank and in every resumed run, and differently from one epoch to the next.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from scaling.config import Config
from scaling.data.records import CLOSED, DataError, Record
from scaling.data.tasks import get_task, normalize_answer, normalize_whitespace

YES_NO = ("yes", "no")
OTHER = "other"
Style = Literal["mile", "conversation"]

# native category names (SLAKE content_type, VQA-RAD question_type, synthetic) → the pool they draw options from
CATEGORY_POOLS = {
    "modality": "modality", "plane": "plane", "organ": "organ",
    "position": "location", "pos": "location", "location": "location",
    "size": "size", "quantity": "count", "count": "count",
    "abnormal": "pathology", "abn": "pathology", "pres": "pathology", "kg": "pathology", "pathology": "pathology",
    "color": "attribute", "shape": "attribute", "attrib": "attribute", "attribute": "attribute",
}

WITH_OPTIONS = (
    "Question: {question} Options: {options} The answer is:",
    "Question: {question} Options: {options} Answer:",
    "Look at the image. {question} Choose one of {options}. Short answer:",
    "Use the image to answer the question: {question} Options: {options} Reply with one of the options.",
)
CLOSED_WITHOUT_OPTIONS = (
    "Question: {question} Judging from the image, give a short answer.",
    'Answer the following question about the image. "{question}"',
)
OPEN_WITHOUT_OPTIONS = ('Answer the following question about the image. "{question}"',)
FREE_TEXT = ("{question}", "Instruction: {question} Response:")
"""For tasks answered in free text (captions, summaries): no options to offer."""
CONVERSATION = "USER: {question} ASSISTANT:"


def pool_name(record: Record) -> str:
    """The candidate pool of a record: yes/no answers have their own; others by the record's native category."""
    if normalize_answer(record.target) in YES_NO:
        return "yes/no"
    category = str(record.attributes.get("category") or "").split(",")[0].strip().lower()
    return CATEGORY_POOLS.get(category, OTHER)


@dataclass
class CandidatePools:
    """Answers seen per pool (modality, plane, organ, location, size, count, pathology, attribute, other)."""

    pools: dict[str, list[str]]

    @classmethod
    def from_records(cls, records: Iterable[Record]) -> CandidatePools:
        found: dict[str, set[str]] = defaultdict(set)
        for record in records:
            if record.target is not None and record.task == "vqa":
                found[pool_name(record)].add(normalize_answer(record.target))
        found.pop("yes/no", None)
        return cls({name: sorted(answers) for name, answers in sorted(found.items())})

    def distractors(self, pool: str, answer: str, k: int, rng: np.random.Generator) -> list[str]:
        """k answers other than `answer`, from its own pool first, then from all other pools."""
        own = [a for a in self.pools.get(pool, []) if a != answer]
        chosen = [own[i] for i in rng.permutation(len(own))[:k]]
        if len(chosen) < k:
            rest = sorted({a for name, answers in self.pools.items() if name != pool for a in answers} - {answer})
            chosen += [rest[i] for i in rng.permutation(len(rest))[:k - len(chosen)]]
        return chosen


@dataclass(frozen=True)
class Instruction:
    """A record as an instruction: the encoder prompt, the decoder target, and the options it offers."""

    prompt: str
    target: str
    options: tuple[str, ...] = ()
    answer_index: int | None = None
    """Position of the answer among `options` (None when there are none)."""


def format_options(options: Iterable[str]) -> str:
    """'(a) x; (b) y; (c) z'."""
    return "; ".join(f"({chr(ord('a') + i)}) {option}" for i, option in enumerate(options))


class InstructionFormatter:
    """Turns records of any task into instructions; deterministic in (seed, epoch, record id)."""

    def __init__(self, pools: CandidatePools | None = None, seed: int = 0, n_options: int = 4,
                 style: Style = "mile", template_choice: Literal["random", "first"] = "random"):
        if n_options < 2:
            raise ValueError(f"n_options must be >= 2, got {n_options}")
        if style not in ("mile", "conversation"):
            raise ValueError(f"style must be 'mile' or 'conversation', got {style!r}")
        self.pools = pools or CandidatePools({})
        self.seed, self.n_options, self.style, self.template_choice = seed, n_options, style, template_choice

    def rng(self, record: Record, epoch: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, zlib.crc32(record.id.encode("utf-8"))])

    def __call__(self, record: Record, epoch: int = 0) -> Instruction:
        rng = self.rng(record, epoch)
        task = get_task(record.task)
        question = question_text(record)
        options, answer_index = self.options(record, rng)
        if self.style == "conversation":
            return Instruction(" " + conversation_prompt(record, question, options), task.target(record),
                               tuple(options), answer_index)
        template = self.template(record, bool(options), rng)
        prompt = template.format(question=question, options=format_options(options))
        if "{options}" not in template:
            options, answer_index = [], None
        return Instruction(" " + prompt, task.target(record), tuple(options), answer_index)

    def options(self, record: Record, rng: np.random.Generator) -> tuple[list[str], int | None]:
        """The answer among up to n_options choices, at a uniformly random position; none for free text."""
        answer = normalize_answer(record.target)
        pool = pool_name(record)
        if record.task != "vqa":  # class names, yes/no/maybe: the task's own candidates
            others = sorted({normalize_answer(c) for c in get_task(record.task).candidates(record) or []} - {answer})
            distractors = [others[i] for i in rng.permutation(len(others))[:self.n_options - 1]]
        elif pool == "yes/no":
            distractors = [a for a in YES_NO if a != answer]
        else:
            distractors = self.pools.distractors(pool, answer, self.n_options - 1, rng)
        if not distractors:
            return [], None
        position = int(rng.integers(len(distractors) + 1))
        return distractors[:position] + [answer] + distractors[position:], position

    def template(self, record: Record, has_options: bool, rng: np.random.Generator) -> str:
        if not has_options:
            choices = FREE_TEXT
        elif record.answer_type == CLOSED or pool_name(record) == "yes/no":
            choices = WITH_OPTIONS + CLOSED_WITHOUT_OPTIONS
        else:
            choices = WITH_OPTIONS + OPEN_WITHOUT_OPTIONS
        return choices[0] if self.template_choice == "first" else choices[int(rng.integers(len(choices)))]


def instruction_formatter(cfg: Config, option_records: Iterable[Record]) -> InstructionFormatter | None:
    """With data.instruction, the formatter training and evaluation share: templates seeded by train.seed, answer
    options drawn from `option_records` (training answers, never the evaluated ones); None without."""
    if not cfg.data.instruction:
        return None
    return InstructionFormatter(CandidatePools.from_records(option_records), seed=cfg.train.seed)


def question_text(record: Record) -> str:
    """What the instruction asks: the VQA question, or the task's own prompt for the other tasks."""
    if record.task == "vqa":
        return normalize_whitespace(record.text["question"])
    return normalize_whitespace(get_task(record.task).prompt(record))


def conversation_prompt(record: Record, question: str, options: list[str]) -> str:
    """LLaVA-style: earlier turns (record.text['context']), then 'USER: question (options) ASSISTANT:'."""
    if options:
        question = f"{question} Options: {format_options(options)}"
    context = normalize_whitespace(record.text.get("context", ""))
    turn = CONVERSATION.format(question=question)
    return f"{context} {turn}" if context else turn


# ---------------------------------------------------------------------------------------------------------------
# Instruction files on disk: LLaVA-Med JSON (id, image, conversations), read back by sources/llava_med.py


def write_instruction_file(records: Iterable[Record], formatter: InstructionFormatter, file: str | os.PathLike,
                           epoch: int = 0) -> dict:
    """Writes image records as a LLaVA-Med JSON list with the instruction as the human turn, images copied into
    `images/` next to the file; returns the `llava_med` loader options that read it back."""
    file = Path(file)
    images_dir = file.parent / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rows, written = [], {}
    for record in records:
        if record.image is None:
            raise DataError(f"{record.source}: record {record.index} ({record.id}, task {record.task}) has no "
                            "image; LLaVA-Med instruction files hold image questions. Fix: convert image sources "
                            "only, and train text tasks with data.instruction=true instead")
        instruction = formatter(record, epoch)
        row = {"id": record.id, "conversations": [
            {"from": "human", "value": "<image>\n" + instruction.prompt.strip()},
            {"from": "gpt", "value": instruction.target.strip()}]}
        row["image"] = _copy_image(record, images_dir, written)
        row.update({"task": record.task, "answer_type": record.answer_type, "options": list(instruction.options),
                    "category": record.attributes.get("category")})
        rows.append(row)
    temporary = file.with_name(f".{file.name}.tmp")
    temporary.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, file)
    return {"images_dir": str(images_dir)}


def _copy_image(record: Record, images_dir: Path, written: dict) -> str:
    """The image's name under images_dir, copying (or, for embedded bytes, writing) it once."""
    key = record.image.path if record.image.path is not None else hashlib.sha256(record.image.data).hexdigest()
    if key not in written:
        suffix = record.image.path.suffix if record.image.path is not None else ".png"
        name = f"{len(written):06d}{suffix}"
        if record.image.path is not None:
            shutil.copyfile(record.image.path, images_dir / name)
        else:
            (images_dir / name).write_bytes(record.image.data)
        written[key] = name
    return written[key]
