"""Shared fixtures for the data tests: the real datasets under ../shared/data and tiny native-format fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def shared_dataset(name: str) -> Path:
    """A real dataset from ../shared/data, or a skip saying why."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real dataset {name} not available at {path.resolve()} (../shared/data is absent)")
    return path


def save_image(path: Path, size: tuple[int, int] = (8, 6), mode: str = "RGB", value: int = 120, fmt=None) -> Path:
    """A small image with a gradient, so that decoding errors would show."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    gradient = (np.arange(width * height).reshape(height, width) * 7 + value) % 256
    image = Image.fromarray(gradient.astype(np.uint8)).convert(mode)
    image.save(path, format=fmt)
    return path


def write_json(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


@pytest.fixture
def vqa_rad_fixture(tmp_path: Path) -> Path:
    """A VQA-RAD release folder: 3 train questions (one CLOSED with a stray space) and 1 test question."""
    for name in ("synpic1.jpg", "synpic2.jpg"):
        save_image(tmp_path / "images" / name)
    rows = [
        {"qid": 0, "phrase_type": "freeform", "image_name": "synpic1.jpg", "image_organ": "HEAD",
         "question": "Is the brain   normal?", "question_type": "PRES", "answer": "Yes", "answer_type": "CLOSED"},
        {"qid": 1, "phrase_type": "para", "image_name": "synpic1.jpg", "image_organ": "HEAD",
         "question": "How many lesions", "question_type": "COUNT, PRES", "answer": 2, "answer_type": "OPEN"},
        {"qid": 2, "phrase_type": "freeform", "image_name": "synpic2.jpg", "image_organ": "CHEST",
         "question": "Is this an x-ray?", "question_type": "ATRIB", "answer": "yes", "answer_type": "CLOSED "},
        {"qid": 3, "phrase_type": "test_freeform", "image_name": "synpic2.jpg", "image_organ": "CHEST",
         "question": "What plane is this?", "question_type": "PLANE", "answer": "PA", "answer_type": "OPEN"},
    ]
    write_json(tmp_path / "VQA_RAD Dataset Public.json", rows)
    return tmp_path


@pytest.fixture
def make_image():
    """save_image as a fixture: make_image(path, size=(8, 6), mode='RGB', value=120, fmt=None)."""
    return save_image


@pytest.fixture
def make_json():
    return write_json


@pytest.fixture
def vqa_rad_real() -> Path:
    return shared_dataset("vqa_rad")


@pytest.fixture
def pubmedqa_real() -> Path:
    return shared_dataset("pubmedqa")
