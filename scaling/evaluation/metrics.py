"""Task metrics: VQA exact match with open / closed / per-category splits, label accuracy and macro-F1, and text
metrics from the kept libraries (sacrebleu BLEU-1..4, rouge-score ROUGE-1/2/L, pycocoevalcap CIDEr-D).

    result = compute_metrics("vqa", predictions, records)
    result["scores"]   # {"accuracy": 61.2, "closed_accuracy": 72.4, "open_accuracy": 44.1, "yes_no_accuracy": ...}
    result["counts"]   # samples behind each score
    result["groups"]   # {"category": {"PRES": {"accuracy": 70.0, "n": 163}, ...}, "organ": {...}}

Every score is a percentage (0-100; CIDEr-D ×100 as COCO reports it). Only the VQA answer normalisation and the
splits are written here; BLEU, ROUGE and CIDEr-D are the libraries' own computations.
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from collections.abc import Sequence

from scaling.data.records import CLOSED, OPEN, Record

GROUP_KEYS = ("category", "organ", "modality")
"""Record attributes that VQA scores are broken down by when records carry them (VQA-RAD's question category...)."""

YES_NO = ("yes", "no")
OTHER = "other"

_ARTICLES = {"a", "an", "the"}
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_PUNCT_EXCEPT_DOT = re.compile("[" + re.escape(string.punctuation.replace(".", "")) + "]")
_DOT_OUTSIDE_NUMBER = re.compile(r"(?<!\d)\.|\.(?!\d)")


def normalize_vqa_answer(text: str) -> str:
    """The form two VQA answers are compared in: "The X-ray, 2 lesions." and "x ray 2 lesions" are equal.

    Steps, in order: lowercase; every punctuation character becomes a space, except a dot inside a number
    ("1.5 cm" keeps it); number words zero..twenty become digits ("two" = "2"); the articles a/an/the are dropped;
    whitespace is collapsed. Hyphens become spaces, so "x-ray", "x - ray" (WordPiece spacing) and "x ray" match.
    """
    text = _PUNCT_EXCEPT_DOT.sub(" ", str(text).lower())
    text = _DOT_OUTSIDE_NUMBER.sub(" ", text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def clean_text(text: str) -> str:
    """Caption/summary text as BiomedGPT's metric scripts see it (`_bioclean`): lowercase, punctuation removed."""
    return " ".join(str(text).lower().translate(str.maketrans("", "", string.punctuation)).split())


def _percent(hits: float, n: int) -> float:
    return 100.0 * hits / n if n else 0.0


# ---------------------------------------------------------------------------------------------------------------------
# VQA: exact match, open / closed / yes-no, per group


def vqa_credit(prediction: str, record: Record) -> float:
    """1 when the normalised prediction equals a normalised reference, else 0.

    Records that carry per-answer confidences (BiomedGPT TSV answers `conf|!+answer`) give that confidence
    instead, as BiomedGPT's `ref_dict.get(hyp, 0)` does.
    """
    predicted = normalize_vqa_answer(prediction)
    confidences = record.attributes.get("answer_confidences")
    if confidences:
        return max((float(c) for a, c in confidences.items() if normalize_vqa_answer(a) == predicted), default=0.0)
    return float(predicted in {normalize_vqa_answer(t) for t in record.targets})


def vqa_hits(predictions: Sequence[str], records: Sequence[Record]) -> list[bool]:
    """Whether each prediction earned any credit (the sample table's right/wrong)."""
    return [vqa_credit(p, r) > 0 for p, r in zip(predictions, records, strict=True)]


def vqa_metrics(predictions: Sequence[str], records: Sequence[Record],
                group_keys: Sequence[str] = GROUP_KEYS) -> dict:
    """Exact-match accuracy overall, on OPEN and CLOSED questions, on yes/no references (MILE's closed view), per group.

    Open/closed follows each record's `answer_type` (the dataset's own label). `yes_no_accuracy` counts only
    questions whose reference is yes or no, as MILE's ACC.py does (a prediction that is not yes/no is wrong), and
    `non_yes_no_accuracy` the rest (MILE's "Opened"); their count-weighted mean, MILE's "Global", is `accuracy`.
    A record in several categories ("POS, PRES" in VQA-RAD) counts toward each.
    """
    hits = [vqa_credit(p, r) for p, r in zip(predictions, records, strict=True)]
    splits = {"": [True] * len(records),
              "closed_": [r.answer_type == CLOSED for r in records],
              "open_": [r.answer_type == OPEN for r in records],
              "yes_no_": [normalize_vqa_answer(r.target) in YES_NO for r in records],
              "non_yes_no_": [normalize_vqa_answer(r.target) not in YES_NO for r in records]}
    scores, counts = {}, {}
    for prefix, member in splits.items():
        n = sum(member)
        if prefix and not n:
            continue
        scores[f"{prefix}accuracy"] = _percent(sum(h for h, m in zip(hits, member, strict=True) if m), n)
        counts[f"{prefix}accuracy"] = n
    return {"scores": scores, "counts": counts, "groups": _group_accuracy(hits, records, group_keys),
            "confusion": closed_confusion(predictions, records)}


def _group_values(record: Record, key: str) -> list[str]:
    value = record.attributes.get(key)
    if value is None or value == "":
        return []
    values = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(v).strip() for v in values if str(v).strip()]


def _group_accuracy(hits: Sequence[float], records: Sequence[Record], keys: Sequence[str]) -> dict:
    """{key: {value: {"accuracy": %, "n": count}}} for each attribute key some record carries."""
    groups = {}
    for key in keys:
        tally: dict[str, list[float]] = defaultdict(lambda: [0, 0])
        for hit, record in zip(hits, records, strict=True):
            for value in _group_values(record, key):
                tally[value][0] += hit
                tally[value][1] += 1
        if tally:
            groups[key] = {v: {"accuracy": _percent(h, n), "n": n} for v, (h, n) in sorted(tally.items())}
    return groups


def closed_confusion(predictions: Sequence[str], records: Sequence[Record]) -> dict:
    """Reference × prediction counts over yes/no-reference questions; predictions that are neither fall in "other"."""
    labels = [*YES_NO, OTHER]
    matrix = [[0] * len(labels) for _ in YES_NO]
    for prediction, record in zip(predictions, records, strict=True):
        reference = normalize_vqa_answer(record.target)
        if reference in YES_NO:
            predicted = normalize_vqa_answer(prediction)
            matrix[YES_NO.index(reference)][labels.index(predicted if predicted in YES_NO else OTHER)] += 1
    return {"rows": list(YES_NO), "columns": labels, "matrix": matrix}


# ---------------------------------------------------------------------------------------------------------------------
# Labels: classification, NLI, text QA


def label_metrics(predictions: Sequence[str], records: Sequence[Record]) -> dict:
    """Accuracy and macro-F1 over normalised labels.

    Macro-F1 averages the per-class F1 over the classes of the references (a prediction outside them is a miss
    for its reference's class, not a new class), so free-text garbage cannot add zero-F1 classes.
    """
    predicted = [normalize_vqa_answer(p) for p in predictions]
    reference = [normalize_vqa_answer(r.target) for r in records]
    n = len(reference)
    hits = sum(p == r for p, r in zip(predicted, reference, strict=True))
    return {"scores": {"accuracy": _percent(hits, n), "macro_f1": 100.0 * macro_f1(predicted, reference)},
            "counts": {"accuracy": n, "macro_f1": n}, "groups": {}, "per_class": per_class_f1(predicted, reference)}


def per_class_f1(predicted: Sequence[str], reference: Sequence[str]) -> dict[str, float]:
    """F1 of each reference class (0 when the class is never predicted correctly)."""
    true_pos, pred_count, ref_count = Counter(), Counter(predicted), Counter(reference)
    for p, r in zip(predicted, reference, strict=True):
        true_pos[r] += p == r
    out = {}
    for label in sorted(ref_count):
        denominator = pred_count[label] + ref_count[label]
        out[label] = 2.0 * true_pos[label] / denominator if denominator else 0.0
    return out


def macro_f1(predicted: Sequence[str], reference: Sequence[str]) -> float:
    """Unweighted mean of the per-class F1 (a fraction in [0, 1])."""
    f1 = per_class_f1(predicted, reference)
    return sum(f1.values()) / len(f1) if f1 else 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Text: captions and summaries


def bleu_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4 from sacrebleu (cumulative n-gram orders, its default 13a tokenisation and smoothing)."""
    from sacrebleu.metrics import BLEU

    most = max(len(r) for r in references)
    # sacrebleu wants one stream per reference position; None pads samples with fewer references
    streams = [[r[i] if i < len(r) else None for r in references] for i in range(most)]
    return {f"bleu_{n}": BLEU(max_ngram_order=n).corpus_score(list(hypotheses), streams).score for n in range(1, 5)}


def rouge_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure from rouge-score with its Porter stemmer; the best reference counts per sample."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = Counter()
    for hypothesis, refs in zip(hypotheses, references, strict=True):
        for name, score in scorer.score_multi(list(refs), hypothesis).items():
            totals[name] += score.fmeasure
    n = max(len(hypotheses), 1)
    return {"rouge_1": 100.0 * totals["rouge1"] / n, "rouge_2": 100.0 * totals["rouge2"] / n,
            "rouge_l": 100.0 * totals["rougeL"] / n}


def cider_d(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """CIDEr-D ×100 from pycocoevalcap's CiderScorer (clipped tf-idf n-grams, Gaussian length penalty, sigma 6).

    Its inputs are space-tokenised strings; `clean_text` stands in for the COCO PTB (Java) tokenizer. Document
    frequencies come from this corpus's references, so one sample alone scores 0 (log 1 = 0).
    """
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    scorer = CiderScorer(n=4, sigma=6.0)
    for hypothesis, refs in zip(hypotheses, references, strict=True):
        scorer += (hypothesis, list(refs))
    score, _ = scorer.compute_score()
    return 100.0 * float(score)


def text_metrics(predictions: Sequence[str], records: Sequence[Record]) -> dict:
    """BLEU-1..4, ROUGE-1/2/L and CIDEr-D on cleaned text (lowercase, no punctuation) against every reference."""
    hypotheses = [clean_text(p) for p in predictions]
    references = [[clean_text(t) for t in r.targets] for r in records]
    scores = {**bleu_scores(hypotheses, references), **rouge_scores(hypotheses, references),
              "cider": cider_d(hypotheses, references)}
    return {"scores": scores, "counts": dict.fromkeys(scores, len(records)), "groups": {}}


# ---------------------------------------------------------------------------------------------------------------------
# Dispatch

METRIC_FAMILIES = {"vqa": vqa_metrics, "classify": label_metrics, "nli": label_metrics, "qa": label_metrics,
                   "caption": text_metrics, "summarize": text_metrics}


def compute_metrics(task: str, predictions: Sequence[str], records: Sequence[Record]) -> dict:
    """Scores of one task's predictions against its records (same order): {"scores", "counts", "groups", ...}."""
    if task not in METRIC_FAMILIES:
        raise KeyError(f"no metrics for task {task!r}; known tasks: {', '.join(METRIC_FAMILIES)}")
    if len(predictions) != len(records):
        raise ValueError(f"{task}: {len(predictions)} predictions for {len(records)} records; they must pair up")
    if not records:
        raise ValueError(f"{task}: no records to score")
    unlabeled = [r.id for r in records if r.target is None]
    if unlabeled:
        raise ValueError(f"{task}: {len(unlabeled)} record(s) have no reference answer (first: {unlabeled[0]!r}); "
                         "evaluate on a labelled split")
    return {"task": task, "n": len(records), **METRIC_FAMILIES[task](predictions, records)}


def sample_hits(task: str, predictions: Sequence[str], records: Sequence[Record]) -> list[bool | None]:
    """Per-sample correctness for exact-match tasks (VQA, labels); None for generated text, which has no verdict."""
    if task == "vqa":
        return vqa_hits(predictions, records)
    if METRIC_FAMILIES.get(task) is label_metrics:
        return [normalize_vqa_answer(p) == normalize_vqa_answer(r.target)
                for p, r in zip(predictions, records, strict=True)]
    return [None] * len(records)
