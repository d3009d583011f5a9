"""Candidate answer lists per VQA source: the published protocol by default, chosen explicitly, origin recorded."""

import base64
from pathlib import Path

import pytest

from scaling.data.records import DataError
from scaling.data.sources import load_source


def test_vqa_rad_follows_biomedgpt_train_and_test_unless_told(vqa_rad_fixture: Path):
    (test,) = load_source("vqa_rad", vqa_rad_fixture, "test").records
    assert test.candidates == ["2", "pa", "yes"] and "pa" == test.target.lower()  # its own answer is listed
    assert test.attributes["candidates_from"] == "answers of the train+test splits"
    (honest,) = load_source("vqa_rad", vqa_rad_fixture, "test", candidate_splits=["train"]).records
    assert honest.candidates == ["2", "yes"]
    assert honest.attributes["candidates_from"] == "answers of the train split"


def test_slake_default_never_lists_test_answers(tmp_path: Path, make_image, make_json):
    make_image(tmp_path / "imgs" / "a.jpg")
    row = {"img_name": "a.jpg", "q_lang": "en", "answer_type": "OPEN", "question": "Which organ?"}
    make_json(tmp_path / "train.json", [{**row, "qid": 1, "answer": "Lung"}])
    make_json(tmp_path / "validate.json", [{**row, "qid": 2, "answer": "Liver"}])
    make_json(tmp_path / "test.json", [{**row, "qid": 3, "answer": "Heart"}])
    (test,) = load_source("slake", tmp_path, "test").records
    assert test.candidates == ["liver", "lung"] and "heart" not in test.candidates
    everything = load_source("slake", tmp_path, "test", candidate_splits=["train", "validation", "test"]).records
    assert everything[0].candidates == ["heart", "liver", "lung"]
    assert everything[0].attributes["candidates_from"] == "answers of the train+validation+test splits"


def test_unknown_candidate_split_is_refused_by_name(vqa_rad_fixture: Path):
    with pytest.raises(DataError, match=r"candidate_splits \['validation'\] must name one or more of train, test"):
        load_source("vqa_rad", vqa_rad_fixture, "test", candidate_splits=["validation"])


def test_biomedgpt_tsv_takes_the_train_and_validation_answers(tmp_path: Path, make_image):
    b64 = base64.urlsafe_b64encode(make_image(tmp_path / "x.jpg").read_bytes()).decode()

    def row(qid, answers):
        return f"{qid}\timg\tis this a ct?\t{answers}\t\t{b64}\n"

    (tmp_path / "train.tsv").write_text(row(1, "1.0|!+yes") + row(2, "1.0|!+Left Lobe&&0.5|!+left"))
    (tmp_path / "val.tsv").write_text(row(3, "1.0|!+no"))
    (tmp_path / "test.tsv").write_text(row(4, "1.0|!+right lobe"))
    (test,) = load_source("biomedgpt_tsv", tmp_path, "test", task="vqa").records
    assert test.candidates == ["left", "left lobe", "no", "yes"]
    assert test.attributes["candidates_from"] == "answers of train.tsv+val.tsv"
    (alone,) = load_source("biomedgpt_tsv", tmp_path / "test.tsv", "test", task="vqa").records
    assert alone.candidates == ["right lobe"] and "its own references" in alone.attributes["candidates_from"]
