import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scaling.data.images import ImageError, ImageTooLarge, ImageTransform, load_image, rescale_to_uint8
from scaling.data.records import ImageRef


def png_bytes(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_grayscale_becomes_rgb(make_image, tmp_path: Path):
    image = load_image(ImageRef(make_image(tmp_path / "g.png", mode="L")))
    assert image.mode == "RGB" and image.size == (8, 6)
    red, green, blue = (np.asarray(image)[..., c] for c in range(3))
    assert (red == green).all() and (green == blue).all()


def test_16bit_grayscale_is_stretched_to_8bit():
    pixels = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)  # 12-bit data in a 16-bit PNG
    image = load_image(ImageRef(data=png_bytes(Image.fromarray(pixels))))
    assert image.mode == "RGB"
    assert np.asarray(image)[..., 0].tolist() == [[0, 64], [128, 255]]


def test_cmyk_jpeg_and_palette_and_rgba():
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    assert load_image(ImageRef(data=png_bytes(cmyk, "JPEG", quality=95))).getpixel((1, 1))[0] > 200
    palette = Image.new("P", (4, 4), 3)
    palette.putpalette([0, 0, 0] * 3 + [10, 200, 30] + [0, 0, 0] * 252)
    assert load_image(ImageRef(data=png_bytes(palette))).getpixel((0, 0)) == (10, 200, 30)
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(ImageRef(data=png_bytes(transparent))).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (6, 4), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    loaded = load_image(ImageRef(data=png_bytes(image, "JPEG", exif=exif.tobytes())))
    assert loaded.size == (4, 6)


def test_max_pixels_guard_refuses_before_decoding(make_image, tmp_path: Path):
    ref = ImageRef(make_image(tmp_path / "big.png", size=(100, 100)))
    with pytest.raises(ImageTooLarge, match=r"100x100 = 10,000 pixels exceeds max_pixels=9,999"):
        load_image(ref, max_pixels=9_999)
    assert load_image(ref, max_pixels=10_000).size == (100, 100)


def test_corrupt_and_missing_images_name_the_file(tmp_path: Path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageError, match="bad.jpg: cannot decode image"):
        load_image(ImageRef(tmp_path / "bad.jpg"))
    with pytest.raises(ImageError, match="absent.png: cannot read image"):
        load_image(ImageRef(tmp_path / "absent.png"))


def test_dicom_is_decoded_with_rescale_and_monochrome1(tmp_path: Path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.Rows, ds.Columns = 2, 2
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16).tobytes()
    ds.save_as(tmp_path / "slice.dcm", enforce_file_format=True)
    image = load_image(ImageRef(tmp_path / "slice.dcm"))
    assert image.mode == "RGB"
    assert np.asarray(image)[..., 0].tolist() == [[255, 191], [127, 0]]  # MONOCHROME1: high values are dark
    assert pydicom is not None


def test_rescale_handles_flat_images():
    assert rescale_to_uint8(np.full((2, 2), 7, dtype=np.uint16)).tolist() == [[0, 0], [0, 0]]


def test_transform_shape_and_normalisation():
    white = Image.new("RGB", (10, 20), (255, 255, 255))
    tensor = ImageTransform(16)(white)
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32
    assert torch.allclose(tensor, torch.ones_like(tensor))  # (1 - 0.5) / 0.5
    imagenet = ImageTransform(8, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))(white)
    assert imagenet[0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, rel=1e-5)


def test_train_augmentation_is_seeded_and_keeps_shape(make_image, tmp_path: Path):
    ref = ImageRef(make_image(tmp_path / "x.png", size=(32, 32)))
    first, second = (ImageTransform(24, train=True, seed=3)(ref) for _ in range(2))
    assert first.shape == (3, 24, 24) and torch.equal(first, second)
    assert not torch.equal(first, ImageTransform(24)(ref))
    assert first.min() >= -1 and first.max() <= 1  # augmented 8-bit pixels, normalised like the evaluated ones


def test_train_augmentation_is_a_mild_view_of_the_evaluated_image():
    """Crop, rotation, brightness and contrast move an anatomy-like picture (a bright blob on a gradient) a little,
    never beyond recognition."""
    rows, cols = np.mgrid[0:96, 0:96]
    blob = 60 + 150 * np.exp(-((cols - 40) ** 2 + (rows - 55) ** 2) / 300) + 40 * cols / 96
    image = Image.fromarray(blob.clip(0, 255).astype(np.uint8))
    seen = ImageTransform(32)(image)
    views = torch.stack([ImageTransform(32, train=True)(image, random.Random(seed)) for seed in range(20)])
    correlations = [torch.corrcoef(torch.stack([seen.flatten(), v.flatten()]))[0, 1].item() for v in views]
    assert min(correlations) > 0.7, correlations
    assert (views - seen).abs().mean() > 0.02  # and they do move it


@pytest.mark.parametrize("train", [False, True])
def test_grayscale_is_transformed_as_one_channel_with_the_pixels_of_rgb(train: bool):
    gray = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56), dtype=np.uint8))
    transform = ImageTransform(24, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), train=train)
    one_channel, rgb = (transform(image, random.Random(5)) for image in (gray, gray.convert("RGB")))
    assert one_channel.shape == (3, 24, 24) and one_channel.is_contiguous()
    assert torch.equal(one_channel, rgb)
    assert not torch.equal(one_channel[0], one_channel[1])  # each channel normalised with its own mean and std


def test_decoded_images_are_kept_within_the_byte_budget(make_image, tmp_path: Path):
    first, second = (ImageRef(make_image(tmp_path / f"{n}.png", size=(20, 10))) for n in ("a", "b"))
    shown = {ref: ImageTransform(16)(ref) for ref in (first, second)}
    one_image = 20 * 10 * 3
    transform = ImageTransform(16, cache_bytes=one_image)
    assert torch.equal(transform(first), shown[first])
    Image.new("RGB", (20, 10), (0, 0, 0)).save(first.path)  # a changed file shows whether it is read again
    assert torch.equal(transform(first), shown[first])  # kept: not decoded again
    assert torch.equal(transform(second), shown[second])  # over budget: the first is dropped
    black = transform(first)
    assert not torch.equal(black, shown[first]) and torch.equal(black, torch.full_like(black, -1.0))
    assert transform.decoded.bytes == one_image
