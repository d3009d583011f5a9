"""Dataset sources: one module per native format, registered by name.

`load_source("vqa_rad", path, "train")` → LoadResult(records, skipped). Every source takes the common options
`on_bad_record` ('skip' counts bad records by reason, 'error' stops at the first one with the file, record, field
and fix), `verify_images` (decode every image once while loading), `max_pixels` and `cache_dir` (keep the loaded
records as an Arrow table keyed by the files' fingerprint, see cache.py), plus its own (see each module).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from scaling.data.images import DEFAULT_MAX_PIXELS
from scaling.data.records import DataError, LoadResult, check_path
from scaling.data.sources import (
    biomedgpt_tsv,
    caption_tsv,
    image_folder,
    iu_xray_r2gen,
    llava_med,
    medmnist,
    mednli,
    meqsum,
    pathvqa,
    pubmedqa,
    slake,
    vqa_rad,
)
from scaling.data.sources.cache import cached_load, fingerprint
from scaling.data.sources.common import make_collector


@dataclass(frozen=True)
class Source:
    """A registered native format: its loader, the splits it can have, and its task (None: chosen by option)."""

    name: str
    load: Callable
    splits: tuple[str, ...]
    task: str | None
    description: str

    def options(self) -> list[str]:
        """The source's own keyword options."""
        return [p for p in inspect.signature(self.load).parameters if p not in ("path", "split", "out")]


def _register(module) -> Source:
    return Source(module.NAME, module.load, module.SPLITS, module.TASK, module.__doc__.strip().splitlines()[0])


SOURCES: dict[str, Source] = {s.name: s for s in map(_register, (
    vqa_rad, slake, pathvqa, caption_tsv, iu_xray_r2gen, medmnist, image_folder, mednli, meqsum, pubmedqa,
    biomedgpt_tsv, llava_med))}


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise DataError(f"unknown source {name!r}; choose one of {', '.join(SOURCES)}")
    return SOURCES[name]


def load_source(name: str, path: str | Path, split: str, *, on_bad_record: str = "skip",
                verify_images: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS, cache_dir: str | Path | None = None,
                **options) -> LoadResult:
    """Records of one split of a dataset in its native format, and the count of skipped records per reason."""
    problems = source_problems(name, split, options)
    if problems:
        raise DataError("; ".join(problems))
    source = SOURCES[name]
    path = check_path(path, f"{name} dataset path", "pass the folder (or file) of the dataset release")

    def load() -> LoadResult:
        out = make_collector(on_bad_record, verify_images, max_pixels)
        source.load(path, split, out, **options)
        return out.result()

    if cache_dir is None:
        return load()
    settings = {**options, "on_bad_record": on_bad_record, "verify_images": verify_images, "max_pixels": max_pixels}
    return cached_load(load, cache_dir, f"{name}-{split}-{fingerprint(name, path, split, settings, Path(cache_dir))}")


def source_problems(name: str, split: str, options: dict) -> list[str]:
    """Everything wrong with a source configuration, found before any file is read (for config validation)."""
    if name not in SOURCES:
        return [f"data source {name!r}: unknown; choose one of {', '.join(SOURCES)}"]
    source, problems = SOURCES[name], []
    if split not in source.splits:
        problems.append(f"data source {name!r}: no split {split!r}; it has {', '.join(source.splits)}")
    unknown = sorted(set(options) - set(source.options()) - {"verify_images", "max_pixels"})  # load_source's own
    if unknown:
        problems.append(f"data source {name!r}: unknown option(s) {', '.join(unknown)}; "
                        f"its options: {', '.join(source.options()) or 'none'}")
    if source.task is None and "task" not in options:
        problems.append(f"data source {name!r}: needs options.task (one of vqa, caption, classify, nli, summarize, qa)")
    return problems
