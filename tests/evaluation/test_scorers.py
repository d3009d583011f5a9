"""The published VQA protocols as named scorers, computed together from one set of predictions.

Each expected value below is worked out by hand from the named script's rules (cited per case), so a scorer that
drifts from its reference fails here: LLaVA-Med v1.0.0 llava/eval/run_eval.py with eval_metrics/ (normalize_word,
calculate_f1score, calculate_appearance_with_normalization), BiomedGPT's `ref_dict.get(hyp, 0)`, MILE's ACC.py.
"""

import pytest

from scaling.data.records import CLOSED, OPEN, Record
from scaling.evaluation.metrics import compute_metrics, llava_med_normalize, llava_med_recall

CANDIDATES = ["left lung", "right lung", "2", "x ray", "1.5 cm", "lung"]
# (answer type, reference, prediction)
CASES = [
    (OPEN, "left lung", "The left lung."),      # a: article and final dot dropped -> recall 1, candidate 'left lung'
    (OPEN, "left lung", "lung lung lung"),      # b: tp counts the prediction's 3 'lung' -> 3 / (3 + 1) = 0.75
    (OPEN, "two", "2 lesions"),                 # c: 'two' -> '2' -> recall 1; candidate '2' wins
    (OPEN, "x-ray", "xray"),                    # d: '-' becomes a space: 'x ray' vs 'xray' -> 0
    (OPEN, "1.5 cm", "1.5cm"),                  # e: the dot before a digit stays; '1.5cm' is one word -> 0
    (CLOSED, "yes", "yes"),                     # f: hit
    (CLOSED, "no", "normal"),                   # g: 'no' occurs in 'normal' (substring test) -> hit
    (CLOSED, "yes", "no, it is not"),           # h: contains 'no' but not 'yes' -> miss
    (CLOSED, "left", "left"),                   # i: neither 'yes' nor 'no' in the prediction -> miss
    (CLOSED, "No", "no"),                       # j: both lowercased first -> hit
]


def _records():
    return [Record(id=str(i), task="vqa", image=None, text={"question": "q?"}, target=reference,
                   candidates=CANDIDATES, answer_type=kind) for i, (kind, reference, _) in enumerate(CASES)]


@pytest.fixture(scope="module")
def result():
    return compute_metrics("vqa", [prediction for _, _, prediction in CASES], _records())


@pytest.mark.parametrize("text, normalised", [
    ("The left lung.", "left lung"),
    ("x-ray", "x ray"),                # no space next to '-': replaced by a space
    ("x - ray", "x ray"),              # a space next to '-': deleted
    ("1,000 cells", "1000 cells"),     # a comma between digits: every listed character is deleted
    ("None", "0"),
    ("3.", "3"),
    ("1.5 cm", "1.5 cm"),
])
def test_llava_med_normalize_word(text, normalised):
    assert llava_med_normalize(text) == normalised


def test_llava_med_recall_counts_the_predictions_repeats():
    assert llava_med_recall("lung lung lung", "left lung") == pytest.approx(0.75)
    assert llava_med_recall("", "left lung") == 0.0


def test_llava_med_run_eval(result):
    scorer = result["scorers"]["llava_med"]
    assert scorer["scores"] == pytest.approx({"open_recall": 100 * (1 + 0.75 + 1 + 0 + 0) / 5,
                                              "open_candidate_accuracy": 100 * 2 / 5,  # a and c
                                              "closed_accuracy": 100 * 3 / 5})     # f, g and j
    assert scorer["counts"] == {"open_recall": 5, "open_candidate_accuracy": 5, "closed_accuracy": 5}
    assert "run_eval.py" in scorer["definition"]


def test_biomedgpt_exact_string(result):
    # only f ('yes' == 'yes') and i ('left' == 'left'); 'no' is not 'No', 'The left lung.' is not 'left lung'
    assert result["scorers"]["biomedgpt"]["scores"] == pytest.approx(
        {"accuracy": 20.0, "closed_accuracy": 40.0, "open_accuracy": 0.0})


def test_mile_closed_is_yes_no_references_only(result):
    # Closed: f, g, h, j (references yes/no); hits f and j. Opened: a, b, c, d, e, i with the toolkit's rule: a and i
    assert result["scorers"]["mile"]["scores"] == pytest.approx({"closed": 50.0, "opened": 100 * 2 / 6,
                                                                 "global": 40.0})
    assert result["scorers"]["mile"]["counts"] == {"closed": 4, "opened": 6, "global": 10}


def test_the_toolkit_scores_the_same_predictions(result):
    # a, f, i, j: normalised exact match ('The left lung.' = 'left lung'; 'no' = 'No')
    assert result["scores"]["accuracy"] == pytest.approx(40.0)
    assert (result["scores"]["closed_accuracy"], result["scores"]["open_accuracy"]) == pytest.approx((60.0, 20.0))
    assert "dot inside a number" in result["definition"]
