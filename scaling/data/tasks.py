"""The six BiomedGPT task types: prompt, target text, candidate answers, metrics and decoding defaults.

Prompts are BiomedGPT's (OFA's) exact strings; every prompt and target starts with a space because the model's
byte-level BPE was trained on text where words follow a space. The encoder sees `<s> prompt </s>` after the image
patches when there is an image.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from scaling.config import Decoding
from scaling.data.records import BadRecord, Record

YES_NO_MAYBE = ["yes", "no", "maybe"]
_PUNCTUATION_EXCEPT_DOT = re.compile("[" + re.escape(string.punctuation.replace(".", "")) + "]")
_DOT_OUTSIDE_NUMBER = re.compile(r"(?<!\d)\.|\.(?!\d)")


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def strip_punctuation(text: str) -> str:
    """Punctuation removed, except a dot inside a number: "x-ray, 1.5 cm." becomes "xray 1.5 cm"."""
    return _DOT_OUTSIDE_NUMBER.sub("", _PUNCTUATION_EXCEPT_DOT.sub("", text))


@dataclass(frozen=True)
class Task:
    """A task type: how a record becomes (prompt, target) and how its predictions are judged."""

    name: str = ""
    needs_image: bool = False
    text_fields: tuple[str, ...] = ()
    """Text fields a record must carry (non-empty)."""
    metrics: tuple[str, ...] = ()
    decoding: Decoding = Decoding()
    """Evaluation decoding under eval.mode=auto, from BiomedGPT's evaluation scripts (max_new_tokens = fairseq's
    max_len_b: answer tokens before EOS, as both searches count them)."""

    def prompt(self, record: Record) -> str:
        raise NotImplementedError

    def target(self, record: Record) -> str:
        """The decoder target: the reference with a leading space."""
        return " " + normalize_whitespace(record.target)

    def candidates(self, record: Record) -> list[str] | None:
        """The answers generation may be constrained to, or None for free text."""
        return record.candidates

    def check(self, record: Record) -> None:
        """Raises BadRecord when the record lacks what this task needs."""
        if self.needs_image and record.image is None:
            raise BadRecord("missing image", "image", f"{self.name} records need an image")
        for key in self.text_fields:
            if not record.text.get(key, "").strip():
                raise BadRecord(f"empty {key}", key, f"give every {self.name} record a non-empty {key}")
        if record.target is not None and not record.target.strip():
            raise BadRecord("missing answer", "target", f"give every {self.name} record a non-empty answer")


@dataclass(frozen=True)
class VQATask(Task):
    """Visual question answering: the instruction is the question itself (OFA vqa_gen_dataset)."""

    name: str = "vqa"
    needs_image: bool = True
    text_fields: tuple[str, ...] = ("question",)
    metrics: tuple[str, ...] = ("accuracy",)
    # evaluate_vqa_rad_beam_scale.sh: beam 1 over the candidate trie; max_tgt_length 40
    decoding: Decoding = Decoding(mode="constrained", beam=1, max_new_tokens=40)
    add_object: bool = False
    """Append ' object: {objects}' (image_organ for VQA-RAD, location for SLAKE), as with --add-object."""

    def prompt(self, record: Record) -> str:
        question = normalize_whitespace(record.text["question"].lower().replace("-", " ").replace("/", " "))
        if not question.endswith("?"):
            question += "?"
        prompt = f" {question}"
        if self.add_object and record.text.get("object"):
            prompt += f" object: {normalize_whitespace(record.text['object'].lower())}"
        return prompt

    def target(self, record: Record) -> str:
        # answers are matched case-insensitively ("Yes" and "yes" are one VQA-RAD answer)
        return " " + normalize_answer(record.target)


@dataclass(frozen=True)
class CaptionTask(Task):
    """Image captioning / report generation (OFA caption_dataset)."""

    name: str = "caption"
    needs_image: bool = True
    metrics: tuple[str, ...] = ("rouge_l", "cider", "bleu_4")
    decoding: Decoding = Decoding(beam=10, max_new_tokens=32, no_repeat_ngram_size=3)

    def prompt(self, record: Record) -> str:
        return " what does the image describe?"

    def target(self, record: Record) -> str:
        # punctuation stripped as in caption_dataset, but decimals kept ("1.5 cm" is not "15 cm"); lowercased
        return " " + normalize_whitespace(strip_punctuation(record.target).lower())


@dataclass(frozen=True)
class ClassifyTask(Task):
    """Image classification: generate the class name, evaluated by scoring every class name."""

    name: str = "classify"
    needs_image: bool = True
    metrics: tuple[str, ...] = ("accuracy",)
    decoding: Decoding = Decoding(mode="score", beam=1, max_new_tokens=64)

    def prompt(self, record: Record) -> str:
        return " what does the image describe?"


@dataclass(frozen=True)
class NLITask(Task):
    """Natural language inference (MedNLI) as yes/no/maybe (OFA mnli_dataset)."""

    name: str = "nli"
    text_fields: tuple[str, ...] = ("sentence1", "sentence2")
    metrics: tuple[str, ...] = ("accuracy",)
    decoding: Decoding = Decoding(mode="score", beam=1, max_new_tokens=4)

    def prompt(self, record: Record) -> str:
        s1, s2 = (normalize_whitespace(record.text[k].lower()) for k in ("sentence1", "sentence2"))
        return f' can text1 " {s1} " imply text2 " {s2} "?'

    def candidates(self, record: Record) -> list[str]:
        return list(YES_NO_MAYBE)


@dataclass(frozen=True)
class SummarizeTask(Task):
    """Text summarization (MeQSum, HealthcareMagic; OFA summary_dataset)."""

    name: str = "summarize"
    text_fields: tuple[str, ...] = ("source",)
    metrics: tuple[str, ...] = ("rouge_1", "rouge_2", "rouge_l")
    decoding: Decoding = Decoding(beam=5, max_new_tokens=128, length_penalty=0.7, no_repeat_ngram_size=3)

    def prompt(self, record: Record) -> str:
        return f' what is the summary of article " {normalize_whitespace(record.text["source"])} "?'


@dataclass(frozen=True)
class QATask(Task):
    """Text question answering over a passage with a yes/no/maybe decision (PubMedQA).

    BiomedGPT publishes no PubMedQA prompt; this one follows its pretraining prompt ' what is the answer to
    question " {} "...' and lowercases like the NLI prompt. The question comes before the context so that
    truncation to max_src_len cuts the end of the context, never the question.
    """

    name: str = "qa"
    text_fields: tuple[str, ...] = ("question", "context")
    metrics: tuple[str, ...] = ("accuracy", "macro_f1")
    decoding: Decoding = Decoding(mode="score", beam=1, max_new_tokens=4)

    def prompt(self, record: Record) -> str:
        question, context = (normalize_whitespace(record.text[k].lower()) for k in ("question", "context"))
        return f' what is the answer to question " {question} " given context " {context} "?'

    def candidates(self, record: Record) -> list[str]:
        return list(YES_NO_MAYBE)


def normalize_answer(answer: str) -> str:
    """Lowercase and collapse whitespace: the form VQA answers are trained on, compared in, and listed in."""
    return normalize_whitespace(str(answer).lower())


TASKS: dict[str, Task] = {t.name: t for t in (VQATask(), CaptionTask(), ClassifyTask(), NLITask(),
                                               SummarizeTask(), QATask())}


def get_task(name: str, **options) -> Task:
    """The registered task, optionally with options changed (e.g. get_task('vqa', add_object=True))."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    task = TASKS[name]
    return type(task)(**{**task.__dict__, **options}) if options else task
