"""An on-disk cache of loaded records as HF `datasets` Arrow tables, keyed by a fingerprint of the source files.

Reading a large native release (base64 TSVs, pickles, spreadsheets) once and memory-mapping the Arrow copy after
makes every later run, and every rank of a distributed run, start quickly. The fingerprint covers the source name,
split, options and each file's relative path, size and modification time, so editing a file invalidates the entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from scaling.data.records import ImageRef, LoadResult, Record


def fingerprint(name: str, path: Path, split: str, options: dict, cache_dir: Path) -> str:
    """A digest of what determines the records: source, split, options and the files' names, sizes and times
    (files inside cache_dir excluded, should the cache live in the dataset folder)."""
    digest = hashlib.sha256(json.dumps([name, split, options], sort_keys=True, default=str).encode())
    cache_dir = cache_dir.resolve()
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and not p.resolve().is_relative_to(cache_dir))
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if file != path else file.name}|{stat.st_size}|{stat.st_mtime_ns}"
                      .encode())
    return digest.hexdigest()[:24]


def cached_load(load: Callable[[], LoadResult], cache_dir: str | Path, key: str) -> LoadResult:
    """The cached result under `key`, or `load()`'s result, stored before it is returned."""
    entry = Path(cache_dir) / key
    if (entry / "meta.json").is_file():
        return read_entry(entry)
    result = load()
    write_entry(result, entry)
    return result


def write_entry(result: LoadResult, entry: Path) -> None:
    """Records → Arrow table (+ meta.json with skip counts and the distinct candidate lists), written atomically."""
    import datasets

    candidate_lists: dict[tuple, int] = {}  # many records share one candidate list: store it once
    rows = [record_row(record, candidate_lists) for record in result.records]
    temporary = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()  # a cache write is an implementation detail, not a step to watch
    try:
        datasets.Dataset.from_list(rows, features=arrow_features()).save_to_disk(str(temporary))
    finally:
        if not quiet:
            datasets.utils.enable_progress_bars()
    meta = {"skipped": dict(result.skipped), "candidates": [list(c) for c in candidate_lists]}
    (temporary / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    shutil.rmtree(entry, ignore_errors=True)
    os.replace(temporary, entry)


def read_entry(entry: Path) -> LoadResult:
    import datasets

    meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    table = datasets.load_from_disk(str(entry))
    records = [row_record(row, meta["candidates"]) for row in table]
    return LoadResult(records, Counter(meta["skipped"]))


def arrow_features():
    """The table schema (built on call so that importing this module does not import datasets)."""
    import datasets

    text = datasets.Value("string")
    return datasets.Features({
        "id": text, "task": text, "image_path": text, "image_bytes": datasets.Value("binary"), "text": text,
        "target": text, "targets": datasets.Sequence(text), "candidates": datasets.Value("int32"),
        "answer_type": text, "attributes": text, "source": text, "index": datasets.Value("int64"),
    })


def record_row(record: Record, candidate_lists: dict[tuple, int]) -> dict:
    candidates = -1
    if record.candidates is not None:
        candidates = candidate_lists.setdefault(tuple(record.candidates), len(candidate_lists))
    image = record.image
    return {"id": record.id, "task": record.task,
            "image_path": str(image.path) if image is not None and image.path is not None else None,
            "image_bytes": image.data if image is not None else None,
            "text": json.dumps(record.text), "target": record.target, "targets": record.targets,
            "candidates": candidates, "answer_type": record.answer_type,
            "attributes": json.dumps(record.attributes, default=str), "source": record.source, "index": record.index}


def row_record(row: dict, candidate_lists: list[list[str]]) -> Record:
    image = None
    if row["image_path"] is not None:
        image = ImageRef(Path(row["image_path"]))
    elif row["image_bytes"] is not None:
        image = ImageRef(data=row["image_bytes"])
    return Record(id=row["id"], task=row["task"], image=image, text=json.loads(row["text"]), target=row["target"],
                  targets=list(row["targets"]),
                  candidates=candidate_lists[row["candidates"]] if row["candidates"] >= 0 else None,
                  answer_type=row["answer_type"], attributes=json.loads(row["attributes"]), source=row["source"],
                  index=row["index"])
