"""IU X-ray / PEIR Gross in the bioCaption format: `train_images.tsv`, `test_images.tsv` (`File_name<TAB>Caption`).

Validation is the last `validation_fraction` of the train file (PEIR Gross is split 80/20 this way); train is the
rest. A header row `File_name<TAB>Caption` is recognised and ignored. Images live in `images_dir` (default: the
first of iu_xray_images/, peir_gross_images/, images/ next to the TSVs).
"""

from __future__ import annotations

from pathlib import Path

from scaling.data.records import BadRecord, DataError, ImageRef, Record, RecordCollector, require_text
from scaling.data.sources.common import decode_line, find_split_file, image_path, iter_lines

NAME = "caption_tsv"
TASK = "caption"
SPLITS = ("train", "validation", "test")
SPLIT_FILES = {"train": ["train_images.tsv", "train.tsv"], "test": ["test_images.tsv", "test.tsv"]}
IMAGE_DIRS = ("iu_xray_images", "peir_gross_images", "images")
IMAGE_SUFFIXES = ("", ".png", ".jpg", ".jpeg")


def load(path: Path, split: str, out: RecordCollector, images_dir: str | None = None,
         validation_fraction: float = 0.2) -> None:
    """Reads one split; `path` is the folder with the TSVs."""
    file = find_split_file(path, "test" if split == "test" else "train", SPLIT_FILES, NAME)  # validation: from train
    image_root = Path(images_dir) if images_dir else find_image_dir(path)
    lines = [(index, raw) for index, raw in iter_lines(file) if not (index == 0 and is_header(raw))]
    if split != "test":
        lines = split_train(lines, split, validation_fraction)
    for index, raw in lines:
        with out.reading(file, index):
            out.add(make_record(decode_line(raw), index, file, image_root))


def is_header(raw: bytes) -> bool:
    return raw.lower().startswith(b"file_name\t")


def make_record(line: str, index: int, file: Path, image_root: Path) -> Record:
    cells = line.split("\t")
    if len(cells) < 2:
        raise BadRecord("wrong column count", "<line>", "write File_name<TAB>Caption", detail=f"{len(cells)} column")
    name = require_text({"File_name": cells[0]}, "File_name", "name the image file")
    caption = require_text({"Caption": "\t".join(cells[1:])}, "Caption", "write the caption")
    return Record(id=name, task=TASK, image=ImageRef(resolve_image(image_root, name)), text={}, target=caption,
                  source=str(file), index=index)


def split_train(lines: list, split: str, validation_fraction: float) -> list:
    """The first (1 - fraction) of the train file for train, the rest for validation."""
    if not 0.0 <= validation_fraction < 1.0:
        raise DataError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    cut = len(lines) - round(len(lines) * validation_fraction)
    return lines[:cut] if split == "train" else lines[cut:]


def resolve_image(root: Path, name: str) -> Path:
    """`name` as given, or with the first image suffix that exists (IU X-ray names omit '.png')."""
    path = image_path(root, name, "File_name")
    for suffix in IMAGE_SUFFIXES:
        if path.with_name(path.name + suffix).is_file():
            return path.with_name(path.name + suffix)
    return path


def find_image_dir(root: Path) -> Path:
    return next((root / name for name in IMAGE_DIRS if (root / name).is_dir()), root / IMAGE_DIRS[-1])
