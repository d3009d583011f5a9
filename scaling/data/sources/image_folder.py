"""Image classification from folders: `root/{train,val,test}/<class>/<image>`, or `root/<class>/<image>` (train).

Class names are the folder names (underscores read as spaces), the same candidate list for every split.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from scaling.data.records import DataError, ImageRef, Record, RecordCollector, SplitNotFound

NAME = "image_folder"
TASK = "classify"
SPLITS = ("train", "validation", "test")
SPLIT_DIRS = {"train": ["train"], "validation": ["val", "validation", "valid"], "test": ["test"]}
IMAGE_SUFFIXES = {s.lower() for s in Image.registered_extensions()} | {".dcm", ".dicom"}


def load(path: Path, split: str, out: RecordCollector) -> None:
    """Reads one split of the folder tree at `path`."""
    split_dir = find_split_dir(path, split)
    classes = class_folders(path)
    names = [c.replace("_", " ") for c in classes]
    index = 0
    for label, (class_name, name) in enumerate(zip(classes, names, strict=True)):
        folder = split_dir / class_name
        for file in sorted(folder.iterdir()) if folder.is_dir() else []:
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                out.skip("not an image file")
                continue
            with out.reading(folder, index):
                out.add(Record(id=str(file.relative_to(path)), task=TASK, image=ImageRef(file), text={},
                               target=name, candidates=names, attributes={"label": label},
                               source=str(folder), index=index))
            index += 1


def has_split_dirs(root: Path) -> bool:
    return any((root / d).is_dir() for dirs in SPLIT_DIRS.values() for d in dirs)


def find_split_dir(root: Path, split: str) -> Path:
    if not has_split_dirs(root):
        if split == "train":
            return root
        raise SplitNotFound(f"{root}: no split folders, so everything is the train split")
    for name in SPLIT_DIRS[split]:
        if (root / name).is_dir():
            return root / name
    raise SplitNotFound(f"{root}: no {split} folder (looked for {', '.join(SPLIT_DIRS[split])})")


def class_folders(root: Path) -> list[str]:
    """Sorted class folder names, united over every split folder."""
    parents = [root / d for dirs in SPLIT_DIRS.values() for d in dirs if (root / d).is_dir()] or [root]
    classes = sorted({child.name for parent in parents for child in parent.iterdir() if child.is_dir()})
    if not classes:
        raise DataError(f"{root}: no class folders. Fix: put images in <split>/<class name>/")
    return classes
