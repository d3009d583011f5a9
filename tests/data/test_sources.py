import base64
import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import openpyxl
import pytest

from scaling.data.records import DataError, ImageRef, Record, SplitNotFound
from scaling.data.sources import SOURCES, biomedgpt_tsv, load_source
from scaling.data.tasks import TASKS


def test_every_source_is_registered_with_splits_and_a_description():
    assert set(SOURCES) == {"vqa_rad", "slake", "pathvqa", "caption_tsv", "iu_xray_r2gen", "medmnist",
                            "image_folder", "mednli", "meqsum", "pubmedqa", "biomedgpt_tsv", "llava_med"}
    for source in SOURCES.values():
        assert source.splits and set(source.splits) <= {"train", "validation", "test"}
        assert source.description and (source.task is None or source.task in TASKS)


# ---- real data ------------------------------------------------------------------------------------------------


def test_vqa_rad_real_release(vqa_rad_real: Path):
    train, test = (load_source("vqa_rad", vqa_rad_real, split) for split in ("train", "test"))
    assert (len(train.records), len(test.records)) == (1797, 451)
    assert train.n_skipped == test.n_skipped == 0
    records = train.records + test.records
    assert {r.answer_type for r in records} == {"OPEN", "CLOSED"}
    assert all(r.image.path.is_file() for r in records)
    assert len({r.id for r in records}) == 2248
    assert len(records[0].candidates) == 517  # BiomedGPT's VQA-RAD trainval ans2label has 517 answers
    assert {r.attributes["organ"] for r in records} == {"HEAD", "CHEST", "ABD"}
    categories = {c.strip() for r in records for c in r.attributes["category"].split(",")}
    assert categories == {"MODALITY", "PLANE", "ORGAN", "ABN", "PRES", "POS", "COLOR", "SIZE", "ATTRIB", "COUNT",
                          "OTHER"}
    several = [r for r in records if len(r.attributes["question_types"]) > 1]  # e.g. "PRES, POS": counted under each
    assert several and all(r.attributes["category"] == ", ".join(r.attributes["question_types"]) for r in several)
    assert all(TASKS["vqa"].target(r).strip() in r.candidates for r in records)


def test_pubmedqa_real_release(pubmedqa_real: Path):
    train, test = (load_source("pubmedqa", pubmedqa_real, split) for split in ("train", "test"))
    assert (len(train.records), len(test.records)) == (500, 500)
    assert len({r.id for r in train.records + test.records}) == 1000
    truth = json.loads((pubmedqa_real / "test_ground_truth.json").read_text())
    assert {r.id: r.target for r in test.records} == truth
    assert {r.target for r in train.records + test.records} == {"yes", "no", "maybe"}
    assert all(r.text["question"] and r.text["context"] for r in train.records)


# ---- fixtures in the native formats -----------------------------------------------------------------------------


def test_vqa_rad_fixture_normalises_types_and_categories(vqa_rad_fixture: Path):
    train = load_source("vqa_rad", vqa_rad_fixture, "train").records
    assert [r.answer_type for r in train] == ["CLOSED", "OPEN", "CLOSED"]
    assert [r.attributes["category"] for r in train] == ["PRES", "COUNT, PRES", "ATTRIB"]
    assert train[1].target == "2" and train[0].text["question"] == "Is the brain normal?"
    assert train[0].candidates == ["2", "pa", "yes"]  # train and test answers, normalised
    assert [r.id for r in load_source("vqa_rad", vqa_rad_fixture / "VQA_RAD Dataset Public.json", "test").records] == ["3"]


def test_slake_language_filter_counts_other_languages(tmp_path: Path, make_image, make_json):
    make_image(tmp_path / "imgs" / "xmlab0" / "source.jpg")
    row = {"img_name": "xmlab0/source.jpg", "location": "Lung", "modality": "CT", "answer_type": "CLOSED",
           "content_type": "Organ", "base_type": "vqa"}
    make_json(tmp_path / "train.json", [
        {**row, "qid": 1, "question": "Is this a CT?", "answer": "Yes", "q_lang": "en"},
        {**row, "qid": 2, "question": "这是CT吗?", "answer": "是", "q_lang": "zh"},
    ])
    make_json(tmp_path / "validate.json", [{**row, "qid": 3, "question": "Which organ?", "answer": "Lung",
                                            "q_lang": "en", "answer_type": "OPEN"}])
    english = load_source("slake", tmp_path, "train")
    assert [r.id for r in english.records] == ["1"] and english.skipped == Counter({"q_lang not en": 1})
    assert english.records[0].candidates == ["lung", "yes"]
    assert english.records[0].attributes == {"organ": "Lung", "modality": "CT", "category": "Organ", "q_lang": "en",
                                             "candidates_from": "answers of the train+validation splits"}
    assert [r.target for r in load_source("slake", tmp_path, "train", q_lang="zh").records] == ["是"]
    assert len(load_source("slake", tmp_path, "train", q_lang="all").records) == 2
    assert load_source("slake", tmp_path, "validation").records[0].answer_type == "OPEN"
    with pytest.raises(SplitNotFound, match="no test file"):
        load_source("slake", tmp_path, "test")


def pathvqa_rows() -> list[dict]:
    return [{"img_id": "train_0001", "question_id": 10, "sent": "Is this tissue inflamed?", "label": {"yes": 1.0}},
            {"img_id": "train_0001", "question_id": 11, "sent": "What is present?", "label": {"granuloma": 1.0}}]


def test_pathvqa_pickle_release(tmp_path: Path, make_image):
    make_image(tmp_path / "images" / "train" / "train_0001.jpg")
    (tmp_path / "qas").mkdir()
    (tmp_path / "qas" / "train_vqa.pkl").write_bytes(pickle.dumps(pathvqa_rows()))
    (tmp_path / "qas" / "test_vqa.pkl").write_bytes(pickle.dumps([{**pathvqa_rows()[1], "question_id": 12,
                                                                  "label": {"necrosis": 0.5}}]))
    records = load_source("pathvqa", tmp_path, "train").records
    assert [(r.id, r.target, r.answer_type) for r in records] == [("10", "yes", "CLOSED"),
                                                                   ("11", "granuloma", "OPEN")]
    assert records[0].candidates == ["granuloma", "yes"]  # train (+ validation) answers: never the test split's
    assert records[0].image.path == tmp_path / "images" / "train" / "train_0001.jpg"


def test_pathvqa_refuses_pickles_with_globals(tmp_path: Path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    (tmp_path / "qas").mkdir()
    (tmp_path / "qas" / "train_vqa.pkl").write_bytes(pickle.dumps([Evil()]))
    with pytest.raises(DataError, match="global builtins.print is not allowed"):
        load_source("pathvqa", tmp_path, "train")


def test_pathvqa_json_export(tmp_path: Path, make_image, make_json):
    make_image(tmp_path / "images" / "val" / "val_0261.jpg")
    make_json(tmp_path / "val.json", [{"image": "val_0261", "question": "What have lost their nuclei?",
                                       "answer": "neutrophils"}])
    (record,) = load_source("pathvqa", tmp_path, "validation").records
    assert (record.text["question"], record.target, record.id) == ("What have lost their nuclei?", "neutrophils",
                                                                   "val-0")


def test_caption_tsv_splits_train_into_train_and_validation(tmp_path: Path, make_image):
    for i in range(5):
        make_image(tmp_path / "iu_xray_images" / f"CXR{i}_IM-0001-1001.png")
    lines = ["File_name\tCaption"] + [f"CXR{i}_IM-0001-1001\tThe lungs are clear. No effusion {i}." for i in range(4)]
    (tmp_path / "train_images.tsv").write_text("\n".join(lines) + "\n")
    (tmp_path / "test_images.tsv").write_text("CXR4_IM-0001-1001.png\tHeart is normal.\n")
    train, val, test = (load_source("caption_tsv", tmp_path, s).records for s in ("train", "validation", "test"))
    assert (len(train), len(val), len(test)) == (3, 1, 1)
    assert train[0].image.path.name == "CXR0_IM-0001-1001.png" and train[0].image.path.is_file()
    assert TASKS["caption"].target(val[0]) == " the lungs are clear no effusion 3"
    assert len(load_source("caption_tsv", tmp_path, "train", validation_fraction=0.0).records) == 4


def test_iu_xray_r2gen_annotation(tmp_path: Path, make_image, make_json):
    for view in ("0.png", "1.png"):
        make_image(tmp_path / "images" / "CXR1_1_IM-0001" / view)
    study = {"id": "CXR1_1_IM-0001", "report": "The heart is normal in size.",
             "image_path": ["CXR1_1_IM-0001/0.png", "CXR1_1_IM-0001/1.png"], "split": "train"}
    make_json(tmp_path / "annotation.json", {"train": [study], "val": [], "test": []})
    (record,) = load_source("iu_xray_r2gen", tmp_path, "train").records
    assert record.image.path.name == "0.png" and len(record.attributes["image_paths"]) == 2
    assert record.task == "caption" and record.target == "The heart is normal in size."
    assert load_source("iu_xray_r2gen", tmp_path, "validation").records == []


def test_medmnist_npz(tmp_path: Path):
    rng = np.random.default_rng(0)
    arrays = {f"{split}_{kind}": value for split, n in (("train", 3), ("val", 1), ("test", 2))
              for kind, value in (("images", rng.integers(0, 255, (n, 28, 28, 3), dtype=np.uint8)),
                                  ("labels", rng.integers(0, 9, (n, 1))))}
    np.savez(tmp_path / "pathmnist.npz", **arrays)
    records = load_source("medmnist", tmp_path / "pathmnist.npz", "train").records
    assert len(records) == 3 and records[0].candidates[0] == "adipose" and len(records[0].candidates) == 9
    assert records[1].target == records[1].candidates[int(arrays["train_labels"][1, 0])]
    from scaling.data.images import load_image

    assert np.array_equal(np.asarray(load_image(records[0].image)), arrays["train_images"][0])
    assert len(load_source("medmnist", tmp_path, "validation", flag="pathmnist").records) == 1
    named = load_source("medmnist", tmp_path / "pathmnist.npz", "test", class_names=[f"c{i}" for i in range(9)])
    assert named.records[0].candidates[0] == "c0"


def test_image_folder_with_and_without_split_folders(tmp_path: Path, make_image):
    for split, cls, name in (("train", "normal", "a.png"), ("train", "pneumonia", "b.jpg"),
                             ("val", "normal", "c.png"), ("test", "pneumonia", "d.png")):
        make_image(tmp_path / "tree" / split / cls / name)
    (tmp_path / "tree" / "train" / "normal" / "notes.txt").write_text("not an image")
    train = load_source("image_folder", tmp_path / "tree", "train")
    assert [(r.target, r.attributes["label"]) for r in train.records] == [("normal", 0), ("pneumonia", 1)]
    assert train.skipped == Counter({"not an image file": 1})
    assert train.records[0].candidates == ["normal", "pneumonia"]
    assert [r.target for r in load_source("image_folder", tmp_path / "tree", "validation").records] == ["normal"]
    make_image(tmp_path / "flat" / "benign_tumor" / "x.png")
    assert load_source("image_folder", tmp_path / "flat", "train").records[0].target == "benign tumor"
    with pytest.raises(SplitNotFound):
        load_source("image_folder", tmp_path / "flat", "test")


def test_mednli_jsonl_drops_unlabelled_pairs(tmp_path: Path):
    rows = [{"pairID": "p1", "sentence1": "Labs were normal.", "sentence2": "Labs normal.", "gold_label": "entailment"},
            {"pairID": "p2", "sentence1": "No fever.", "sentence2": "Febrile.", "gold_label": "contradiction"},
            {"pairID": "p3", "sentence1": "Has cough.", "sentence2": "Has flu.", "gold_label": "neutral"},
            {"pairID": "p4", "sentence1": "A.", "sentence2": "B.", "gold_label": "-"}]
    (tmp_path / "mli_dev_v1.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = load_source("mednli", tmp_path, "validation")
    assert [r.target for r in result.records] == ["yes", "no", "maybe"]
    assert result.skipped == Counter({"no gold label ('-')": 1})
    assert len(result.records) + result.n_skipped == len(rows)


def write_meqsum(file: Path, rows: list[tuple]) -> Path:
    workbook = openpyxl.Workbook()
    workbook.active.append(["File", "CHQ", "Summary"])
    for row in rows:
        workbook.active.append(list(row))
    workbook.save(file)
    return file


def test_meqsum_xlsx_80_10_10(tmp_path: Path):
    rows = [(f"{i}.xml.txt", f"SUBJECT: question {i}\nMESSAGE: long text {i}", f"What is {i}?") for i in range(10)]
    write_meqsum(tmp_path / "MeQSum_ACL2019_BenAbacha_Demner-Fushman.xlsx", rows)
    sizes = [len(load_source("meqsum", tmp_path, s).records) for s in ("train", "validation", "test")]
    assert sizes == [8, 1, 1]
    first = load_source("meqsum", tmp_path, "train").records[0]
    assert first.text["source"] == "SUBJECT: question 0 MESSAGE: long text 0" and first.target == "What is 0?"
    assert first.index == 2  # spreadsheet row number, header is row 1


def test_llava_med_splits_multi_turn_conversations(tmp_path: Path, make_image, make_json):
    make_image(tmp_path / "images" / "PMC1_fig1.jpg")
    make_json(tmp_path / "llava_med_instruct.json", [{
        "id": "PMC1", "image": "PMC1_fig1.jpg", "domain": {"chest_xray": False, "ct_scan": True},
        "conversations": [{"from": "human", "value": "<image>\nWhat modality is this?"},
                          {"from": "gpt", "value": "A CT scan."},
                          {"from": "human", "value": "Any abnormality?"},
                          {"from": "gpt", "value": "A mass in the left lobe."}]}])
    records = load_source("llava_med", tmp_path / "llava_med_instruct.json", "train").records
    assert [r.id for r in records] == ["PMC1-0", "PMC1-1"]
    assert records[0].text == {"question": "What modality is this?", "context": ""}
    assert records[1].text["context"] == "USER: What modality is this?\nASSISTANT: A CT scan."
    assert records[1].target == "A mass in the left lobe." and records[1].attributes["modality"] == "ct_scan"


# ---- BiomedGPT TSV ------------------------------------------------------------------------------------------------


def tsv_records(tmp_path: Path, make_image) -> dict[str, list[Record]]:
    """Records of every task, with real image files to embed."""
    jpg = ImageRef(make_image(tmp_path / "img.jpg"))
    png = ImageRef(make_image(tmp_path / "img.png", mode="L"))
    return {
        "vqa": [Record("q1", "vqa", jpg, {"question": "Is there a mass?", "object": "chest"}, "yes",
                       targets=["yes", "no"], attributes={"image_id": "img1", "answer_confidences": {"yes": 1.0,
                                                                                                      "no": 0.5}}),
                Record("q2", "vqa", png, {"question": "Which lobe?", "object": ""}, "left lower lobe")],
        "caption": [Record("c1", "caption", png, {}, "Heart normal.", targets=["Heart normal.", "No effusion."],
                           attributes={"image_id": "c1"})],
        "classify": [Record("m-0", "classify", jpg, {}, "debris", candidates=["adipose", "debris"]),
                     Record("m-1", "classify", png, {}, "adipose", candidates=["adipose", "debris"])],
        "nli": [Record("n-0", "nli", None, {"sentence1": "No fever.", "sentence2": "Afebrile."}, "yes",
                       attributes={"genre": "clinical"})],
        "summarize": [Record("s-0", "summarize", None, {"source": "My son has a rash, what cream?"}, "Rash cream?")],
        "qa": [Record("123", "qa", None, {"question": "Does it work?", "context": "It did."}, "maybe")],
    }


@pytest.mark.parametrize("task", list(biomedgpt_tsv.COLUMNS))
def test_biomedgpt_tsv_round_trip_is_lossless(tmp_path: Path, make_image, task: str):
    originals = tsv_records(tmp_path, make_image)[task]
    assert biomedgpt_tsv.write(originals, tmp_path / "out" / "train.tsv") == len(originals)
    lines = (tmp_path / "out" / "train.tsv").read_text().splitlines()
    assert len(lines) == len(originals) and all(len(line.split("\t")) == len(biomedgpt_tsv.COLUMNS[task])
                                                for line in lines)
    result = load_source("biomedgpt_tsv", tmp_path / "out", "train", task=task)
    assert result.n_skipped == 0
    for original, back in zip(originals, result.records, strict=True):
        assert (back.task, back.text, back.target, back.targets) == (task, original.text, original.target,
                                                                     original.targets)
        if task not in ("classify", "nli", "summarize"):  # these layouts have no id column
            assert back.id == original.id
        if original.image is not None:
            assert back.image.read_bytes() == original.image.read_bytes()  # byte-identical images
        if task == "vqa":
            default = {answer: 1.0 for answer in original.targets}
            assert back.attributes["answer_confidences"] == original.attributes.get("answer_confidences", default)


def test_biomedgpt_tsv_reads_biomedgpt_rows(tmp_path: Path, make_image):
    image = make_image(tmp_path / "x.jpg").read_bytes()
    b64 = base64.urlsafe_b64encode(image).decode()
    (tmp_path / "test.tsv").write_text(f"7\tsynpic1\tis this a ct?\t0.6|!+no&&1.0|!+yes\tchest\t{b64}\n")
    (record,) = load_source("biomedgpt_tsv", tmp_path, "test", task="vqa").records
    assert (record.target, record.targets, record.candidates) == ("yes", ["yes", "no"], ["no", "yes"])
    assert record.image.read_bytes() == image
    (tmp_path / "trainval_ans2label.pkl").write_bytes(pickle.dumps({"yes": 0, "no": 1, "Left Lobe": 2}))
    with_table = load_source("biomedgpt_tsv", tmp_path, "test", task="vqa",
                             ans2label=str(tmp_path / "trainval_ans2label.pkl"))
    assert with_table.records[0].candidates == ["left lobe", "no", "yes"]
    (tmp_path / "val.tsv").write_text(f"{b64}\t3\tlymphocytes\n{b64}\t0\tadipose\n")
    classify = load_source("biomedgpt_tsv", tmp_path, "validation", task="classify").records
    assert classify[0].candidates == ["adipose", "lymphocytes"]


def test_biomedgpt_tsv_write_refuses_mixed_tasks(tmp_path: Path, make_image):
    records = tsv_records(tmp_path, make_image)
    with pytest.raises(DataError, match="one TSV holds one task"):
        biomedgpt_tsv.write(records["nli"] + records["qa"], tmp_path / "mixed.tsv")


# ---- cache, inspect, convert ------------------------------------------------------------------------------------


def test_cache_returns_equal_records_and_follows_file_changes(vqa_rad_fixture: Path, tmp_path: Path):
    import os

    cache = tmp_path / "cache"
    first = load_source("vqa_rad", vqa_rad_fixture, "train", cache_dir=cache)
    assert first.records == load_source("vqa_rad", vqa_rad_fixture, "train").records
    file = vqa_rad_fixture / "VQA_RAD Dataset Public.json"
    stat = file.stat()
    file.write_text(file.read_text().replace("Is the brain", "Is the BRAIN"))  # same size
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    cached = load_source("vqa_rad", vqa_rad_fixture, "train", cache_dir=cache)
    assert cached.records == first.records  # same name, size and time: served from the cache
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    fresh = load_source("vqa_rad", vqa_rad_fixture, "train", cache_dir=cache)
    assert fresh.records[0].text["question"] == "Is the BRAIN normal?"
    assert len(list(cache.iterdir())) == 2


def test_cache_keeps_embedded_images_and_skip_counts(tmp_path: Path):
    (tmp_path / "train.tsv").write_text(f"{base64.b64encode(b'abc').decode()}\t0\tadipose\nbroken row\n")
    first = load_source("biomedgpt_tsv", tmp_path, "train", task="classify", cache_dir=tmp_path / "c")
    again = load_source("biomedgpt_tsv", tmp_path, "train", task="classify", cache_dir=tmp_path / "c")
    assert again.records == first.records and again.records[0].image.read_bytes() == b"abc"
    assert again.skipped == first.skipped == Counter({"wrong column count": 1})


def test_inspect_counts_and_formats_samples(vqa_rad_fixture: Path):
    from scaling.data.sources.summary import inspect_source

    train, test = inspect_source("vqa_rad", vqa_rad_fixture, n_samples=5)
    assert (train.n_records, test.n_records) == (3, 1)
    assert train.answer_types == Counter({"CLOSED": 2, "OPEN": 1})
    assert train.samples[0] == ("0", " is the brain normal?", " yes")
    (missing,) = inspect_source("slake", vqa_rad_fixture, ["test"])
    assert missing.missing and "test" in missing.missing


def test_cli_inspect_and_convert_round_trip(vqa_rad_fixture: Path, tmp_path: Path, capsys):
    from scaling.cli import main

    assert main(["data", "inspect", "vqa_rad", "--path", str(vqa_rad_fixture), "--split", "train"]) == 0
    shown = capsys.readouterr().out
    assert "vqa_rad: splits" in shown and "CLOSED 2" in shown and "' is the brain normal?'" in shown
    out = tmp_path / "out" / "train.tsv"
    assert main(["data", "convert", "vqa_rad", "--path", str(vqa_rad_fixture), "--to", "tsv", "--out", str(out)]) == 0
    back = load_source("biomedgpt_tsv", out.parent, "train", task="vqa").records
    original = load_source("vqa_rad", vqa_rad_fixture, "train").records
    assert [(r.id, r.target) for r in back] == [(r.id, r.target) for r in original]
    assert back[0].image.read_bytes() == original[0].image.read_bytes()
    assert main(["data", "inspect", "vqa_rad", "--path", str(tmp_path / "absent")]) == 2
    assert "dataset path not found" in capsys.readouterr().err


def test_convert_to_instructions_reads_back_as_llava_med(vqa_rad_fixture: Path, tmp_path: Path):
    from scaling.data.sources.summary import convert_source

    written = convert_source("vqa_rad", vqa_rad_fixture, "train", "instruct", tmp_path / "instruct" / "train.json")
    assert written["rows"] == 3 and written["reload"]["source"] == "llava_med"
    back = load_source("llava_med", tmp_path / "instruct" / "train.json", "train").records
    assert [r.target for r in back] == ["yes", "2", "yes"]
    assert [r.answer_type for r in back] == ["CLOSED", "OPEN", "CLOSED"]
    assert all(r.image.path.is_file() for r in back)


def test_llava_med_bad_conversations_are_skipped_not_fatal(tmp_path: Path, make_json, make_image):
    make_image(tmp_path / "images" / "f.png")
    exchange = [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "That."}]
    make_json(tmp_path / "train.json", [
        {"id": "a", "image": "f.png", "conversations": [{"from": "human", "value": "Hi?"}]},
        {"id": "b", "image": "f.png", "conversations": exchange},
        {"id": "c", "conversations": exchange}])
    result = load_source("llava_med", tmp_path, "train")
    assert [r.id for r in result.records] == ["b-0"]
    assert result.skipped == Counter({"missing answer": 1, "missing image": 1})


def test_source_problems_are_found_before_reading():
    from scaling.data.sources import source_problems

    assert source_problems("vqa_rad", "train", {}) == []
    problems = source_problems("biomedgpt_tsv", "dev", {"q_lang": "en"})
    assert len(problems) == 3 and "no split 'dev'" in problems[0] and "q_lang" in problems[1]
    assert "needs options.task" in problems[2]
