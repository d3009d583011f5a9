"""Image decoding (any PIL format, 16-bit, CMYK, DICOM) to 8-bit grayscale or RGB, and the tensor transform, with PIL
and numpy only."""

from __future__ import annotations

import io
import random
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from scaling.data.records import ImageRef

DEFAULT_MAX_PIXELS = 100_000_000
"""Largest width*height decoded; a 10k x 10k slide fits, a decompression bomb does not."""
OFA_MEAN = OFA_STD = (0.5, 0.5, 0.5)
DEFAULT_CACHE_BYTES = 512 * 2**20
"""Decoded images an ImageTransform keeps in memory (2,700 of 512 x 512 RGB)."""
_DICOM_MAGIC_OFFSET = 128


class ImageError(ValueError):
    """An image cannot be used; the message names it, says what is wrong (`problem`) and what to do (`fix`)."""

    def __init__(self, name: str, problem: str, fix: str):
        self.name, self.problem, self.fix = name, problem, fix
        super().__init__(f"{name}: {problem}. Fix: {fix}")


class ImageTooLarge(ImageError):
    """The image has more pixels than max_pixels allows (decompression-bomb guard)."""


def load_image(ref: ImageRef | Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image reference to an 8-bit RGB PIL image, upright per its EXIF orientation."""
    image = decode_image(ref, max_pixels)
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_image(ref: ImageRef | Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image reference to 8 bits, upright: grayscale stays one channel ("L"), anything else is RGB."""
    if isinstance(ref, Image.Image):
        return to_8bit(ref)
    try:
        data = ref.read_bytes()
    except OSError as error:
        raise ImageError(ref.describe(), f"cannot read image ({error.strerror or error})", "check the image path") from None
    if _is_dicom(ref, data):
        return _load_dicom(data, ref.describe())
    return to_8bit(_decode_pil(data, ref.describe(), max_pixels))


def _decode_pil(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Open, check the size from the header, then fully decode, turning decoder failures into ImageErrors."""
    with warnings.catch_warnings():
        # our own max_pixels check replaces PIL's process-wide bomb warning
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height <= max_pixels:
                image.load()
                return ImageOps.exif_transpose(image)
        except Image.DecompressionBombError as error:
            raise ImageTooLarge(name, str(error), "downscale the image or raise max_pixels") from None
        except Image.UnidentifiedImageError:  # PIL's message names its in-memory buffer, not the file
            raise ImageError(name, "not an image format PIL or pydicom can read", "re-export or remove this file") from None
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageError(name, f"cannot decode image ({error})", "re-export or remove this file") from None
    raise ImageTooLarge(name, f"{width}x{height} = {width * height:,} pixels exceeds max_pixels={max_pixels:,} "
                              "(decompression-bomb guard)", "downscale the image or raise max_pixels if it is trusted")


def to_8bit(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit "L" (grayscale, bilevel, high bit depth rescaled) or "RGB" (colour, transparency
    composited on white)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(rescale_to_uint8(np.asarray(image)))
    if image.mode in ("P", "PA", "LA", "RGBA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("L", "RGB"):
        return image
    return image.convert("L" if image.mode == "1" else "RGB")


def rescale_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Stretch the image's own value range to 0..255 (12-bit CT/X-ray data rarely fills 16 bits)."""
    pixels = pixels.astype(np.float64)
    low, high = float(pixels.min()), float(pixels.max())
    if high <= low:
        return np.zeros(pixels.shape, dtype=np.uint8)
    return np.round((pixels - low) / (high - low) * 255.0).astype(np.uint8)


def _is_dicom(ref: ImageRef, data: bytes) -> bool:
    suffix = ref.path.suffix.lower() if ref.path is not None else ""
    return suffix in (".dcm", ".dicom") or data[_DICOM_MAGIC_OFFSET:_DICOM_MAGIC_OFFSET + 4] == b"DICM"


def _load_dicom(data: bytes, name: str) -> Image.Image:
    """A DICOM slice to 8-bit grayscale (RGB for colour data): modality rescale, the stored display window if any,
    MONOCHROME1 inverted."""
    try:
        import pydicom
    except ImportError:
        raise ImageError(name, "reading DICOM needs pydicom", "pip install 'scaling[dicom]'") from None
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
        pixels = dataset.pixel_array.astype(np.float64)
    except Exception as error:  # pydicom raises many types for bad files and missing pixel handlers
        raise ImageError(name, f"cannot decode DICOM ({error})",
                         "convert it to PNG or install the pixel-data handler pydicom names") from None
    if getattr(dataset, "PhotometricInterpretation", "") == "RGB":
        return Image.fromarray(rescale_to_uint8(pixels)).convert("RGB")
    pixels = pixels * float(getattr(dataset, "RescaleSlope", 1)) + float(getattr(dataset, "RescaleIntercept", 0))
    if pixels.ndim == 3:  # multi-frame: the middle frame stands for the series
        pixels = pixels[pixels.shape[0] // 2]
    pixels = _apply_window(pixels, dataset)
    gray = rescale_to_uint8(pixels)
    if getattr(dataset, "PhotometricInterpretation", "") == "MONOCHROME1":
        gray = 255 - gray
    return Image.fromarray(gray)


def _apply_window(pixels: np.ndarray, dataset) -> np.ndarray:
    """Clip to the DICOM's first stored window (center/width), the view the radiologist saw."""
    center, width = getattr(dataset, "WindowCenter", None), getattr(dataset, "WindowWidth", None)
    if center is None or width is None:
        return pixels
    center = float(center[0] if isinstance(center, Sequence) else center)
    width = float(width[0] if isinstance(width, Sequence) else width)
    return np.clip(pixels, center - width / 2, center + width / 2)


class DecodedImages:
    """Decoded 8-bit images by reference, the least recently used dropped beyond `max_bytes`. VQA datasets ask many
    questions about each image (the synthetic data 15), and decoding was a third of the loader's time.
    Thread-safe (the loader's image threads share it); files are assumed not to change during a run."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.images: OrderedDict[ImageRef, Image.Image] = OrderedDict()
        self.lock = threading.Lock()

    def __call__(self, ref: ImageRef | Image.Image, max_pixels: int) -> Image.Image:
        if isinstance(ref, Image.Image):
            return decode_image(ref, max_pixels)
        with self.lock:
            image = self.images.get(ref)
            if image is not None:
                self.images.move_to_end(ref)
                return image
        image = decode_image(ref, max_pixels)  # outside the lock: threads decode in parallel
        with self.lock:
            size = _nbytes(image)
            if ref not in self.images and size <= self.max_bytes:
                self.images[ref] = image
                self.bytes += size
                while self.bytes > self.max_bytes:
                    self.bytes -= _nbytes(self.images.popitem(last=False)[1])
        return image


def _nbytes(image: Image.Image) -> int:
    return image.width * image.height * len(image.getbands())


class ImageTransform:
    """PIL image → normalised float tensor (3, size, size); `train=True` adds light, anatomy-safe augmentation.

    No horizontal flips: left/right is part of many medical answers ("which side is the lesion on?"). Decoded images
    are kept (`cache_bytes`, least recently used dropped) for the next question about them.
    """

    def __init__(self, size: int, mean: Sequence[float] = OFA_MEAN, std: Sequence[float] = OFA_STD,
                 train: bool = False, seed: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.size, self.train, self.max_pixels = size, train, max_pixels
        self.decoded = DecodedImages(cache_bytes)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        self.rng = random.Random(seed)

    def __call__(self, image: Image.Image | ImageRef, rng: random.Random | None = None) -> torch.Tensor:
        """`rng` draws this image's augmentation (default: the transform's own stream)."""
        # Grayscale (most radiology) is augmented and resized as one channel and only then copied to three: the same
        # pixels as doing it all in RGB, for a third of the work.
        image = self.decoded(image, self.max_pixels)
        if self.train:
            image = self.augment(image, rng or self.rng)
        image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        channels = np.broadcast_to(pixels, (3, *pixels.shape)) if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        return torch.from_numpy((channels - self.mean) / self.std)

    @staticmethod
    def augment(image: Image.Image, rng: random.Random) -> Image.Image:
        """A random crop of 80-100% of the area, a rotation within ±10°, brightness and contrast within ±10%."""
        width, height = image.size
        scale = rng.uniform(0.8, 1.0) ** 0.5
        crop_w, crop_h = max(1, round(width * scale)), max(1, round(height * scale))
        left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
        image = image.crop((left, top, left + crop_w, top + crop_h))
        image = image.rotate(rng.uniform(-10, 10), resample=Image.Resampling.BILINEAR)
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.9, 1.1))
        return ImageEnhance.Contrast(image).enhance(rng.uniform(0.9, 1.1))
