"""Task metrics, each with its definition: the toolkit's scores, and the field's other protocols computed from the same
predictions (named scorers), so numbers can be put beside published ones.

    result = compute_metrics("vqa", predictions, records)
    result["scores"]       # {"accuracy": 61.2, "closed_accuracy": 72.4, "open_accuracy": 44.1, "yes_no_accuracy": ...}
    result["definition"]   # how those were computed (normalisation, matching)
    result["counts"]       # samples behind each score
    result["groups"]       # {"category": {"PRES": {"accuracy": 70.0, "n": 163}, ...}, "organ": {...}}
    result["scorers"]      # {"biomedgpt": {"definition", "scores", "counts"}, "llava_med": ..., "mile": ...}

Every score is a percentage (0-100; CIDEr-D ×100 as COCO reports it). Written here: the VQA answer normalisation,
the splits, and the published scorers' matching rules (each reproduced from the named script). BLEU, ROUGE, CIDEr-D
and COCO's tokenizer are the libraries' own computations.
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

from scaling.data.records import CLOSED, OPEN, Record
from scaling.data.tasks import strip_punctuation
from scaling.logging import get_logger

log = get_logger(__name__)

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

VQA_DEFINITION = (
    "Exact match after normalising prediction and references alike: lowercase; every punctuation character becomes "
    "a space, except a dot inside a number ('1.5 cm' keeps it); number words zero-twenty become digits; the articles "
    "a/an/the are dropped; whitespace is collapsed. A prediction earns 1 when it equals any reference, or the "
    "reference's confidence when the dataset gives one (BiomedGPT TSV `conf|!+answer`). closed/open follow the "
    "dataset's answer_type; yes_no/non_yes_no split by whether the reference is yes or no; a record in several "
    "categories counts toward each.")
LABEL_DEFINITION = (
    "Labels compared after the VQA normalisation. accuracy: exact match. macro_f1: unweighted mean of the per-class "
    "F1 over every class found in the references or the predictions (scikit-learn's f1_score(average='macro') "
    "default; a predicted label outside the references is a class with F1 0).")
TEXT_DEFINITION = (
    "On text lowercased with punctuation removed (a dot inside a number kept: '1.5 cm'): BLEU-1..4 from sacrebleu "
    "(corpus, 13a tokenisation, its default smoothing), ROUGE-1/2/L F-measure from rouge-score (Porter stemmer, the "
    "best reference per sample, as BiomedGPT's eval_rouge.py), CIDEr-D from pycocoevalcap's scorer (document "
    "frequencies from this corpus's references).")


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
    """Caption/summary text as the text metrics see it: lowercase, punctuation removed except a dot inside a number."""
    return " ".join(strip_punctuation(str(text).lower()).split())


def _percent(hits: float, n: int) -> float:
    return 100.0 * hits / n if n else 0.0


def _split_scores(values: Sequence[float], members: dict[str, Sequence[bool]]) -> tuple[dict, dict]:
    """Mean value (%) over each named subset that has members: ({name: score}, {name: count})."""
    scores, counts = {}, {}
    for name, member in members.items():
        n = sum(member)
        if n:
            scores[name] = _percent(sum(v for v, m in zip(values, member, strict=True) if m), n)
            counts[name] = n
    return scores, counts


def _answer_type_splits(records: Sequence[Record], prefix: str = "") -> dict[str, list[bool]]:
    return {f"{prefix}accuracy": [True] * len(records),
            f"{prefix}closed_accuracy": [r.answer_type == CLOSED for r in records],
            f"{prefix}open_accuracy": [r.answer_type == OPEN for r in records]}


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


def vqa_scores(predictions: Sequence[str], records: Sequence[Record]) -> tuple[dict, dict]:
    """The toolkit's VQA scores and their counts: overall, closed/open (answer_type), yes-no/other (reference)."""
    credits = [vqa_credit(p, r) for p, r in zip(predictions, records, strict=True)]
    yes_no = [normalize_vqa_answer(r.target) in YES_NO for r in records]
    return _split_scores(credits, {**_answer_type_splits(records), "yes_no_accuracy": yes_no,
                                   "non_yes_no_accuracy": [not y for y in yes_no]})


def vqa_metrics(predictions: Sequence[str], records: Sequence[Record],
                group_keys: Sequence[str] = GROUP_KEYS) -> dict:
    """Exact-match accuracy overall, on OPEN and CLOSED questions, on yes/no references, per group; plus the
    published protocols (`VQA_SCORERS`) on the same predictions."""
    scores, counts = vqa_scores(predictions, records)
    credits = [vqa_credit(p, r) for p, r in zip(predictions, records, strict=True)]
    return {"definition": VQA_DEFINITION, "scores": scores, "counts": counts,
            "groups": _group_accuracy(credits, records, group_keys),
            "confusion": closed_confusion(predictions, records), "scorers": run_scorers(VQA_SCORERS, predictions,
                                                                                      records)}


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
# VQA: the published protocols, as named scorers on the same predictions


def biomedgpt_vqa(predictions: Sequence[str], records: Sequence[Record]) -> tuple[dict, dict]:
    """BiomedGPT's `ref_dict.get(hyp, 0)`: the prediction string must equal a reference string exactly."""
    credits = []
    for prediction, record in zip(predictions, records, strict=True):
        confidences = record.attributes.get("answer_confidences") or dict.fromkeys(record.targets, 1.0)
        credits.append(float(confidences.get(prediction, 0.0)))
    return _split_scores(credits, _answer_type_splits(records))


# LLaVA-Med v1.0.0 llava/eval/eval_metrics/glossary.py normalize_word: these characters are deleted when one stands
# next to a space somewhere in the text (or a comma sits between digits), otherwise replaced by a space
_LLAVA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!")
_LLAVA_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")
_LLAVA_PERIOD = re.compile(r"\.(?!\d)")  # written "(?!<=\d)(\.)(?!\d)" there: a lookahead, so any dot before a non-digit
_LLAVA_PERIOD_COUNT = 32  # re.UNICODE is passed as sub()'s count argument there
_LLAVA_NUMBERS = {"none": "0", **{w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())}}


def llava_med_normalize(text: str) -> str:
    """LLaVA-Med's normalize_word (without its contractions table, which only maps apostrophe-less spellings such as
    "dont" to "don't")."""
    comma_in_number = _LLAVA_COMMA_NUMBER.search(text) is not None
    out = text
    for p in _LLAVA_PUNCT:
        out = out.replace(p, "" if comma_in_number or p + " " in text or " " + p in text else " ")
    out = _LLAVA_PERIOD.sub("", out, count=_LLAVA_PERIOD_COUNT)
    words = [_LLAVA_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(w for w in words if w not in _ARTICLES).replace(",", "")


def _llava_words(text: str) -> Counter:
    """split_sentence(text, 1): lowercase whitespace words with their counts."""
    return Counter(text.lower().split())


def llava_med_recall(prediction: str, reference: str) -> float:
    """calculate_f1score's recall: tp / (tp + fn), tp counting the prediction's occurrences of shared words."""
    predicted, referenced = _llava_words(llava_med_normalize(prediction)), _llava_words(llava_med_normalize(reference))
    true_positive = sum(c for w, c in predicted.items() if w in referenced)
    if not predicted or not referenced or not true_positive:
        return 0.0
    return true_positive / (true_positive + sum(c for w, c in referenced.items() if w not in predicted))


@functools.lru_cache(maxsize=8)
def _llava_candidates(candidates: tuple[str, ...]) -> list[tuple[str, set[str]]]:
    """Each candidate normalised, with its words (a dataset shares one list: normalised once)."""
    return [(normalized, set(_llava_words(normalized))) for normalized in map(llava_med_normalize, candidates)]


def llava_med_candidate_hit(prediction: str, reference: str, candidates: Sequence[str]) -> float:
    """calculate_appearance_with_normalization: the candidate sharing the largest share of its words with the
    prediction (first on ties) must equal the reference."""
    predicted = _llava_words(llava_med_normalize(prediction))
    best, best_share = None, -1.0
    for normalized, words in _llava_candidates(tuple(map(str, candidates))):
        share = sum(w in words for w in predicted) / len(words) if words else 0.0
        if share > best_share:
            best, best_share = normalized, share
    return float(best == llava_med_normalize(reference))


def llava_med_vqa(predictions: Sequence[str], records: Sequence[Record]) -> tuple[dict, dict]:
    """LLaVA-Med's run_eval.py (v1.0.0, after its closed-accuracy fix): per OPEN question the recall of reference
    words in the prediction (and, with a candidate list, the candidate-matching hit); per CLOSED question a hit when
    "yes" or "no" occurs in the prediction and the reference occurs in it (substring tests)."""
    recall, candidate_hit, closed = [], [], []
    for prediction, record in zip(predictions, records, strict=True):
        reference, predicted = (llava_med_normalize(t.lower()) for t in (record.target, prediction))
        if record.answer_type == OPEN:
            recall.append(llava_med_recall(predicted, reference))
            if record.candidates:
                candidate_hit.append(llava_med_candidate_hit(predicted, reference, record.candidates))
        elif record.answer_type == CLOSED:
            closed.append(float(("yes" in predicted or "no" in predicted) and reference in predicted))
    scores, counts = {}, {}
    for name, values in (("open_recall", recall), ("open_candidate_accuracy", candidate_hit),
                         ("closed_accuracy", closed)):
        if values:
            scores[name], counts[name] = _percent(sum(values), len(values)), len(values)
    return scores, counts


_MILE_LABELS = {"yes": 0, "Yes": 0, "No": 1, "no": 1}  # ACC.py's deli(): anything else is None


def mile_vqa(predictions: Sequence[str], records: Sequence[Record]) -> tuple[dict, dict]:
    """MILE's ACC.py for Closed (references spelled yes/Yes/No/no, predictions mapped the same way, anything else
    wrong); Opened (the other references) and Global (count-weighted) with the toolkit's normalised exact match,
    since MILE publishes no open-ended scorer."""
    closed = [r.target in _MILE_LABELS for r in records]
    credits = [float(_MILE_LABELS.get(p) == _MILE_LABELS[r.target]) if c else vqa_credit(p, r)
               for p, r, c in zip(predictions, records, closed, strict=True)]
    return _split_scores(credits, {"closed": closed, "opened": [not c for c in closed], "global": [True] * len(records)})


# ---------------------------------------------------------------------------------------------------------------------
# Labels: classification, NLI, text QA


def label_metrics(predictions: Sequence[str], records: Sequence[Record]) -> dict:
    """Accuracy and macro-F1 over normalised labels (classes: those of the references and of the predictions)."""
    predicted = [normalize_vqa_answer(p) for p in predictions]
    reference = [normalize_vqa_answer(r.target) for r in records]
    n = len(reference)
    hits = sum(p == r for p, r in zip(predicted, reference, strict=True))
    return {"definition": LABEL_DEFINITION,
            "scores": {"accuracy": _percent(hits, n), "macro_f1": 100.0 * macro_f1(predicted, reference)},
            "counts": {"accuracy": n, "macro_f1": n}, "groups": {}, "per_class": per_class_f1(predicted, reference)}


def per_class_f1(predicted: Sequence[str], reference: Sequence[str]) -> dict[str, float]:
    """F1 of every class that is referenced or predicted (0 when never predicted correctly)."""
    true_pos, pred_count, ref_count = Counter(), Counter(predicted), Counter(reference)
    for p, r in zip(predicted, reference, strict=True):
        true_pos[r] += p == r
    return {label: 2.0 * true_pos[label] / (pred_count[label] + ref_count[label])
            for label in sorted(set(pred_count) | set(ref_count))}


def macro_f1(predicted: Sequence[str], reference: Sequence[str]) -> float:
    """Unweighted mean of the per-class F1 (a fraction in [0, 1])."""
    f1 = per_class_f1(predicted, reference)
    return sum(f1.values()) / len(f1) if f1 else 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Text: summaries (rouge-score, sacrebleu) and captions (the COCO caption protocol)


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

    Its inputs are space-tokenised strings. Document frequencies come from this corpus's references, so one sample
    alone scores 0 (log 1 = 0).
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
    return {"definition": TEXT_DEFINITION, "scores": scores, "counts": dict.fromkeys(scores, len(records)),
            "groups": {}}


PTB_JAVA = "COCO's PTBTokenizer (Stanford CoreNLP 3.4.1 through Java, -lowerCase, punctuation tokens removed)"
PTB_MISSING = ("the toolkit's clean_text (lowercase, punctuation removed, decimals kept) because COCO's PTBTokenizer "
               "could not run: {reason}; install a Java runtime (e.g. apt-get install default-jre-headless) for the "
               "COCO protocol")


def coco_tokenize(texts: Sequence[str]) -> tuple[list[str], str]:
    """Texts through COCO's PTBTokenizer (Java), or, without Java, `clean_text`; returns (tokenised, which one)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    present = [i for i, t in enumerate(texts) if t.strip()]  # empty lines do not come back from the tokenizer
    try:
        tokenised = PTBTokenizer().tokenize({i: [{"caption": texts[i]}] for i in present})
    except (OSError, ValueError) as error:  # no java, an unwritable package folder
        log.warning("COCO tokenizer unavailable (%s); tokenising with clean_text", error)
        return [clean_text(t) for t in texts], PTB_MISSING.format(reason=error)
    if set(tokenised) != set(present):
        raise RuntimeError(f"COCO's PTBTokenizer returned {len(tokenised)} of {len(present)} texts")
    return [tokenised[i][0] if i in tokenised else "" for i in range(len(texts))], PTB_JAVA


def _coco_inputs(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[dict, dict]:
    """pycocoevalcap's (gts, res) dicts keyed by sample position."""
    return ({i: list(refs) for i, refs in enumerate(references)}, {i: [h] for i, h in enumerate(hypotheses)})


def coco_caption_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """pycocoevalcap's BLEU-1..4 (closest reference length), ROUGE-L (LCS F-measure, β=1.2, best precision and
    recall over the references) and CIDEr-D on already tokenised text, ×100."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _coco_inputs(hypotheses, references)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {**{f"bleu_{n}": 100.0 * float(b) for n, b in enumerate(bleu, start=1)},
            "rouge_l": 100.0 * float(rouge), "cider": 100.0 * float(cider)}


def caption_metrics(predictions: Sequence[str], records: Sequence[Record]) -> dict:
    """The COCO caption protocol (PTB tokenisation, BLEU, ROUGE-L β=1.2, CIDEr-D), plus BiomedGPT's own
    metric_caption.py as a named scorer."""
    n = len(records)
    references = [list(r.targets) for r in records]
    tokens, tokenizer = coco_tokenize([*predictions, *(t for refs in references for t in refs)])
    hypotheses, flat = tokens[:n], iter(tokens[n:])
    scores = coco_caption_scores(hypotheses, [[next(flat) for _ in refs] for refs in references])
    definition = (f"The COCO caption protocol (pycocoevalcap): text tokenised by {tokenizer}; BLEU-1..4 (corpus, "
                  "closest reference length), ROUGE-L (LCS F-measure with β=1.2, best precision and recall over the "
                  "references), CIDEr-D (n=4, sigma 6, document frequencies from this corpus's references); ×100.")
    return {"definition": definition, "protocol": "coco", "scores": scores, "counts": dict.fromkeys(scores, n),
            "groups": {}, "scorers": run_scorers(CAPTION_SCORERS, predictions, records)}


# BiomedGPT scripts/caption/metric_caption.py _bioclean: drop " / \ ' ; strip; lowercase; delete the characters of
# [.,?;*!%^&_+():-\[\]{}] (':-\[' is a range: ':' to '[', whose letters the lowercasing already removed)
_BIOCLEAN_QUOTES = str.maketrans({c: None for c in "\"/\\'"})
_BIOCLEAN = re.compile(r"[.,?;*!%^&_+()\[\]{}:<=>@]")


def bioclean(caption: str) -> str:
    """BiomedGPT's caption cleaning (its decimals are lost: "1.5 cm" becomes "15 cm")."""
    return _BIOCLEAN.sub("", caption.translate(_BIOCLEAN_QUOTES).strip().lower())


def biomedgpt_caption(predictions: Sequence[str], records: Sequence[Record]) -> tuple[dict, dict]:
    """BiomedGPT's metric_caption.py: _bioclean, no tokenizer, pycocoevalcap ROUGE-L and CIDEr(-D)."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _coco_inputs([bioclean(p) for p in predictions], [[bioclean(t) for t in r.targets] for r in records])
    scores = {"rouge_l": 100.0 * float(Rouge().compute_score(gts, res)[0]),
              "cider": 100.0 * float(Cider().compute_score(gts, res)[0])}
    return scores, dict.fromkeys(scores, len(records))


# ---------------------------------------------------------------------------------------------------------------------
# Named scorers and dispatch

Scorer = tuple[str, str, Callable[[Sequence[str], Sequence[Record]], tuple[dict, dict]]]
"""(name, definition, function(predictions, records) -> (scores, counts))."""

VQA_SCORERS: list[Scorer] = [
    ("biomedgpt", "BiomedGPT (OFA vqa_gen, `ref_dict.get(hyp, 0)`): the prediction string must equal a reference "
     "string exactly, no normalisation (case, punctuation and spacing count); the credit is the reference's "
     "confidence where the dataset gives one. closed/open by answer_type.", biomedgpt_vqa),
    ("llava_med", "LLaVA-Med (llava/eval/run_eval.py, v1.0.0): prediction and reference go through its normalize_word "
     "(punctuation, 'zero'-'ten'/'none' to digits, articles dropped; its contractions table is not applied). "
     "open_recall: per OPEN question the share of reference words found in the prediction (the paper's open-set "
     "score); open_candidate_accuracy: the candidate answer with the largest share of its words in the prediction "
     "must be the reference (its 'open accuracy'); closed_accuracy: per CLOSED question a hit when 'yes' or 'no' "
     "occurs in the prediction and the reference occurs in it (substring tests, so a closed question whose answer "
     "is not yes/no scores only if the prediction also contains 'yes' or 'no').", llava_med_vqa),
    ("mile", "MILE (ACC.py): Closed = questions whose reference is spelled yes/Yes/No/no, the prediction mapped the "
     "same way (anything else is wrong); Opened = all other questions, scored with the toolkit's normalised exact "
     "match because MILE publishes no open-ended scorer; Global = the count-weighted mean.", mile_vqa),
]

CAPTION_SCORERS: list[Scorer] = [
    ("biomedgpt", "BiomedGPT (scripts/caption/metric_caption.py): _bioclean (quotes, slashes and the characters "
     ".,?;*!%^&_+():;<=>@[]{} deleted, so decimals are lost, lowercase), no tokenizer, pycocoevalcap ROUGE-L "
     "(β=1.2) and CIDEr-D against every reference.", biomedgpt_caption),
]


def run_scorers(scorers: Sequence[Scorer], predictions: Sequence[str], records: Sequence[Record]) -> dict:
    """{name: {"definition", "scores", "counts"}} of each named scorer on the same predictions."""
    out = {}
    for name, definition, score in scorers:
        scores, counts = score(predictions, records)
        out[name] = {"definition": definition, "scores": scores, "counts": counts}
    return out


METRIC_FAMILIES = {"vqa": vqa_metrics, "classify": label_metrics, "nli": label_metrics, "qa": label_metrics,
                   "caption": caption_metrics, "summarize": text_metrics}


def compute_metrics(task: str, predictions: Sequence[str], records: Sequence[Record]) -> dict:
    """Scores of one task's predictions against its records (same order): {"definition", "scores", "counts",
    "groups", "scorers"?, ...}."""
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
