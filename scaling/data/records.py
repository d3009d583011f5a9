"""The uniform record every data source produces, and the bookkeeping for records that cannot be used.

A source reads its native files into `Record`s; tasks.py turns a record into a prompt and a target; images are
referenced, never decoded here, so loading a dataset costs no image decoding.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

OPEN, CLOSED = "OPEN", "CLOSED"
ANSWER_TYPES = (OPEN, CLOSED)
SPLITS = ("train", "validation", "test")

OnBadRecord = Literal["skip", "error"]


@dataclass(frozen=True)
class ImageRef:
    """An image by file path or by raw encoded bytes (a base64 TSV cell); decoded only when `load_image` asks."""

    path: Path | None = None
    data: bytes | None = None

    def __post_init__(self):
        if (self.path is None) == (self.data is None):
            raise ValueError("ImageRef needs exactly one of path or data")
        if self.path is not None and not isinstance(self.path, Path):
            object.__setattr__(self, "path", Path(self.path))

    def read_bytes(self) -> bytes:
        """The encoded file bytes (JPEG, PNG, DICOM, ...)."""
        return self.data if self.data is not None else self.path.read_bytes()

    def describe(self) -> str:
        """Where the image comes from, for error messages."""
        return str(self.path) if self.path is not None else f"<{len(self.data)} embedded bytes>"


@dataclass
class Record:
    """One example of one task, in the same shape whatever the dataset it came from."""

    id: str
    task: str
    image: ImageRef | None
    text: dict[str, str]
    """The task's text fields, e.g. {"question": ...} for vqa, {"sentence1", "sentence2"} for nli."""
    target: str | None
    """The reference answer as the dataset writes it (unformatted); None only for unlabeled data."""
    targets: list[str] = field(default_factory=list)
    """Every acceptable reference (several captions); holds `target` first."""
    candidates: list[str] | None = None
    """The closed answer set (class names, the dataset's VQA answers); None for free generation."""
    answer_type: str | None = None
    """OPEN or CLOSED for VQA, None elsewhere."""
    attributes: dict[str, Any] = field(default_factory=dict)
    """Grouping keys for reports: organ, modality, category, q_lang, ..."""
    source: str = ""
    """The file the record was read from."""
    index: int = -1
    """The record's position in that file (row, list index), for error messages."""

    def __post_init__(self):
        if self.target is not None and not self.targets:
            self.targets = [self.target]


@dataclass
class LoadResult:
    """What a source returns: the usable records and, per reason, how many it skipped."""

    records: list[Record]
    skipped: Counter = field(default_factory=Counter)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())


class DataError(ValueError):
    """A dataset cannot be read at all (missing path, wrong format); the message says how to fix it."""


class SplitNotFound(DataError):
    """The dataset has no file for the requested split."""


class BadRecord(ValueError):
    """One record is unusable; `reason` is the short key it is counted under when skipped."""

    def __init__(self, reason: str, field: str, fix: str, detail: str = ""):
        self.reason, self.field, self.fix, self.detail = reason, field, fix, detail
        super().__init__(f"{reason} (field {field!r}){': ' + detail if detail else ''}")


class RecordError(DataError):
    """A bad record met with on_bad_record='error': names the file, the record index, the field and the fix."""

    def __init__(self, file: Path | str, index: int, bad: BadRecord):
        self.file, self.index, self.bad = str(file), index, bad
        detail = f": {bad.detail}" if bad.detail else ""
        super().__init__(
            f"{file}: record {index}, field {bad.field!r}: {bad.reason}{detail}. Fix: {bad.fix}"
            " (or pass on_bad_record='skip' to skip and count such records)."
        )


class RecordCollector:
    """Collects records while a source reads a file, applying the on_bad_record policy and rejecting duplicate ids.

    Usage: `with collector.reading(file, index): collector.add(make_record(row))` — a `BadRecord` raised inside
    the block is counted under its reason (skip) or re-raised as a `RecordError` naming the file and index (error).
    """

    def __init__(self, on_bad_record: OnBadRecord = "skip", check: Callable[[Record], None] | None = None):
        if on_bad_record not in ("skip", "error"):
            raise ValueError(f"on_bad_record must be 'skip' or 'error', got {on_bad_record!r}")
        self.on_bad_record, self.check = on_bad_record, check
        self.records: list[Record] = []
        self.skipped: Counter = Counter()
        self._ids: set[str] = set()

    @contextlib.contextmanager
    def reading(self, file: Path | str, index: int) -> Iterator[None]:
        try:
            yield
        except BadRecord as bad:
            if self.on_bad_record == "error":
                raise RecordError(file, index, bad) from None
            self.skipped[bad.reason] += 1

    def add(self, record: Record) -> None:
        """Keeps the record if it passes `check` and its id is new; raises BadRecord otherwise."""
        if self.check is not None:
            self.check(record)
        if record.id in self._ids:
            raise BadRecord("duplicate id", "id", "give every record a unique id or remove the repeated row",
                            detail=f"id {record.id!r} was already read")
        self._ids.add(record.id)
        self.records.append(record)

    def skip(self, reason: str, count: int = 1) -> None:
        """Counts records dropped by design (e.g. MedNLI gold_label '-', other-language SLAKE questions)."""
        self.skipped[reason] += count

    def result(self) -> LoadResult:
        return LoadResult(self.records, self.skipped)


def require_text(row: dict, key: str, fix: str) -> str:
    """A non-empty string field of a native row, whitespace collapsed; numbers (VQA-RAD answers) become strings."""
    if key not in row or row[key] is None:
        raise BadRecord(f"missing {key}", key, fix)
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise BadRecord("wrong value type", key, f"store {key} as a string",
                        detail=f"expected a string, got {type(value).__name__}")
    text = " ".join(str(value).split())
    if not text:
        raise BadRecord(f"empty {key}", key, fix)
    return text


def normalize_answer_type(value: Any, field: str = "answer_type") -> str:
    """OPEN/CLOSED from a native value; tolerates case and stray whitespace ('CLOSED ' in VQA-RAD)."""
    text = " ".join(str(value).split()).upper() if value is not None else ""
    if text not in ANSWER_TYPES:
        raise BadRecord("unknown answer type", field, f"use one of {', '.join(ANSWER_TYPES)}",
                        detail=f"got {value!r}")
    return text


def check_path(path: Path | str, what: str, hint: str = "") -> Path:
    """The path if it exists, else a DataError naming it and what was expected there."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} not found: {path}{'. ' + hint if hint else ''}")
    return path
