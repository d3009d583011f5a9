"""Baselines fitted on a training split: values by hand on fixtures, the nearest-neighbour ones on images and text
built so that the right neighbour is known, and the real VQA-RAD release."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scaling.data.records import CLOSED, OPEN, ImageRef, Record
from scaling.evaluation.baselines import compute_baselines, image_features, majority, nearest_targets

VQA_RAD = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "vqa_rad"


def _vqa(i, question, answer, kind):
    return Record(id=str(i), task="vqa", image=None, text={"question": question}, target=answer, answer_type=kind)


TRAIN = [_vqa(0, "is there a fracture?", "no", CLOSED), _vqa(1, "is there a fracture?", "no", CLOSED),
         _vqa(2, "is the heart enlarged?", "yes", CLOSED), _vqa(3, "is the heart enlarged?", "yes", CLOSED),
         _vqa(4, "is the heart enlarged?", "yes", CLOSED), _vqa(5, "what plane is this?", "axial", OPEN),
         _vqa(6, "what organ is shown?", "brain", OPEN)]
TEST = [_vqa(10, "Is there a fracture?", "no", CLOSED),          # asked in training: 'no'
        _vqa(11, "is the liver enlarged?", "yes", CLOSED),       # nearest: 'is the heart enlarged?' -> 'yes'
        _vqa(12, "what plane is the image in?", "coronal", OPEN),  # nearest: 'what plane is this?' -> 'axial'
        _vqa(13, "how many lesions?", "2", OPEN)]                # no shared word: the OPEN majority (tie -> 'axial')


def test_majority_breaks_ties_alphabetically():
    assert majority(["no", "yes", "yes", "no"]) == "no" and majority(["b", "a", "b"]) == "b"


def test_vqa_baselines_by_hand():
    overall, typed, question = compute_baselines("vqa", TRAIN, TEST)
    # always 'yes' (3 of 7 training answers): right once
    assert overall["scores"] == pytest.approx({"accuracy": 25.0, "closed_accuracy": 50.0, "open_accuracy": 0.0,
                                               "yes_no_accuracy": 50.0, "non_yes_no_accuracy": 0.0})
    # CLOSED: 'yes'; OPEN: 'axial' and 'brain' tie -> 'axial'
    assert "CLOSED: 'yes', OPEN: 'axial'" in typed["definition"]
    assert typed["scores"]["accuracy"] == pytest.approx(25.0)
    # question-only answers no, yes, axial, axial: the two closed right
    assert question["scores"] == pytest.approx({"accuracy": 50.0, "closed_accuracy": 100.0, "open_accuracy": 0.0,
                                                "yes_no_accuracy": 100.0, "non_yes_no_accuracy": 0.0})
    assert "1 of 4 questions have an identical training question" in question["definition"]


def test_label_baseline_is_the_majority_class():
    train = [Record(id=str(i), task="nli", image=None, text={}, target=t) for i, t in enumerate("yyn")]
    test = [Record(id=str(i), task="nli", image=None, text={}, target=t) for i, t in enumerate("nny")]
    (row,) = compute_baselines("nli", train, test)
    assert row["name"] == "majority class" and row["scores"]["accuracy"] == pytest.approx(100 / 3)
    assert row["scores"]["macro_f1"] == pytest.approx(100 * (0 + 0.5) / 2)  # n: F1 0; y: 2·1/(3+1)


def test_nearest_image_caption(tmp_path):
    def record(i, pattern, caption):
        path = tmp_path / f"{i}.png"
        Image.fromarray(pattern.astype(np.uint8)).save(path)
        return Record(id=str(i), task="caption", image=ImageRef(path=path), text={}, target=caption)

    ramp = np.tile(np.arange(0, 256, 8), (32, 1))
    train = [record(0, ramp, "left to right"), record(1, ramp.T, "top to bottom"),
             record(2, 255 - ramp, "right to left")]
    test = [record(3, ramp.T // 2 + 10, "top down"), record(4, (255 - ramp) // 2, "right left"),
            record(5, ramp, "left right")]
    assert nearest_targets(image_features(train), image_features(test), train) == [
        "top to bottom", "right to left", "left to right"]
    (row,) = compute_baselines("caption", train, test)
    assert row["name"] == "nearest training image" and {"rouge_l", "cider", "bleu_4"} <= set(row["scores"])


def test_nearest_article_summary():
    def record(i, source, summary):
        return Record(id=str(i), task="summarize", image=None, text={"source": source}, target=summary)

    train = [record(0, "my knee hurts after running every morning", "knee pain after running"),
             record(1, "what dose of insulin should my mother take", "insulin dose")]
    test = [record(2, "how much insulin for my father", "insulin dose"),
            record(3, "pain in the knee when running", "knee pain running")]
    (row,) = compute_baselines("summarize", train, test)
    assert row["scores"]["rouge_1"] == pytest.approx(100 * (1.0 + 2 * 3 / 7) / 2)  # exact, then 3 of 4 vs 3 words


@pytest.mark.skipif(not VQA_RAD.is_dir(), reason="needs ../shared/data/vqa_rad (the VQA-RAD release)")
def test_vqa_rad_baselines_on_the_release():
    from scaling.data.sources import load_source

    train, test = (load_source("vqa_rad", VQA_RAD, split).records for split in ("train", "test"))
    scores = {row["name"]: row["scores"] for row in compute_baselines("vqa", train, test)}
    assert scores["majority answer"]["accuracy"] == pytest.approx(100 * 133 / 451)  # 'no' for all 451
    # without the image, the question text alone answers about two in five test questions right
    assert 35 < scores["question-only"]["accuracy"] < 50
    assert scores["question-only"]["closed_accuracy"] > scores["majority answer"]["closed_accuracy"]
