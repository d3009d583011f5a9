"""The embedded default dataset: seeded synthetic radiology-like images and all six task types, in native formats.

Every image is drawn from a `Scene` (modality, plane, organ, 0-3 lesions of one size in one region); the questions,
captions, class labels and reports are all derived from the same scene, so every answer can be read off the image
(or, for the text tasks, off the report). The visual cues are deliberately coarse so that a tiny model learns them
at 64-96 pixels within minutes on a CPU:

    modality    field of view and texture: CT = circular field + table + fine noise; MRI = full frame, smooth
                bias field, bright fluid; X-ray = full frame, blurred projection with ribs/spine; ultrasound =
                fan-shaped field with speckle
    plane       body outline: axial = wide ellipse; coronal = tall rounded box; sagittal = tall, flat-backed profile
    organ       inner anatomy: brain = skull ring + ventricles; chest = two lungs + heart; abdomen = liver,
                kidneys and a bowel loop
    lesions     round blobs with a contrasting rim, drawn over the texture, all in one region
                (left/right/upper/lower/center), one size (small/medium/large), spaced so they can be counted

Left and right follow the radiological convention: the patient's left is on the image's right. Every image gets
each question kind that applies to it; yes/no questions that name a value (modality, plane, organ, lesion position
and size) come in pairs, one true and one false.

The files are written in the formats the real loaders read (scaling/data/sources): SLAKE json for VQA, an IU X-ray
tsv for captions, a MedMNIST-style npz for classification, MedNLI jsonl, a BiomedGPT summarization tsv and PubMedQA
json. Same seed, same arguments: byte-identical files. Train, validation and test are split by image. Two formats
have no validation file: the caption tsv keeps the validation images as the last rows of its train file (read back
with the loader's validation_fraction), and PubMedQA, which has no validation split, trains on them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zipfile
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.progress import track

from scaling.logging import get_logger, is_main_process

log = get_logger(__name__)

GENERATOR_VERSION = 2
MODALITIES = ("ct", "mri", "x-ray", "ultrasound")
PLANES = ("axial", "coronal", "sagittal")
ORGANS = ("brain", "chest", "abdomen")
LOCATIONS = ("left", "right", "upper", "lower", "center")
SIZES = ("small", "medium", "large")
CLASS_NAMES = ("normal", "abnormal")
MAX_LESIONS = 3
LESION_COUNT_P = (0.4, 0.2, 0.2, 0.2)
"""P(0..3 lesions): normal and abnormal images about equally often."""

# projections are not cut in every plane, and ultrasound probes are held transverse or longitudinal
ALLOWED_PLANES = {"ct": PLANES, "mri": PLANES, "x-ray": ("coronal", "sagittal"), "ultrasound": ("axial", "sagittal")}
MODALITY_NAMES = {"ct": "CT", "mri": "MRI", "x-ray": "X-Ray", "ultrasound": "Ultrasound"}
COUNT_WORDS = ("no", "one", "two", "three")

# region centre (u, v) in image coordinates [-1, 1], v downwards; patient's left = image right (u > 0)
REGION_CENTERS = {"left": (0.4, 0.0), "right": (-0.4, 0.0), "upper": (0.0, -0.42), "lower": (0.0, 0.42),
                  "center": (0.0, 0.0)}
LESION_RADII = {"small": 0.09, "medium": 0.13, "large": 0.19}
REGION_WORDS = {
    "brain": {"left": "left hemisphere", "right": "right hemisphere", "upper": "frontal lobe",
              "lower": "occipital lobe", "center": "basal ganglia"},
    "chest": {"left": "left lung", "right": "right lung", "upper": "upper mediastinum",
              "lower": "lung bases", "center": "mediastinum"},
    "abdomen": {"left": "left abdomen", "right": "right abdomen", "upper": "upper abdomen",
                "lower": "lower abdomen", "center": "mid abdomen"},
}
# tissue intensities per modality: background, soft tissue, bone, air, fluid, organ, fat, lesion core, lesion rim
TISSUES = ("background", "soft", "bone", "air", "fluid", "organ", "fat", "lesion", "rim")
INTENSITY = {
    "ct": (0.0, 0.42, 0.95, 0.04, 0.28, 0.55, 0.22, 0.9, 0.1),
    "mri": (0.03, 0.4, 0.1, 0.03, 0.75, 0.55, 0.8, 1.0, 0.05),
    "x-ray": (0.1, 0.45, 0.85, 0.15, 0.5, 0.55, 0.35, 0.97, 0.2),
    "ultrasound": (0.0, 0.35, 0.9, 0.7, 0.06, 0.45, 0.55, 0.04, 0.95),
}


@dataclass(frozen=True)
class Scene:
    """What one synthetic image shows; every question, caption and report is derived from it."""

    modality: str
    plane: str
    organ: str
    n_lesions: int
    size: str | None
    location: str | None

    @property
    def abnormal(self) -> bool:
        return self.n_lesions > 0


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random scene; lesion size and location only when there are lesions."""
    modality = MODALITIES[rng.integers(len(MODALITIES))]
    planes = ALLOWED_PLANES[modality]
    plane = planes[rng.integers(len(planes))]
    organ = ORGANS[rng.integers(len(ORGANS))]
    n_lesions = int(rng.choice(MAX_LESIONS + 1, p=LESION_COUNT_P))
    size = SIZES[rng.integers(len(SIZES))] if n_lesions else None
    location = LOCATIONS[rng.integers(len(LOCATIONS))] if n_lesions else None
    return Scene(modality, plane, organ, n_lesions, size, location)


# ---------------------------------------------------------------------------------------------------------------
# Rendering: soft-edged shapes on a [-1, 1] grid, composited tissue by tissue


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (u, v) in [-1, 1], each (size, size)."""
    axis = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0
    v, u = np.meshgrid(axis, axis, indexing="ij")
    return u, v


def _coverage(distance: np.ndarray, scale: float, edge: float) -> np.ndarray:
    """Soft inside-ness of a shape from its normalised distance (1 on the boundary); `edge` in grid units."""
    return np.clip((1.0 - distance) * scale / edge + 0.5, 0.0, 1.0)


def _ellipse(u, v, cx, cy, rx, ry, edge, power=2.0) -> np.ndarray:
    """Coverage of a (super-)ellipse; power 2 is an ellipse, larger powers approach a rounded box."""
    distance = (np.abs((u - cx) / rx) ** power + np.abs((v - cy) / ry) ** power) ** (1.0 / power)
    return _coverage(distance, min(rx, ry), edge)


def _paint(image: np.ndarray, mask: np.ndarray, value: float) -> None:
    """Composite a tissue of intensity `value` over the image where `mask` (0..1) covers it."""
    image *= 1.0 - mask
    image += mask * value


@dataclass(frozen=True)
class _Body:
    """The body outline: centre, radii, superellipse power; organs are placed in its normalised frame."""

    cx: float
    cy: float
    rx: float
    ry: float
    power: float

    def to_image(self, bx: float, by: float) -> tuple[float, float]:
        return self.cx + bx * self.rx, self.cy + by * self.ry


def _body_for(plane: str, rng: np.random.Generator) -> list[_Body]:
    """The outline parts of a plane: axial wide ellipse, coronal tall box, sagittal flat back plus round front."""
    jitter = 1.0 + rng.uniform(-0.05, 0.05)
    cx, cy = rng.uniform(-0.03, 0.03, size=2)
    if plane == "axial":
        return [_Body(cx, cy, 0.84 * jitter, 0.64 * jitter, 2.0)]
    if plane == "coronal":
        return [_Body(cx, cy, 0.66 * jitter, 0.88 * jitter, 4.0)]
    # sagittal: a tall box pushed to the back (image right) and a rounded front bulging to the left
    return [_Body(cx + 0.1, cy, 0.58 * jitter, 0.86 * jitter, 6.0), _Body(cx - 0.12, cy, 0.6 * jitter, 0.8 * jitter, 2.0)]


def _paint_body(image, u, v, parts: list[_Body], tone: dict, edge: float) -> np.ndarray:
    """Soft tissue inside the outline; returns the body mask."""
    body = np.zeros_like(image)
    for part in parts:
        body = np.maximum(body, _ellipse(u, v, part.cx, part.cy, part.rx, part.ry, edge, part.power))
    _paint(image, body, tone["soft"])
    return body


def _paint_organ(image, u, v, organ: str, main: _Body, tone: dict, edge: float, rng) -> None:
    """The organ's inner anatomy, placed in the main outline's normalised frame."""
    if organ == "brain":
        inner = _ellipse(u, v, main.cx, main.cy, main.rx * 0.86, main.ry * 0.86, edge, main.power)
        _paint(image, _ellipse(u, v, main.cx, main.cy, main.rx, main.ry, edge, main.power) * (1 - inner),
               tone["bone"])
        _paint(image, inner, tone["organ"])
        for side in (-1, 1):
            cx, cy = main.to_image(0.13 * side, -0.05)
            _paint(image, _ellipse(u, v, cx, cy, 0.07 * main.rx, 0.3 * main.ry, edge), tone["fluid"])
    elif organ == "chest":
        ring = _ellipse(u, v, main.cx, main.cy, main.rx, main.ry, edge, main.power)
        inner = _ellipse(u, v, main.cx, main.cy, main.rx * 0.93, main.ry * 0.93, edge, main.power)
        _paint(image, ring * (1 - inner), tone["bone"])
        for side in (-1, 1):
            cx, cy = main.to_image(0.45 * side, -0.08)
            _paint(image, _ellipse(u, v, cx, cy, 0.34 * main.rx, 0.66 * main.ry, edge), tone["air"])
        cx, cy = main.to_image(0.12, 0.3)
        _paint(image, _ellipse(u, v, cx, cy, 0.3 * main.rx, 0.3 * main.ry, edge), tone["organ"])
    else:  # abdomen: liver on the patient's right (image left), kidneys low, a fluid-filled bowel loop
        cx, cy = main.to_image(-0.42, -0.3)
        _paint(image, _ellipse(u, v, cx, cy, 0.42 * main.rx, 0.42 * main.ry, edge), tone["organ"])
        for side in (-1, 1):
            cx, cy = main.to_image(0.5 * side, 0.55)
            _paint(image, _ellipse(u, v, cx, cy, 0.13 * main.rx, 0.2 * main.ry, edge), tone["organ"])
        cx, cy = main.to_image(0.45, -0.35 + rng.uniform(-0.1, 0.1))
        _paint(image, _ellipse(u, v, cx, cy, 0.3 * main.rx, 0.12 * main.ry, edge), tone["fluid"])


def lesion_centers(scene: Scene, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Lesion centres: in a row across the region (a column for left/right), spaced so they never touch."""
    if not scene.n_lesions:
        return []
    cx, cy = REGION_CENTERS[scene.location]
    step = 2 * LESION_RADII[scene.size] + 0.1  # a gap of ~3 pixels at 64 px keeps neighbours apart
    offsets = (np.arange(scene.n_lesions) - (scene.n_lesions - 1) / 2) * step
    vertical = scene.location in ("left", "right")
    jitter = rng.uniform(-0.03, 0.03, size=(scene.n_lesions, 2))
    return [(cx + (0 if vertical else o) + j[0], cy + (o if vertical else 0) + j[1]) for o, j in zip(offsets, jitter, strict=True)]


def _paint_lesions(image, u, v, scene: Scene, tone: dict, edge: float, rng) -> None:
    """Round lesions with a contrasting rim, so they differ from every anatomical structure."""
    for cx, cy in lesion_centers(scene, rng):
        radius = LESION_RADII[scene.size] * rng.uniform(0.95, 1.05)
        _paint(image, _ellipse(u, v, cx, cy, radius, radius, edge), tone["rim"])
        _paint(image, _ellipse(u, v, cx, cy, radius * 0.7, radius * 0.7, edge), tone["lesion"])


def _blur(image: np.ndarray) -> np.ndarray:
    """3x3 box blur (the soft look of a projection radiograph)."""
    padded = np.pad(image, 1, mode="edge")
    h, w = image.shape
    return sum(padded[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


def _finish_modality(image, u, v, body, modality: str, tone: dict, rng) -> np.ndarray:
    """Field of view, texture and noise that make each modality recognisable."""
    if modality == "ct":
        table = np.exp(-(((v - 0.93) / 0.02) ** 2)) * (np.abs(u) < 0.7) * (1 - body)
        image = image + 0.35 * table + rng.normal(0.0, 0.025, image.shape)
        return image * (u**2 + v**2 < 0.97**2)
    if modality == "mri":
        gain = 1.0 + 0.25 * (rng.uniform(-1, 1) * u + rng.uniform(-1, 1) * v)  # coil bias field
        return image * gain + np.abs(rng.normal(0.0, 0.03, image.shape))
    if modality == "x-ray":
        ribs = 0.12 * (np.sin(v * 22.0 + rng.uniform(0, 6.28)) > 0.55) * body
        spine = 0.2 * (np.abs(u) < 0.06) * body
        image = _blur(image + ribs + spine) * (1.05 - 0.2 * (v + 1.0) / 2.0)
        return image + rng.normal(0.0, 0.015, image.shape)
    # ultrasound: a fan from a probe at the top, depth attenuation and multiplicative speckle
    depth = np.hypot(u, v + 1.15)
    fan = (np.abs(np.arctan2(u, v + 1.15)) < 0.72) & (depth < 2.1)
    speckle = rng.gamma(10.0, 0.1, image.shape)
    return (image + 0.08) * speckle * (1.15 - 0.3 * depth / 2.1) * fan


def render(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """The scene as a (size, size) uint8 grayscale image."""
    u, v = _grid(size)
    tone = {name: value + rng.uniform(-0.03, 0.03) for name, value in zip(TISSUES, INTENSITY[scene.modality], strict=True)}
    edge = (3.0 if scene.modality == "x-ray" else 1.0) * 2.0 / size
    image = np.full((size, size), tone["background"])
    parts = _body_for(scene.plane, rng)
    body = _paint_body(image, u, v, parts, tone, edge)
    _paint_organ(image, u, v, scene.organ, parts[0], tone, edge, rng)
    image = _finish_modality(image, u, v, body, scene.modality, tone, rng)
    # lesions go on top of the modality's texture so that small ones stay visible at 64 pixels
    _paint_lesions(image, u, v, scene, tone, 2.0 / size, rng)
    image += rng.normal(0.0, 0.02, image.shape)
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    """Deterministic PNG encoding of a grayscale array."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Questions: several phrasings per kind, none of which names its answer


@dataclass(frozen=True)
class QA:
    """One VQA item in SLAKE's vocabulary: answer_type OPEN/CLOSED, content_type Modality/Plane/Organ/..."""

    question: str
    answer: str
    answer_type: str
    content_type: str


MODALITY_WORDS = {"ct": "CT", "mri": "MRI", "x-ray": "X-ray", "ultrasound": "ultrasound"}
LOCATION_PHRASES = {"left": "on the left side", "right": "on the right side", "upper": "in the upper part",
                    "lower": "in the lower part", "center": "in the center"}
OPEN_TEMPLATES = {
    "Modality": ("What modality is used to take this image?", "Which imaging modality is this?",
                 "What kind of scan is this?"),
    "Plane": ("In which plane is this image taken?", "What is the scanning plane of this image?",
              "Which view is shown here?"),
    "Organ": ("Which organ is shown in this image?", "What part of the body does this image show?",
              "Which body region is imaged?"),
    "Quantity": ("How many lesions are there?", "How many lesions can be seen in this image?",
                 "What is the number of lesions?"),
    "Position": ("Where is the abnormality located?", "In which part of the image is the lesion?",
                 "Where is the lesion?"),
    "Size": ("How large is the lesion?", "What is the size of the abnormality?", "How big is the lesion?"),
}
YES_NO_TEMPLATES = {
    "Abnormal": ("Is there a lesion in this image?", "Does this image show any abnormality?",
                 "Is this image abnormal?"),
    "Modality": ("Was this image taken with {x}?", "Is the modality {x}?", "Does this image come from {x}?"),
    "Plane": ("Is this image in the {x} plane?", "Was this image taken in the {x} plane?",
              "Is the scanning plane {x}?"),
    "Organ": ("Does this image show the {x}?", "Is the {x} shown in this image?", "Is this an image of the {x}?"),
    "Position": ("Is the lesion {x}?", "Is the abnormality located {x}?", "Does the lesion appear {x}?"),
    "Size": ("Is the lesion {x}?", "Is the abnormality {x}?", "Would you describe the lesion as {x}?"),
    "Quantity": ("Is there more than one lesion?", "Are there several lesions?", "Are multiple lesions visible?"),
}
CHOICE_TEMPLATES = {
    "Modality": ("Which modality was used, {a} or {b}?", "Was this image taken with {a} or {b}?"),
    "Plane": ("Is this image in the {a} or the {b} plane?", "Which plane is shown, {a} or {b}?"),
}


def _pick(options, rng: np.random.Generator):
    return options[rng.integers(len(options))]


def _sentence(text: str) -> str:
    """First letter upper-cased, the rest kept ('CT' stays 'CT')."""
    return text[:1].upper() + text[1:]


def _ask_yes_no_pair(kind: str, truth: str, pool, words: dict | None, rng) -> list[QA]:
    """Two yes/no questions about `kind` on one image, in random order: one asks the true value, one another value.
    The pair differs only in the asked value, which the model therefore has to read; with one such question per
    image the mini model left these questions near chance even when it named the attribute itself correctly."""
    other = _pick([p for p in pool if p != truth], rng)
    pair = [(truth, "yes"), (other, "no")]
    if rng.random() < 0.5:
        pair.reverse()
    return [QA(_pick(YES_NO_TEMPLATES[kind], rng).format(x=words[asked] if words else asked), answer, "CLOSED", kind)
            for asked, answer in pair]


def _ask_choice(kind: str, truth: str, pool, words: dict | None, rng) -> QA:
    """A two-way choice question ('CT or MRI?') whose options contain the answer at a random position."""
    other = _pick([p for p in pool if p != truth], rng)
    a, b = (truth, other) if rng.random() < 0.5 else (other, truth)
    name = words or {a: a, b: b}
    return QA(_pick(CHOICE_TEMPLATES[kind], rng).format(a=name[a], b=name[b]), truth, "CLOSED", kind)


def questions(scene: Scene, rng: np.random.Generator) -> list[QA]:
    """Every question kind that applies to the scene, each in a randomly chosen phrasing."""
    planes = ALLOWED_PLANES[scene.modality]
    items = [
        QA(_pick(YES_NO_TEMPLATES["Abnormal"], rng), "yes" if scene.abnormal else "no", "CLOSED", "Abnormal"),
        *_ask_yes_no_pair("Modality", scene.modality, MODALITIES, MODALITY_WORDS, rng),
        *_ask_yes_no_pair("Plane", scene.plane, planes, None, rng),
        *_ask_yes_no_pair("Organ", scene.organ, ORGANS, None, rng),
        _ask_choice("Modality", scene.modality, MODALITIES, MODALITY_WORDS, rng) if rng.random() < 0.5
        else _ask_choice("Plane", scene.plane, planes, None, rng),
        QA(_pick(OPEN_TEMPLATES["Modality"], rng), scene.modality, "OPEN", "Modality"),
        QA(_pick(OPEN_TEMPLATES["Plane"], rng), scene.plane, "OPEN", "Plane"),
        QA(_pick(OPEN_TEMPLATES["Organ"], rng), scene.organ, "OPEN", "Organ"),
        QA(_pick(OPEN_TEMPLATES["Quantity"], rng), str(scene.n_lesions), "OPEN", "Quantity"),
    ]
    if scene.abnormal:
        items += [
            *_ask_yes_no_pair("Position", scene.location, LOCATIONS, LOCATION_PHRASES, rng),
            *_ask_yes_no_pair("Size", scene.size, SIZES, None, rng),
            QA(_pick(YES_NO_TEMPLATES["Quantity"], rng), "yes" if scene.n_lesions > 1 else "no", "CLOSED",
               "Quantity"),
            QA(_pick(OPEN_TEMPLATES["Position"], rng), scene.location, "OPEN", "Position"),
            QA(_pick(OPEN_TEMPLATES["Size"], rng), scene.size, "OPEN", "Size"),
        ]
    return items


# ---------------------------------------------------------------------------------------------------------------
# Report text: captions, findings/impression (summarisation), NLI pairs and yes/no/maybe questions

NORMAL_FINDINGS = {
    "brain": ("The ventricles are normal in size.", "There is no midline shift.",
              "The gray-white matter differentiation is preserved.", "No extra-axial collection is seen."),
    "chest": ("The heart size is normal.", "There is no pleural effusion.", "There is no pneumothorax.",
              "The mediastinal contours are unremarkable."),
    "abdomen": ("The liver is normal in size.", "The kidneys are unremarkable.", "There is no free fluid.",
                "The bowel loops are not dilated."),
}
INDICATIONS = ("headache", "cough", "abdominal pain", "trauma", "fever", "follow-up of a known lesion",
               "weight loss", "shortness of breath")
NEUTRAL_HYPOTHESES = ("The patient has a history of smoking.", "The patient was admitted through the emergency "
                      "department.", "The findings are new compared with the prior study.",
                      "The patient has a family history of cancer.", "The patient is diabetic.")


def _lesions_phrase(n: int, size: str, location: str, organ: str) -> str:
    noun = "lesion" if n == 1 else "lesions"
    return f"{COUNT_WORDS[n]} {size} {noun} in the {REGION_WORDS[organ][location]}"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A one-sentence caption naming plane, modality, organ and the lesions."""
    study = f"{scene.plane} {MODALITY_WORDS[scene.modality]} of the {scene.organ}"
    if not scene.abnormal:
        return _sentence(_pick((f"{study} with no focal lesion.", f"normal {study}."), rng))
    lesions = _lesions_phrase(scene.n_lesions, scene.size, scene.location, scene.organ)
    return _sentence(_pick((f"{study} showing {lesions}.", f"{study} with {lesions}."), rng))


def lesion_sentence(scene: Scene) -> str:
    if not scene.abnormal:
        return "No focal lesion is identified."
    verb = "is" if scene.n_lesions == 1 else "are"
    return f"There {verb} {_lesions_phrase(scene.n_lesions, scene.size, scene.location, scene.organ)}."


def technique_sentence(scene: Scene) -> str:
    return f"{scene.plane.capitalize()} {MODALITY_WORDS[scene.modality]} images of the {scene.organ} were obtained."


def impression(scene: Scene) -> str:
    """The one-line summary of the report: what a radiologist's impression would say."""
    if not scene.abnormal:
        return f"No focal lesion in the {scene.organ}."
    return _sentence(_lesions_phrase(scene.n_lesions, scene.size, scene.location, scene.organ)) + "."


def findings(scene: Scene, rng: np.random.Generator, lesion_text: str | None = None) -> list[str]:
    """Report sentences: indication, technique, the lesion finding among shuffled normal findings."""
    normal = list(NORMAL_FINDINGS[scene.organ])
    body = [lesion_text or lesion_sentence(scene)] + [normal[i] for i in rng.permutation(len(normal))[:2]]
    body = [body[i] for i in rng.permutation(len(body))]
    return [f"Indication: {_pick(INDICATIONS, rng)}.", technique_sentence(scene), *body]


def nli_pair(scene: Scene, rng: np.random.Generator) -> tuple[str, str, str]:
    """(premise, hypothesis, gold_label) with the three labels equally often."""
    premise = f"{technique_sentence(scene)} {lesion_sentence(scene)}"
    label = _pick(("entailment", "contradiction", "neutral"), rng)
    other_modality = MODALITY_WORDS[_pick([m for m in MODALITIES if m != scene.modality], rng)]
    if label == "neutral":
        return premise, _pick(NEUTRAL_HYPOTHESES, rng), label
    if scene.abnormal:
        region = REGION_WORDS[scene.organ][scene.location]
        other_region = REGION_WORDS[scene.organ][_pick([x for x in LOCATIONS if x != scene.location], rng)]
        entail = ("The study is abnormal.", f"There is a lesion in the {region}.",
                  f"The images were acquired with {MODALITY_WORDS[scene.modality]}.")
        contradict = ("The study is normal.", "No lesion is present.", f"The only lesions are in the {other_region}.",
                      f"The images were acquired with {other_modality}.")
    else:
        region = REGION_WORDS[scene.organ][_pick(LOCATIONS, rng)]
        entail = ("The study shows no lesion.", f"The {scene.organ} appears normal.",
                  f"The images were acquired with {MODALITY_WORDS[scene.modality]}.")
        contradict = ("The study is abnormal.", f"There is a lesion in the {region}.",
                      f"The images were acquired with {other_modality}.")
    return premise, _pick(entail if label == "entailment" else contradict, rng), label


def report_question(scene: Scene, rng: np.random.Generator) -> tuple[str, list[str], str, str]:
    """(question, report sentences, yes/no/maybe, long answer): the report's lesion finding is rewritten so that
    each decision is equally likely."""
    decision = _pick(("yes", "no", "maybe"), rng)
    asked = scene.location or _pick(LOCATIONS, rng)
    region = REGION_WORDS[scene.organ][asked]
    question = _pick((f"Is there a lesion in the {region}?", f"Does the report describe a lesion in the {region}?"),
                     rng)
    if decision == "maybe":
        text = f"An ill-defined area in the {region} is indeterminate; a lesion cannot be excluded."
        return question, findings(scene, rng, lesion_text=text), decision, f"Indeterminate area in the {region}."
    n, size = scene.n_lesions or 1, scene.size or _pick(SIZES, rng)
    if decision == "yes":
        told = Scene(scene.modality, scene.plane, scene.organ, n, size, asked)
    elif rng.random() < 0.5:
        told = Scene(scene.modality, scene.plane, scene.organ, n, size, _pick([x for x in LOCATIONS if x != asked], rng))
    else:
        told = Scene(scene.modality, scene.plane, scene.organ, 0, None, None)
    return question, findings(told, rng), decision, impression(told)


# ---------------------------------------------------------------------------------------------------------------
# Writing the native files

SPEC_FILE = "spec.json"
IMAGE_DIR = "slake/imgs"
SPLIT_NAMES = ("train", "validation", "test")
_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # npz members carry no wall-clock time, so files are byte-identical


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything the generated files depend on; a directory whose spec.json matches is reused as is."""

    n_images: int
    seed: int
    image_size: int = 96
    validation_fraction: float = 0.05
    test_fraction: float = 0.2
    version: int = GENERATOR_VERSION

    def problems(self) -> list[str]:
        out = []
        if self.n_images < 10:
            out.append(f"n_images must be >= 10, got {self.n_images}")
        if self.image_size < 32:
            out.append(f"image_size must be >= 32 pixels, got {self.image_size}")
        if not (0 <= self.validation_fraction and 0 < self.test_fraction and
                self.validation_fraction + self.test_fraction < 0.9):
            out.append("need 0 <= validation_fraction, 0 < test_fraction and their sum < 0.9, got "
                       f"{self.validation_fraction} and {self.test_fraction}")
        return out


@dataclass(frozen=True)
class SyntheticSource:
    """One generated dataset: the registered loader (scaling.data.sources) that reads it, its path, its options."""

    task: str
    loader: str
    path: Path
    options: dict[str, Any]
    splits: tuple[str, ...] = SPLIT_NAMES


@dataclass(frozen=True)
class SyntheticData:
    """Where `generate_synthetic` put each task's files."""

    root: Path
    spec: SyntheticSpec
    sources: dict[str, SyntheticSource]
    """By task name: vqa, caption, classify, nli, summarize, qa."""


@dataclass
class _Image:
    """One generated image and every text derived from its scene."""

    index: int
    split: str
    scene: Scene
    pixels: np.ndarray
    qas: list[QA]
    caption: str
    nli: tuple[str, str, str]
    report: list[str]
    report_qa: tuple[str, list[str], str, str]

    @property
    def name(self) -> str:
        return f"synth_{self.index:05d}.png"


def generate_synthetic(out_dir: str | os.PathLike, n_images: int = 1200, seed: int = 0, image_size: int = 96,
                       validation_fraction: float = 0.05, test_fraction: float = 0.2,
                       force: bool = False) -> SyntheticData:
    """Write the synthetic dataset under `out_dir` (reused when its spec.json matches) and say where it is."""
    spec = SyntheticSpec(n_images, seed, image_size, validation_fraction, test_fraction)
    if spec.problems():
        raise ValueError("generate_synthetic: " + "; ".join(spec.problems()))
    root = Path(out_dir)
    data = _layout(root, spec)
    if not force and _read_spec(root) == asdict(spec):
        return data
    (root / SPEC_FILE).unlink(missing_ok=True)  # a crash from here on leaves no valid spec, so no stale reuse
    for sub in _SUBDIRS:
        shutil.rmtree(root / sub, ignore_errors=True)
    splits = assign_splits(spec)
    images = [draw_image(spec, i, splits[i]) for i in track(range(n_images), description="synthetic images",
                                                             disable=not is_main_process(), transient=True)]
    files = [*write_vqa(root, images), *write_captions(root, images), write_classification(root, images, spec),
             *write_nli(root, images), *write_summaries(root, images), *write_report_qa(root, images)]
    _write_spec(root, spec, files)
    log.info("wrote %d synthetic images and %d files under %s", n_images, len(files), root)
    return data


def assign_splits(spec: SyntheticSpec) -> list[str]:
    """Split by image: a seeded permutation puts test first, then validation, the rest is train."""
    n_test = max(1, round(spec.n_images * spec.test_fraction))
    n_val = round(spec.n_images * spec.validation_fraction)
    order = np.random.default_rng([spec.seed, spec.n_images]).permutation(spec.n_images)
    splits = ["train"] * spec.n_images
    for rank, index in enumerate(order[:n_test + n_val]):
        splits[index] = "test" if rank < n_test else "validation"
    return splits


def draw_image(spec: SyntheticSpec, index: int, split: str) -> _Image:
    """Image `index` of the dataset, from its own seeded streams (independent of n_images and of the others)."""
    image_rng = np.random.default_rng([spec.seed, index, 0])
    text_rng = np.random.default_rng([spec.seed, index, 1])
    scene = sample_scene(image_rng)
    return _Image(index, split, scene, render(scene, spec.image_size, image_rng), questions(scene, text_rng),
                  caption(scene, text_rng), nli_pair(scene, text_rng), findings(scene, text_rng),
                  report_question(scene, text_rng))


def _by_split(images: list[_Image], *splits: str) -> list[_Image]:
    return [image for image in images if image.split in splits]


def write_vqa(root: Path, images: list[_Image]) -> list[Path]:
    """SLAKE 1.0 layout: {train,validate,test}.json and imgs/<img_name>."""
    (root / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    for image in images:
        (root / IMAGE_DIR / image.name).write_bytes(png_bytes(image.pixels))
    files = []
    for split, name in (("train", "train.json"), ("validation", "validate.json"), ("test", "test.json")):
        rows = [_slake_row(image, k, qa) for image in _by_split(images, split) for k, qa in enumerate(image.qas)]
        files.append(_write_text(root / "slake" / name, json.dumps(rows, indent=1) + "\n"))
    return [root / IMAGE_DIR / image.name for image in images] + files


def _slake_row(image: _Image, k: int, qa: QA) -> dict:
    return {"img_id": image.index, "img_name": image.name, "question": qa.question, "answer": qa.answer,
            "q_lang": "en", "location": image.scene.organ.capitalize(),
            "modality": MODALITY_NAMES[image.scene.modality], "answer_type": qa.answer_type, "base_type": "vqa",
            "content_type": qa.content_type, "triple": ["vhead", "_", "_"], "qid": image.index * 100 + k}


def write_captions(root: Path, images: list[_Image]) -> list[Path]:
    """bioCaption (IU X-ray) layout: train_images.tsv (validation rows last) and test_images.tsv."""
    train = _by_split(images, "train") + _by_split(images, "validation")
    files = []
    for name, rows in (("train_images.tsv", train), ("test_images.tsv", _by_split(images, "test"))):
        files.append(_write_text(root / "captions" / name, "".join(f"{i.name}\t{i.caption}\n" for i in rows)))
    return files


def write_classification(root: Path, images: list[_Image], spec: SyntheticSpec) -> Path:
    """MedMNIST v2 layout: one npz with {train,val,test}_images (N, H, W) and _labels (N, 1); 1 = abnormal."""
    arrays = {}
    for split, native in (("train", "train"), ("validation", "val"), ("test", "test")):
        chosen = _by_split(images, split)
        arrays[f"{native}_images"] = np.stack([i.pixels for i in chosen]) if chosen else \
            np.zeros((0, spec.image_size, spec.image_size), np.uint8)
        arrays[f"{native}_labels"] = np.array([[int(i.scene.abnormal)] for i in chosen], dtype=np.uint8).reshape(-1, 1)
    file = root / "classify" / "synthmnist.npz"
    file.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(file, "w", zipfile.ZIP_DEFLATED) as archive:
        for key, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, array, allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=_FIXED_ZIP_TIME), buffer.getvalue(),
                             compress_type=zipfile.ZIP_DEFLATED)
    return file


def write_nli(root: Path, images: list[_Image]) -> list[Path]:
    """MedNLI layout: mli_{train,dev,test}_v1.jsonl with sentence1, sentence2, gold_label, pairID."""
    files = []
    for split, name in (("train", "mli_train_v1.jsonl"), ("validation", "mli_dev_v1.jsonl"),
                        ("test", "mli_test_v1.jsonl")):
        lines = [json.dumps({"sentence1": i.nli[0], "sentence2": i.nli[1], "gold_label": i.nli[2],
                             "pairID": f"synth-{i.index:05d}"}) + "\n" for i in _by_split(images, split)]
        files.append(_write_text(root / "nli" / name, "".join(lines)))
    return files


def write_summaries(root: Path, images: list[_Image]) -> list[Path]:
    """BiomedGPT summarization TSVs: {train,val,test}.tsv, `source<TAB>target`, no header."""
    files = []
    for split, name in (("train", "train.tsv"), ("validation", "val.tsv"), ("test", "test.tsv")):
        lines = [f"{' '.join(i.report)}\t{impression(i.scene)}\n" for i in _by_split(images, split)]
        files.append(_write_text(root / "summarize" / name, "".join(lines)))
    return files


def write_report_qa(root: Path, images: list[_Image]) -> list[Path]:
    """PubMedQA PQA-L layout: ori_pqal.json (id → QUESTION, CONTEXTS, ...) and test_ground_truth.json."""
    items, truth = {}, {}
    for image in images:
        question, contexts, decision, long_answer = image.report_qa
        pmid = str(90_000_000 + image.index)
        items[pmid] = {"QUESTION": question, "CONTEXTS": contexts,
                       "LABELS": ["INDICATION", "TECHNIQUE"] + ["FINDINGS"] * (len(contexts) - 2),
                       "MESHES": [image.scene.organ.capitalize()], "YEAR": "2024",
                       "final_decision": decision, "LONG_ANSWER": long_answer}
        if image.split == "test":  # PubMedQA has no validation split: validation images train
            truth[pmid] = decision
    return [_write_text(root / "qa" / "ori_pqal.json", json.dumps(items, indent=1) + "\n"),
            _write_text(root / "qa" / "test_ground_truth.json", json.dumps(truth, indent=1) + "\n")]


_SUBDIRS = ("slake", "captions", "classify", "nli", "summarize", "qa")


def _layout(root: Path, spec: SyntheticSpec) -> SyntheticData:
    """Which loader reads which folder, with the options that make it read the synthetic files right."""
    splits = assign_splits(spec)
    n_train_captions, n_val = sum(s != "test" for s in splits), splits.count("validation")
    sources = [
        SyntheticSource("vqa", "slake", root / "slake", {}),
        SyntheticSource("caption", "caption_tsv", root / "captions",
                        {"images_dir": str(root / IMAGE_DIR), "validation_fraction": n_val / n_train_captions}),
        SyntheticSource("classify", "medmnist", root / "classify" / "synthmnist.npz",
                        {"class_names": list(CLASS_NAMES)}),
        SyntheticSource("nli", "mednli", root / "nli", {}),
        SyntheticSource("summarize", "biomedgpt_tsv", root / "summarize", {"task": "summarize"}),
        SyntheticSource("qa", "pubmedqa", root / "qa", {}, splits=("train", "test")),
    ]
    return SyntheticData(root, spec, {s.task: s for s in sources})


def _write_text(file: Path, text: str) -> Path:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(text.encode("utf-8"))
    return file


def _read_spec(root: Path) -> dict | None:
    """The spec a previous generation finished with, or None."""
    try:
        saved = json.loads((root / SPEC_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not all((root / name).is_file() for name in saved.get("files", {})):
        return None
    return {key: saved.get(key) for key in asdict(SyntheticSpec(0, 0))}


def _write_spec(root: Path, spec: SyntheticSpec, files: list[Path]) -> None:
    """spec.json with each file's sha256, written last and atomically: its presence means the data is complete."""
    digests = {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(files)}
    temporary = root / f".{SPEC_FILE}.tmp"
    temporary.write_text(json.dumps({**asdict(spec), "files": digests}, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, root / SPEC_FILE)
