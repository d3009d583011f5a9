"""MedMNIST v2 `.npz` files: `{train,val,test}_images` (N, H, W[, 3]) uint8 and `{split}_labels` (N, 1).

Class names come from MedMNIST's INFO for the flag (the file stem, e.g. pathmnist) or from `class_names`. Each
image is stored in its record as PNG bytes, so records stay picklable and the image decodes lazily like any other.
Multi-label ChestMNIST does not fit the single-answer classify task and is refused.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from scaling.data.records import BadRecord, DataError, ImageRef, Record, RecordCollector, SplitNotFound, check_path
from scaling.data.sources.common import track_items

NAME = "medmnist"
TASK = "classify"
SPLITS = ("train", "validation", "test")
NATIVE_SPLIT = {"train": "train", "validation": "val", "test": "test"}
_ORGANS = ["bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver", "lung-left",
           "lung-right", "pancreas", "spleen"]
CLASS_NAMES = {  # MedMNIST v2 INFO[flag]["label"], in label-index order
    "pathmnist": ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal colon mucosa",
                  "cancer-associated stroma", "colorectal adenocarcinoma epithelium"],
    "dermamnist": ["actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                   "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
                   "vascular lesions"],
    "octmnist": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
    "pneumoniamnist": ["normal", "pneumonia"],
    "retinamnist": ["0", "1", "2", "3", "4"],
    "breastmnist": ["malignant", "normal, benign"],
    "bloodmnist": ["basophil", "eosinophil", "erythroblast",
                   "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte", "monocyte",
                   "neutrophil", "platelet"],
    "tissuemnist": ["Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule", "Glomerular endothelial cells",
                    "Interstitial endothelial cells", "Leukocytes", "Podocytes", "Proximal Tubule Segments",
                    "Thick Ascending Limb"],
    "organamnist": _ORGANS, "organcmnist": _ORGANS, "organsmnist": _ORGANS,
}


def load(path: Path, split: str, out: RecordCollector, flag: str | None = None,
         class_names: list[str] | None = None) -> None:
    """Reads one split of `path` (the .npz, or a folder holding `{flag}.npz`)."""
    file = check_path(path / f"{flag}.npz" if path.is_dir() and flag else path, "MedMNIST npz")
    flag = flag or file.stem.split("_")[0]  # pathmnist_224.npz → pathmnist
    names = list(class_names) if class_names else class_names_for(flag, file)
    images, labels = read_arrays(file, NATIVE_SPLIT[split])
    check_arrays(images, labels, file, NATIVE_SPLIT[split])
    rows = enumerate(zip(images, labels.reshape(len(labels), -1)[:, 0], strict=True))
    for index, (pixels, label) in track_items(rows, len(labels), f"{flag} {split}"):
        with out.reading(file, index):
            out.add(make_record(pixels, int(label), index, flag, split, names, file))


def read_arrays(file: Path, native: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(file, allow_pickle=False) as arrays:
            if f"{native}_images" not in arrays:
                raise SplitNotFound(f"{file}: no '{native}_images' array (has {', '.join(arrays.files)})")
            return arrays[f"{native}_images"], arrays[f"{native}_labels"]
    except (zipfile.BadZipFile, ValueError, KeyError, OSError) as error:
        raise DataError(f"{file}: not a MedMNIST npz ({error}). Fix: use the .npz from the MedMNIST release") from None


def check_arrays(images: np.ndarray, labels: np.ndarray, file: Path, native: str) -> None:
    """MedMNIST's layout: uint8 (N, H, W) or (N, H, W, 3) images, one integer label per image."""
    name = f"{file}: '{native}_images'"
    if images.dtype != np.uint8:
        raise DataError(f"{name} are {images.dtype}; MedMNIST images are uint8 0..255. Fix: convert them, e.g. "
                        "np.round(images * 255).astype(np.uint8) for floats in [0, 1]")
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise DataError(f"{name} have shape {images.shape}; expected (N, H, W) grayscale or (N, H, W, 3) RGB")
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(f"{file}: labels have {labels.shape[1]} columns (multi-label); the classify task needs "
                        "one label per image. Fix: use a multi-class MedMNIST flag")
    if len(labels) != len(images):
        raise DataError(f"{file}: {len(images)} '{native}_images' but {len(labels)} '{native}_labels'. Fix: store "
                        "one label per image")


def make_record(pixels: np.ndarray, label: int, index: int, flag: str, split: str, names: list[str],
                file: Path) -> Record:
    if not 0 <= label < len(names):
        raise BadRecord("unknown label", "labels", f"labels must be 0..{len(names) - 1} for {flag}",
                        detail=f"got {label}")
    return Record(id=f"{flag}-{split}-{index}", task=TASK, image=ImageRef(data=encode_png(pixels)), text={},
                  target=names[label], candidates=names,
                  attributes={"dataset": flag, "label": label, "candidates_from": f"the {flag} class names"},
                  source=str(file), index=index)


def encode_png(pixels: np.ndarray) -> bytes:
    """(H, W) or (H, W, 3) uint8 → PNG bytes (fast compression: these are re-decoded every epoch)."""
    buffer = io.BytesIO()
    pixels = pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def class_names_for(flag: str, file: Path) -> list[str]:
    if flag not in CLASS_NAMES:
        raise DataError(f"{file}: unknown MedMNIST flag {flag!r}; pass flag= one of {', '.join(CLASS_NAMES)} "
                        "or class_names=[...]")
    return CLASS_NAMES[flag]
