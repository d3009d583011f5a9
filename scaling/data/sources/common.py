"""Helpers every source shares: strict file reading, split-file lookup, record checks."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, track

from scaling.data.images import DEFAULT_MAX_PIXELS, ImageError, ImageTooLarge, load_image
from scaling.data.records import BadRecord, DataError, ImageRef, Record, RecordCollector, SplitNotFound
from scaling.data.tasks import TASKS
from scaling.logging import console, is_main_process

PROGRESS_BYTES = 64 * 2**20
PROGRESS_ITEMS = 20_000
UTF8_FIX = "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"


def read_json(file: Path) -> Any:
    """A whole JSON file, with errors that name the file and the position."""
    data = file.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{file}: not valid UTF-8 at byte {error.start}. Fix: {UTF8_FIX}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{file}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}. "
                        "Fix: repair or re-export the file") from None


def decode_line(raw: bytes) -> str:
    """One line of a text file; bad UTF-8 is a BadRecord so that only this line is lost."""
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as error:
        raise BadRecord("undecodable text", "<line>", UTF8_FIX, detail=f"invalid UTF-8 at byte {error.start}") from None


def iter_lines(file: Path) -> Iterator[tuple[int, bytes]]:
    """(line index, raw bytes) for the non-blank lines of a file, decoded later per line; large files show a
    progress bar in bytes."""
    with file.open("rb") as handle, _byte_progress(file) as advance:
        for index, raw in enumerate(handle):
            advance(len(raw))
            if raw.strip():
                yield index, raw


@contextlib.contextmanager
def _byte_progress(file: Path) -> Iterator[Callable[[int], None]]:
    """A transient rich progress bar over the file's bytes on the main process, for files over PROGRESS_BYTES."""
    size = file.stat().st_size
    if size < PROGRESS_BYTES or not is_main_process():
        yield lambda n: None
        return
    with Progress(TextColumn(f"reading {file.name}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("read", total=size)
        yield lambda n: progress.advance(task, n)


def track_items(items: Iterable, total: int, description: str) -> Iterable:
    """Items with a rich progress bar on the main process when there are more than PROGRESS_ITEMS of them."""
    if total < PROGRESS_ITEMS or not is_main_process():
        return items
    return track(items, total=total, description=description, console=console, transient=True)


def as_row(value: Any, what: str = "record") -> dict:
    """A native record that must be a JSON object."""
    if not isinstance(value, dict):
        raise BadRecord("wrong value type", "<record>", f"each {what} must be a JSON object",
                        detail=f"got {type(value).__name__}")
    return value


def find_split_file(root: Path, split: str, names: dict[str, list[str]], source: str) -> Path:
    """The first existing file among the native names for a split (e.g. validation → validate.json, val.json)."""
    if split not in names:
        raise SplitNotFound(f"source {source!r} has no split {split!r}; choose one of {', '.join(names)}")
    for name in names[split]:
        if (root / name).is_file():
            return root / name
    raise SplitNotFound(f"{root}: no {split} file for source {source!r} (looked for {', '.join(names[split])})")


def image_path(root: Path, name: str, field: str) -> Path:
    """`root / name`, refused unless it stays inside `root` once `..` and absolute parts are applied (symlinks under
    the root are the dataset owner's choice and are followed)."""
    path = Path(os.path.normpath(root / name))
    if not path.is_relative_to(os.path.normpath(root)):
        raise BadRecord("image path outside the dataset folder", field,
                        f"image paths must stay inside {root}; if this file is trusted and its images live elsewhere, "
                        "set the source's images_dir option to a folder that holds them", detail=repr(name))
    return path


def make_collector(on_bad_record: str = "skip", verify_images: bool = False,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> RecordCollector:
    """A collector that checks each record against its task and, optionally, decodes each image file once."""
    verdicts: dict[Path, BadRecord | None] = {}  # VQA images are shared by many questions

    def check(record: Record) -> None:
        TASKS[record.task].check(record)
        if record.image is None:
            return
        path = record.image.path
        if path is not None and not path.is_file():
            raise BadRecord("missing image file", "image", "put the image there or fix the image name/folder",
                            detail=str(path))
        if verify_images:
            verdict = verdicts[path] if path in verdicts else image_verdict(record.image, max_pixels)
            if path is not None:
                verdicts[path] = verdict
            if verdict is not None:
                raise verdict

    return RecordCollector(on_bad_record, check)


def image_verdict(image: ImageRef, max_pixels: int) -> BadRecord | None:
    """None if the image decodes within max_pixels, else the BadRecord saying why not."""
    try:
        load_image(image, max_pixels)
    except ImageTooLarge as error:
        return BadRecord("image over max_pixels", "image", error.fix, detail=f"{error.name}: {error.problem}")
    except ImageError as error:
        return BadRecord("unreadable image", "image", error.fix, detail=f"{error.name}: {error.problem}")
    return None


def chosen_candidate_splits(chosen: str | list[str] | None, default: tuple[str, ...], available: tuple[str, ...],
                     source: str) -> tuple[str, ...]:
    """The splits whose answers make a VQA source's candidate list: the `candidate_splits` option, else the published
    protocol's `default`; a wrong split name is a DataError naming the choices."""
    splits = default if chosen is None else tuple([chosen] if isinstance(chosen, str) else chosen)
    if not splits or any(s not in available for s in splits):
        raise DataError(f"source {source!r}: candidate_splits {list(splits)} must name one or more of "
                        f"{', '.join(available)}")
    return splits


def candidates_origin(splits: tuple[str, ...]) -> str:
    """How a report names the candidate list's origin, e.g. 'answers of the train+test splits'."""
    return f"answers of the {'+'.join(splits)} split{'s' if len(splits) > 1 else ''}"
