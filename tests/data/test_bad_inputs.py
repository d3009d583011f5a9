"""The catalogue of bad inputs: each is a counted skip or a clear error naming the file, the record and the fix."""

import base64
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scaling.data.records import DataError, RecordError
from scaling.data.sources import load_source

GOOD = {"phrase_type": "freeform", "image_organ": "HEAD", "question_type": "PRES", "question": "Is it normal?",
        "answer": "yes", "answer_type": "CLOSED", "image_name": "good.jpg"}

# (qid, change to a good VQA-RAD row, the reason it is skipped or None when it must be kept, the field named)
CATALOGUE = [
    (1, {}, None, None),
    (2, {"image_name": "absent.jpg"}, "missing image file", "image"),
    (3, {"image_name": "corrupt.jpg"}, "unreadable image", "image"),
    (4, {"image_name": "truncated.png"}, "unreadable image", "image"),
    (5, {"image_name": "gray16.png"}, None, None),
    (6, {"image_name": "cmyk.jpg"}, None, None),
    (7, {"image_name": "huge.png"}, "image over max_pixels", "image"),
    (8, {"question": "   "}, "empty question", "question"),
    (9, {"answer": None}, "missing answer", "answer"),
    (10, {"question": ["Is", "it", "normal?"]}, "wrong value type", "question"),
    (1, {"question": "Is it the same id?"}, "duplicate id", "id"),
    (11, {"answer_type": "YES/NO"}, "unknown answer type", "answer_type"),
]


def write_images(folder: Path) -> None:
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / "good.jpg")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00garbage" * 20)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    (folder / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    Image.fromarray(np.array([[0, 4000], [2000, 1000]], dtype=np.uint16)).save(folder / "gray16.png")
    Image.new("CMYK", (8, 8), (0, 200, 200, 0)).save(folder / "cmyk.jpg")
    Image.new("L", (300, 300), 0).save(folder / "huge.png")  # 90,000 pixels, over the test's 50,000 limit


@pytest.fixture
def catalogue_release(tmp_path: Path) -> Path:
    write_images(tmp_path / "images")
    rows = [{**GOOD, "qid": qid, **change} for qid, change, _, _ in CATALOGUE]
    (tmp_path / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    return tmp_path


def test_bad_records_are_counted_and_good_ones_kept(catalogue_release: Path):
    result = load_source("vqa_rad", catalogue_release, "train", verify_images=True, max_pixels=50_000)
    assert [r.id for r in result.records] == ["1", "5", "6"]  # good, 16-bit grayscale, CMYK
    assert result.skipped == Counter(reason for _, _, reason, _ in CATALOGUE if reason)
    assert len(result.records) + result.n_skipped == len(CATALOGUE)


def test_without_verification_only_missing_files_are_caught_at_load_time(catalogue_release: Path):
    result = load_source("vqa_rad", catalogue_release, "train")
    assert "unreadable image" not in result.skipped and result.skipped["missing image file"] == 1


@pytest.mark.parametrize("position", [i for i, (_, _, reason, _) in enumerate(CATALOGUE) if reason])
def test_on_bad_record_error_names_file_record_field_and_fix(tmp_path: Path, position: int):
    write_images(tmp_path / "images")
    qid, change, reason, field = CATALOGUE[position]
    rows = [{**GOOD, "qid": 1}, {**GOOD, "qid": qid, **change}] if qid == 1 else [{**GOOD, "qid": qid, **change}]
    (tmp_path / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    with pytest.raises(RecordError) as info:
        load_source("vqa_rad", tmp_path, "train", on_bad_record="error", verify_images=True, max_pixels=50_000)
    message = str(info.value)
    assert "VQA_RAD Dataset Public.json" in message and f"record {len(rows) - 1}" in message
    assert f"field {field!r}" in message and reason in message and "Fix: " in message


def test_undecodable_text_in_a_line_file_loses_only_that_line(tmp_path: Path):
    good = json.dumps({"sentence1": "No fever.", "sentence2": "Afebrile.", "gold_label": "entailment"})
    (tmp_path / "mli_train_v1.jsonl").write_bytes(
        good.encode() + b"\n" + b'{"sentence1": "caf\xe9", "sentence2": "x", "gold_label": "neutral"}\n'
        + good.replace("No fever", "No chills").encode() + b"\n")
    result = load_source("mednli", tmp_path, "train")
    assert len(result.records) == 2 and result.skipped == Counter({"undecodable text": 1})
    with pytest.raises(RecordError, match=r"record 1, field '<line>': undecodable text: invalid UTF-8 at byte 18"):
        load_source("mednli", tmp_path, "train", on_bad_record="error")


def test_undecodable_text_in_a_json_file_names_the_byte(tmp_path: Path):
    (tmp_path / "VQA_RAD Dataset Public.json").write_bytes(b'[{"question": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"not valid UTF-8 at byte 18. Fix: re-save the file as UTF-8"):
        load_source("vqa_rad", tmp_path, "train")


def test_undecodable_text_and_bad_base64_in_a_tsv(tmp_path: Path):
    (tmp_path / "train.tsv").write_bytes(b"src \xff\tsummary\nsource two\tsummary two\nonly one column\n")
    result = load_source("biomedgpt_tsv", tmp_path, "train", task="summarize")
    assert [r.text["source"] for r in result.records] == ["source two"]
    assert result.skipped == Counter({"undecodable text": 1, "wrong column count": 1})
    (tmp_path / "test.tsv").write_text("1\timg\tq?\t1.0|!+yes\t\tnot*base64!\n")
    assert load_source("biomedgpt_tsv", tmp_path, "test", task="vqa").skipped == Counter(
        {"undecodable image base64": 1})


def test_wrong_json_shape_is_a_clear_error(tmp_path: Path):
    (tmp_path / "train.json").write_text('{"not": "a list"}')
    with pytest.raises(DataError, match="expected a list of question records, got dict"):
        load_source("pathvqa", tmp_path, "train")
    (tmp_path / "VQA_RAD Dataset Public.json").write_text('[{"qid": 1,')
    with pytest.raises(DataError, match="invalid JSON at line 1"):
        load_source("vqa_rad", tmp_path, "train")


def test_missing_dataset_path_unknown_source_option_and_split(tmp_path: Path, vqa_rad_fixture: Path):
    with pytest.raises(DataError, match=r"vqa_rad dataset path not found: .*nowhere"):
        load_source("vqa_rad", tmp_path / "nowhere", "train")
    with pytest.raises(DataError, match="'vqa-rad': unknown; choose one of vqa_rad"):
        load_source("vqa-rad", tmp_path, "train")
    with pytest.raises(DataError, match=r"unknown option\(s\) q_lang; its options: images_dir"):
        load_source("vqa_rad", vqa_rad_fixture, "train", q_lang="en")
    with pytest.raises(DataError, match="no split 'validation'; it has train, test"):
        load_source("pubmedqa", tmp_path, "validation")


# ---- image paths that leave the dataset folder ------------------------------------------------------------------

ESCAPES = ["../secret.png", "{secret}", "images/../../secret.png"]


def vqa_rad_release(root: Path, names: list[str]) -> str:
    rows = [{**GOOD, "qid": i, "image_name": name} for i, name in enumerate(names)]
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    return "images"


def slake_release(root: Path, names: list[str]) -> str:
    rows = [{"qid": i, "img_name": name, "question": "Is it normal?", "answer": "yes", "answer_type": "CLOSED",
             "q_lang": "en"} for i, name in enumerate(names)]
    (root / "train.json").write_text(json.dumps(rows))
    return "imgs"


def llava_med_release(root: Path, names: list[str]) -> str:
    rows = [{"id": str(i), "image": name, "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                             {"from": "gpt", "value": "a scan"}]}
            for i, name in enumerate(names)]
    (root / "train.json").write_text(json.dumps(rows))
    return "images"


def pathvqa_release(root: Path, names: list[str]) -> str:
    rows = [{"image": name, "question": "Is it normal?", "answer": "yes"} for name in names]
    (root / "train.json").write_text(json.dumps(rows))
    return "images/train"


def caption_tsv_release(root: Path, names: list[str]) -> str:
    (root / "train_images.tsv").write_text("".join(f"{name}\tA normal chest.\n" for name in names))
    return "images"


def r2gen_release(root: Path, names: list[str]) -> str:
    rows = [{"id": str(i), "report": "A normal chest.", "image_path": [name]} for i, name in enumerate(names)]
    (root / "annotation.json").write_text(json.dumps({"train": rows}))
    return "images"


OPTIONS = {"caption_tsv": {"validation_fraction": 0.0}}  # every line in the train split
RELEASES = {"vqa_rad": vqa_rad_release, "slake": slake_release, "llava_med": llava_med_release,
            "pathvqa": pathvqa_release, "caption_tsv": caption_tsv_release, "iu_xray_r2gen": r2gen_release}


def escaping_release(tmp_path: Path, source: str) -> tuple[Path, Path]:
    """A release of `source` with one good image and image names that point at a real file outside it."""
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(secret)
    root = tmp_path / "release"
    root.mkdir()
    names = ["good.png", *(name.format(secret=secret) for name in ESCAPES)]
    images = RELEASES[source](root, names)
    Image.new("RGB", (8, 8), (200, 10, 10)).save((root / images).mkdir(parents=True) or root / images / "good.png")
    return root, secret


@pytest.mark.parametrize("source", RELEASES)
def test_image_paths_outside_the_dataset_folder_are_refused_with_record_and_path(tmp_path: Path, source: str):
    root, secret = escaping_release(tmp_path, source)
    result = load_source(source, root, "train", **OPTIONS.get(source, {}))
    assert [r.image.path.name for r in result.records] == ["good.png"]
    assert result.skipped == Counter({"image path outside the dataset folder": len(ESCAPES)})
    with pytest.raises(RecordError) as info:
        load_source(source, root, "train", on_bad_record="error", **OPTIONS.get(source, {}))
    assert "record 1" in str(info.value) and "'../secret.png'" in str(info.value)
    assert "image path outside the dataset folder" in str(info.value)


def test_images_dir_is_the_explicit_way_to_read_images_elsewhere(tmp_path: Path):
    root, secret = escaping_release(tmp_path, "vqa_rad")
    result = load_source("vqa_rad", root, "train", images_dir=str(tmp_path))
    assert secret in {r.image.path for r in result.records}


@pytest.mark.parametrize("to", ["tsv", "instruct"])
def test_data_convert_copies_nothing_from_outside_the_dataset(tmp_path: Path, to: str):
    from scaling.cli import main

    root, secret = escaping_release(tmp_path, "vqa_rad")
    out = tmp_path / "out" / ("train.tsv" if to == "tsv" else "train.json")
    assert main(["data", "convert", "vqa_rad", "--path", str(root), "--to", to, "--out", str(out)]) == 0
    written = b"".join(p.read_bytes() for p in out.parent.rglob("*") if p.is_file())
    assert base64.b64encode(secret.read_bytes()) not in written and secret.read_bytes() not in written
    good = base64.b64encode((root / "images" / "good.png").read_bytes())
    assert good in written or (root / "images" / "good.png").read_bytes() in written  # the converter did copy images


# ---- MedMNIST arrays that do not match the release's layout, and image error messages ----------------------------


@pytest.mark.parametrize("change,message", [
    ({"train_labels": np.zeros((2, 1), dtype=np.uint8)}, r"3 'train_images' but 2 'train_labels'"),
    ({"train_images": np.full((3, 8, 8), 0.5, dtype=np.float32)}, r"'train_images' are float32; .*uint8"),
    ({"train_images": np.zeros((3, 8, 8, 2), dtype=np.uint8)}, r"shape \(3, 8, 8, 2\); expected"),
])
def test_medmnist_arrays_outside_the_release_layout_are_a_clear_error(tmp_path: Path, change: dict, message: str):
    arrays = {"train_images": np.zeros((3, 8, 8), dtype=np.uint8), "train_labels": np.zeros((3, 1), dtype=np.uint8),
              **change}
    np.savez(tmp_path / "pneumoniamnist.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_source("medmnist", tmp_path / "pneumoniamnist.npz", "train")


def test_an_image_error_names_the_file_once_with_one_fix(catalogue_release: Path):
    with pytest.raises(RecordError) as info:
        rows = [{**GOOD, "qid": 3, "image_name": "corrupt.jpg"}]
        (catalogue_release / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
        load_source("vqa_rad", catalogue_release, "train", on_bad_record="error", verify_images=True)
    message = str(info.value)
    assert "BytesIO" not in message and message.count("Fix:") == 1, message
    assert str(catalogue_release / "images" / "corrupt.jpg") in message
