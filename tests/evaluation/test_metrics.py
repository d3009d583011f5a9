"""Metric values against hand-computed ones, and the text metrics against the libraries called directly."""

import shutil

import pytest

from scaling.data.records import CLOSED, OPEN, Record
from scaling.data.tasks import get_task
from scaling.evaluation.metrics import (
    bioclean,
    clean_text,
    coco_tokenize,
    compute_metrics,
    macro_f1,
    normalize_vqa_answer,
)


def _record(i, target, task="vqa", answer_type=None, targets=None, **attributes):
    return Record(id=str(i), task=task, image=None, text={}, target=target, targets=targets or [],
                  answer_type=answer_type, attributes=attributes)


@pytest.mark.parametrize("raw, normalised", [
    ("Yes", "yes"),
    ("  The X-ray. ", "x ray"),
    ("x - ray", "x ray"),
    ("Two lesions", "2 lesions"),
    ("1.5 cm", "1.5 cm"),
    ("left lung.", "left lung"),
    ("an MRI, T2-weighted", "mri t2 weighted"),
])
def test_vqa_normalisation(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


def test_vqa_accuracy_splits_and_groups_by_hand():
    records = [
        _record(0, "Yes", answer_type=CLOSED, category="PRES", organ="HEAD"),
        _record(1, "no", answer_type=CLOSED, category="PRES, POS", organ="CHEST"),
        _record(2, "no", answer_type=CLOSED, category="SIZE", organ="CHEST"),
        _record(3, "left", answer_type=CLOSED, category="POS", organ="CHEST"),  # closed but not yes/no
        _record(4, "MRI", answer_type=OPEN, category="MODALITY", organ="HEAD"),
        _record(5, "two", answer_type=OPEN, category="COUNT", organ="HEAD"),
        _record(6, "brain", answer_type=OPEN, category="ORGAN", organ="HEAD", targets=["brain", "cerebrum"]),
    ]
    predictions = ["yes", "yes", "maybe", "Left.", "ct", "2", "Cerebrum"]
    result = compute_metrics("vqa", predictions, records)
    # hits: 1 0 0 1 | 0 1 1
    assert result["scores"]["accuracy"] == pytest.approx(100 * 4 / 7)
    assert result["scores"]["closed_accuracy"] == pytest.approx(50.0)
    assert result["scores"]["open_accuracy"] == pytest.approx(100 * 2 / 3)
    assert result["scores"]["yes_no_accuracy"] == pytest.approx(100 / 3)
    assert result["scores"]["non_yes_no_accuracy"] == pytest.approx(75.0)
    assert result["counts"] == {"accuracy": 7, "closed_accuracy": 4, "open_accuracy": 3, "yes_no_accuracy": 3,
                                "non_yes_no_accuracy": 4}
    category = result["groups"]["category"]
    assert category["PRES"] == {"accuracy": 50.0, "n": 2}
    assert category["POS"] == {"accuracy": 50.0, "n": 2}  # record 1 counts toward PRES and POS
    assert category["SIZE"] == {"accuracy": 0.0, "n": 1}
    assert result["groups"]["organ"]["HEAD"] == {"accuracy": 75.0, "n": 4}
    assert "modality" not in result["groups"]
    # rows yes/no references, columns yes/no/other predictions
    assert result["confusion"]["matrix"] == [[1, 0, 0], [1, 0, 1]]


def test_label_accuracy_and_macro_f1_by_hand():
    """Macro-F1 as scikit-learn's f1_score(average='macro') by default: the classes of references and predictions."""
    records = [_record(i, t, task="nli") for i, t in enumerate(["yes", "yes", "no", "no", "maybe", "maybe"])]
    predictions = ["yes", "no", "no", "no", "yes", "garbage"]
    result = compute_metrics("nli", predictions, records)
    assert result["scores"]["accuracy"] == pytest.approx(50.0)
    # yes: tp 1, pred 2, ref 2 -> 0.5; no: tp 2, pred 3, ref 2 -> 0.8; maybe: 0; garbage: predicted once, never right
    assert result["per_class"] == pytest.approx({"yes": 0.5, "no": 0.8, "maybe": 0.0, "garbage": 0.0})
    assert result["scores"]["macro_f1"] == pytest.approx(100 * 1.3 / 4)
    assert "scikit-learn" in result["definition"]
    assert macro_f1(["a", "b"], ["a", "b"]) == 1.0


CAPTIONS = ["the heart is enlarged", "no acute disease", "small left pleural effusion noted", "lungs are clear"]
REFERENCES = [["The heart is enlarged.", "Cardiomegaly is present."], ["No acute cardiopulmonary disease."],
              ["Small left pleural effusion.", "Left effusion, small."], ["The lungs are clear"]]


def _caption_records():
    return [_record(i, refs[0], task="caption", targets=refs) for i, refs in enumerate(REFERENCES)]


def test_decimals_survive_cleaning():
    """"1.5 cm" is not "15 cm": in the text metrics, the caption targets and COCO's tokenisation alike."""
    assert clean_text("Effusion of 1.5 cm, x-ray.") == "effusion of 1.5 cm xray"
    assert get_task("caption").target(_record(0, "Nodule: 1.5 cm.", task="caption")) == " nodule 1.5 cm"
    assert normalize_vqa_answer("1.5 cm.") == "1.5 cm"
    assert bioclean("Nodule 1.5 cm.") == "nodule 15 cm"  # BiomedGPT's own cleaning, reproduced as its scorer


def test_summary_metrics_equal_the_libraries():
    from pycocoevalcap.cider.cider import Cider
    from rouge_score.rouge_scorer import RougeScorer
    from sacrebleu.metrics import BLEU

    scores = compute_metrics("summarize", CAPTIONS, _caption_records())["scores"]
    hyps = [clean_text(c) for c in CAPTIONS]
    refs = [[clean_text(r) for r in rs] for rs in REFERENCES]

    streams = [[rs[0] for rs in refs], [rs[1] if len(rs) > 1 else None for rs in refs]]
    for n in range(1, 5):
        assert scores[f"bleu_{n}"] == pytest.approx(BLEU(max_ngram_order=n).corpus_score(hyps, streams).score)

    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for ours, theirs in (("rouge_1", "rouge1"), ("rouge_2", "rouge2"), ("rouge_l", "rougeL")):
        expected = sum(max(scorer.score(r, h)[theirs].fmeasure for r in rs) for h, rs in zip(hyps, refs, strict=True)) / len(hyps)
        assert scores[ours] == pytest.approx(100 * expected)

    cider, _ = Cider().compute_score({i: rs for i, rs in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)})
    assert scores["cider"] == pytest.approx(100 * cider)


def test_text_metrics_perfect_prediction_by_hand():
    records = _caption_records()
    scores = compute_metrics("summarize", [r.targets[0] for r in records], records)["scores"]
    assert scores["bleu_1"] == pytest.approx(100.0) and scores["bleu_4"] == pytest.approx(100.0)
    assert scores["rouge_1"] == pytest.approx(100.0) and scores["rouge_l"] == pytest.approx(100.0)


def test_compute_metrics_refuses_misaligned_or_unlabelled_input():
    with pytest.raises(ValueError, match="pair up"):
        compute_metrics("vqa", ["yes"], [])
    with pytest.raises(ValueError, match="no reference"):
        compute_metrics("vqa", ["yes"], [_record(0, None)])
    with pytest.raises(KeyError, match="known tasks"):
        compute_metrics("detect", ["x"], [_record(0, "x")])


def test_answer_confidences_give_biomedgpt_credit():
    """BiomedGPT TSV answers carry confidences; the score is the predicted answer's confidence."""
    record = _record(0, "ct", answer_type=OPEN, targets=["ct", "CT scan"],
                     answer_confidences={"ct": 1.0, "CT scan": 0.5})
    scores = [compute_metrics("vqa", [p], [record])["scores"]["accuracy"] for p in ("ct", "ct scan", "mri")]
    assert scores == [100.0, 50.0, 0.0]


needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="COCO's PTBTokenizer needs a Java runtime")


@needs_java
def test_caption_metrics_are_the_coco_protocol():
    """pycocoevalcap as COCOEvalCap runs it: PTBTokenizer on both sides, then BLEU, ROUGE-L (β=1.2), CIDEr-D."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    result = compute_metrics("caption", CAPTIONS, _caption_records())
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(REFERENCES)})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in enumerate(CAPTIONS)})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    expected = {**{f"bleu_{n}": 100 * b for n, b in enumerate(bleu, start=1)},
                "rouge_l": 100 * Rouge().compute_score(gts, res)[0], "cider": 100 * Cider().compute_score(gts, res)[0]}
    assert result["scores"] == pytest.approx(expected)
    assert "PTBTokenizer" in result["definition"] and "β=1.2" in result["definition"]
    assert coco_tokenize(["Nodule of 1.5 cm."])[0] == ["nodule of 1.5 cm"]
    # BiomedGPT's metric_caption.py on the same predictions: _bioclean, no tokenizer, ROUGE-L and CIDEr
    gts = {i: [bioclean(r) for r in refs] for i, refs in enumerate(REFERENCES)}
    res = {i: [bioclean(c)] for i, c in enumerate(CAPTIONS)}
    assert result["scorers"]["biomedgpt"]["scores"] == pytest.approx(
        {"rouge_l": 100 * Rouge().compute_score(gts, res)[0], "cider": 100 * Cider().compute_score(gts, res)[0]})


def test_caption_metrics_say_so_when_java_is_missing(monkeypatch):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    def no_java(self, captions):
        raise FileNotFoundError("[Errno 2] No such file or directory: 'java'")

    monkeypatch.setattr(PTBTokenizer, "tokenize", no_java)
    result = compute_metrics("caption", CAPTIONS, _caption_records())
    assert "could not run" in result["definition"] and "clean_text" in result["definition"]
    assert coco_tokenize(["Nodule of 1.5 cm."])[0] == ["nodule of 1.5 cm"]
