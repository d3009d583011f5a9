"""IU X-ray in the R2Gen release: `annotation.json` = {"train"|"val"|"test": [{id, report, image_path[], ...}]}.

A study has a frontal and a lateral view; the record's image is the first path (frontal), and every view is kept
in attributes["image_paths"] for models that take several.
"""

from __future__ import annotations

from pathlib import Path

from scaling.data.records import BadRecord, DataError, ImageRef, Record, RecordCollector, check_path, require_text
from scaling.data.sources.common import as_row, image_path, read_json

NAME = "iu_xray_r2gen"
TASK = "caption"
SPLITS = ("train", "validation", "test")
NATIVE_SPLIT = {"train": "train", "validation": "val", "test": "test"}


def load(path: Path, split: str, out: RecordCollector, images_dir: str | None = None) -> None:
    """Reads one split; `path` is the folder with annotation.json and images/ (or the JSON itself)."""
    file = check_path(path / "annotation.json" if path.is_dir() else path, "R2Gen annotation")
    image_root = Path(images_dir) if images_dir else file.parent / "images"
    annotation = read_json(file)
    rows = annotation.get(NATIVE_SPLIT[split]) if isinstance(annotation, dict) else None
    if not isinstance(rows, list):
        raise DataError(f"{file}: no list under key {NATIVE_SPLIT[split]!r}. Fix: use R2Gen's annotation.json "
                        "with train/val/test lists")
    for index, row in enumerate(rows):
        with out.reading(file, index):
            out.add(make_record(as_row(row), index, file, image_root))


def make_record(row: dict, index: int, file: Path, image_root: Path) -> Record:
    paths = row.get("image_path")
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise BadRecord("missing image file", "image_path", "list the study's image paths")
    views = [image_path(image_root, p, "image_path") for p in paths]
    return Record(
        id=require_text(row, "id", "give every study an id"),
        task=TASK,
        image=ImageRef(views[0]),
        text={},
        target=require_text(row, "report", "write the report"),
        attributes={"image_paths": [str(view) for view in views]},
        source=str(file),
        index=index,
    )
