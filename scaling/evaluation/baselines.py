"""Baselines shown beside every score: what answering without looking (or by copying the most similar training
example) scores, fitted on the training split of the evaluated source and scored like the model.

    rows = compute_baselines("vqa", train_records, records)   # [{"name", "definition", "scores", "counts"}]

VQA: the majority answer overall, per answer type, and of the most similar training questions (a blind
"question-only" model);
labels: the majority class; captions: the caption of the nearest training image; summaries: the summary of the
nearest training article. A model that does not beat these has not learnt to use its input.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

import numpy as np

from scaling.data.images import ImageError, load_image
from scaling.data.records import Record
from scaling.evaluation.metrics import METRIC_FAMILIES, clean_text, label_metrics, normalize_vqa_answer, vqa_scores

THUMBNAIL = 16
"""Side of the grey thumbnails the nearest-image baseline compares (pixels)."""
CHUNK = 256
"""Evaluated records compared with the whole training split at once (bounds the similarity matrix's memory)."""


def majority(values: Sequence[str]) -> str:
    """The most frequent value; ties go to the alphabetically first, so the baseline does not depend on order."""
    counts = Counter(values)
    return min(counts, key=lambda value: (-counts[value], value))


def _majority_by(train: Sequence[Record], key: Callable[[Record], str | None]) -> dict[str | None, str]:
    """{key: majority normalised answer among the training records with that key}."""
    answers: dict[str | None, list[str]] = defaultdict(list)
    for record in train:
        answers[key(record)].append(normalize_vqa_answer(record.target))
    return {k: majority(v) for k, v in answers.items()}


def vqa_baselines(train: Sequence[Record], records: Sequence[Record]) -> list[dict]:
    """Majority answer overall, per answer type (falling back to overall), and question-only, each scored with the
    toolkit's VQA accuracy."""
    overall = majority([normalize_vqa_answer(r.target) for r in train])
    by_type = _majority_by(train, lambda r: r.answer_type)
    typed = [by_type.get(r.answer_type, overall) for r in records]
    answers, identical = question_only(train, records, typed)
    return [
        _vqa_row("majority answer", f"always '{overall}', the most frequent training answer", [overall] * len(records),
                 records),
        _vqa_row("majority per answer type", "the most frequent training answer of the question's answer type "
                 f"({', '.join(f'{t}: {a!r}' for t, a in sorted(by_type.items(), key=str))})", typed, records),
        _vqa_row("question-only", "the most frequent answer of the training questions of the same answer type most "
                 "similar to the question (cosine of word counts; tied questions all vote), else the answer type's; "
                 f"{identical} of {len(records)} questions have an identical training question", answers, records),
    ]


def question_only(train: Sequence[Record], records: Sequence[Record], fallback: Sequence[str]) -> tuple[list[str], int]:
    """(answer per record from its nearest training questions, how many records had an identical question); each
    distinct (question, answer type) is looked up once."""
    questions = [r.text.get("question", "") for r in train]
    vocabulary = _vocabulary(questions)
    train_features = word_features(questions, vocabulary)
    train_types = np.array([str(r.answer_type) for r in train])
    targets = [normalize_vqa_answer(r.target) for r in train]
    keys = list(dict.fromkeys((r.text.get("question", ""), str(r.answer_type)) for r in records))
    found: dict[tuple[str, str], tuple[str, bool]] = {}
    for start in range(0, len(keys), CHUNK):
        chunk = keys[start:start + CHUNK]
        similarity = word_features([q for q, _ in chunk], vocabulary) @ train_features.T
        similarity[train_types[None, :] != np.array([t for _, t in chunk])[:, None]] = -1.0
        for key, row, best in zip(chunk, similarity, similarity.max(axis=1), strict=True):
            if best > 0:
                found[key] = majority([targets[i] for i in np.flatnonzero(row >= best - 1e-5)]), best >= 1 - 1e-5
    answers = [found.get((r.text.get("question", ""), str(r.answer_type)), (f, False))
               for r, f in zip(records, fallback, strict=True)]
    return [a for a, _ in answers], sum(same for _, same in answers)


def _vqa_row(name: str, definition: str, predictions: Sequence[str], records: Sequence[Record]) -> dict:
    scores, counts = vqa_scores(predictions, records)
    return {"name": name, "definition": definition, "scores": scores, "counts": counts}


def label_baselines(train: Sequence[Record], records: Sequence[Record]) -> list[dict]:
    """The majority training class for every sample."""
    label = majority([normalize_vqa_answer(r.target) for r in train])
    metrics = label_metrics([label] * len(records), records)
    return [{"name": "majority class", "definition": f"always '{label}', the most frequent training label",
             "scores": metrics["scores"], "counts": metrics["counts"]}]


def image_features(records: Sequence[Record]) -> np.ndarray:
    """(N, THUMBNAIL²) grey thumbnails, centred and of unit norm, so a dot product is a cosine similarity; an
    unreadable image gives zeros (similar to nothing)."""
    features = np.zeros((len(records), THUMBNAIL * THUMBNAIL), dtype=np.float32)
    for i, record in enumerate(records):
        try:
            image = load_image(record.image).convert("L").resize((THUMBNAIL, THUMBNAIL))
        except (ImageError, AttributeError):  # AttributeError: a record without an image
            continue
        pixels = np.asarray(image, dtype=np.float32).ravel()
        pixels -= pixels.mean()
        features[i] = pixels / max(float(np.linalg.norm(pixels)), 1e-6)
    return features


def _vocabulary(texts: Sequence[str]) -> dict[str, int]:
    return {w: i for i, w in enumerate(sorted({w for text in texts for w in clean_text(text).split()}))}


def word_features(texts: Sequence[str], vocabulary: dict[str, int]) -> np.ndarray:
    """(N, V) word counts over `vocabulary`, of unit norm (cosine similarity by dot product)."""
    features = np.zeros((len(texts), len(vocabulary)), dtype=np.float32)
    for i, text in enumerate(texts):
        for word, count in Counter(clean_text(text).split()).items():
            if word in vocabulary:
                features[i, vocabulary[word]] = count
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-6)


def nearest_targets(train_features: np.ndarray, features: np.ndarray, train: Sequence[Record]) -> list[str]:
    """The reference of the most similar training record for each row of `features`."""
    nearest = (features @ train_features.T).argmax(axis=1)
    return [train[int(i)].target for i in nearest]


def caption_baselines(train: Sequence[Record], records: Sequence[Record]) -> list[dict]:
    """The caption of the nearest training image (cosine of 16×16 grey thumbnails)."""
    predictions = nearest_targets(image_features(train), image_features(records), train)
    return [_text_row("nearest training image", f"the caption of the training image most similar to the image "
                      f"(cosine of {THUMBNAIL}×{THUMBNAIL} grey thumbnails)", "caption", predictions, records)]


def summary_baselines(train: Sequence[Record], records: Sequence[Record]) -> list[dict]:
    """The summary of the nearest training article (cosine of word counts)."""
    sources = [r.text.get("source", "") for r in train]
    vocabulary = _vocabulary(sources)
    predictions = nearest_targets(word_features(sources, vocabulary),
                                  word_features([r.text.get("source", "") for r in records], vocabulary), train)
    return [_text_row("nearest training article", "the summary of the training article most similar to the article "
                      "(cosine of word counts)", "summarize", predictions, records)]


def _text_row(name: str, definition: str, task: str, predictions: Sequence[str], records: Sequence[Record]) -> dict:
    metrics = METRIC_FAMILIES[task](predictions, records)
    return {"name": name, "definition": definition, "scores": metrics["scores"], "counts": metrics["counts"]}


BASELINES = {"vqa": vqa_baselines, "classify": label_baselines, "nli": label_baselines, "qa": label_baselines,
             "caption": caption_baselines, "summarize": summary_baselines}


def compute_baselines(task: str, train: Sequence[Record], records: Sequence[Record]) -> list[dict]:
    """The task's baselines fitted on `train` (labelled records of the same task) and scored on `records`."""
    train = [r for r in train if r.task == task and r.target is not None]
    if not train:
        raise ValueError(f"no labelled {task} records in the training split to fit baselines on")
    return BASELINES[task](train, records)
