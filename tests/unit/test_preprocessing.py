"""decode_image → to_uint8 → normalize, and the Preprocessing record stored in checkpoints."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from models.preprocessing import (
    ALLOWED_FORMATS,
    ImageDecodeError,
    Preprocessing,
    decode_image,
    eval_input,
    normalize,
    to_uint8,
)
from models.registry import IMAGENET_MEAN, IMAGENET_STD
from tests.factories import encode, image_bytes, noise_png, png_declaring

EXIF_ORIENTATION = 0x0112


@pytest.fixture(autouse=True)
def _restore_pillow_pixel_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """decode_image(max_pixels=…) writes Pillow's global limit; put it back after every test."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)


def prep(size: int = 8, channels: int = 3) -> Preprocessing:
    return Preprocessing(image_size=size, channels=channels, mean=(0.5,) * channels, std=(0.5,) * channels)


def sixteen_bit_gradient(width: int = 64, height: int = 16) -> Image.Image:
    """An I;16 image whose values run over the whole 16-bit range, left to right."""
    row = np.linspace(0, 65535, width).astype(np.uint16)
    image = Image.fromarray(np.tile(row, (height, 1)))
    assert image.mode.startswith("I;16")
    return image


# ---------------------------------------------------------------- decode_image: refusals


def test_empty_bytes_are_refused() -> None:
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"")


@pytest.mark.parametrize("seed", range(3))
def test_random_bytes_are_refused(seed: int) -> None:
    data = np.random.default_rng(seed).integers(0, 256, size=2048, dtype=np.uint8).tobytes()
    with pytest.raises(ImageDecodeError):
        decode_image(data)


def test_text_is_refused() -> None:
    with pytest.raises(ImageDecodeError, match="not a supported image"):
        decode_image(b"hello, I am not an image\n" * 10)


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_png_is_refused(fraction: float) -> None:
    data = noise_png(1, size=(64, 64), mode="RGB")
    decode_image(data)  # the whole file is fine
    with pytest.raises(ImageDecodeError):
        decode_image(data[: int(len(data) * fraction)])


def test_truncated_jpeg_is_refused() -> None:
    array = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(array), "JPEG", quality=95)
    decode_image(data)
    with pytest.raises(ImageDecodeError):
        decode_image(data[: len(data) // 2])


@pytest.mark.parametrize(("fmt", "mode"), [("ICO", "RGBA"), ("TGA", "RGB"), ("PPM", "RGB"), ("PCX", "RGB")])
def test_formats_outside_the_allow_list_are_refused(fmt: str, mode: str) -> None:
    assert fmt not in ALLOWED_FORMATS
    data = encode(Image.new(mode, (16, 16), "red"), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt, "Pillow itself can read it"
    with pytest.raises(ImageDecodeError, match="not a supported image"):
        decode_image(data)


def test_pixel_count_over_max_pixels_is_refused_quickly() -> None:
    data = image_bytes((100, 100))
    started = time.perf_counter()
    with pytest.raises(ImageDecodeError, match=r"^image too large"):
        decode_image(data, max_pixels=1000)
    assert time.perf_counter() - started < 1.0


def test_pixel_count_just_over_max_pixels_is_refused() -> None:
    # between max_pixels and 2 x max_pixels Pillow only warns; decode_image must still refuse
    with pytest.raises(ImageDecodeError, match=r"^image too large"):
        decode_image(image_bytes((40, 30)), max_pixels=1000)


def test_pixel_count_at_max_pixels_is_accepted() -> None:
    assert decode_image(image_bytes((40, 25)), max_pixels=1000).size == (40, 25)


def test_header_claiming_billions_of_pixels_is_refused_without_decoding() -> None:
    data = png_declaring(60_000, 60_000)
    assert len(data) < 100
    started = time.perf_counter()
    with pytest.raises(ImageDecodeError, match=r"^image too large"):
        decode_image(data)
    assert time.perf_counter() - started < 1.0


def test_max_pixels_does_not_leak_into_later_calls() -> None:
    """The limit is per call: Pillow's process-wide MAX_IMAGE_PIXELS must not be changed by it."""
    pillow_limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageDecodeError):
        decode_image(image_bytes((100, 100)), max_pixels=1000)
    assert pillow_limit == Image.MAX_IMAGE_PIXELS
    assert decode_image(image_bytes((100, 100))).size == (100, 100)
    assert decode_image(image_bytes((100, 100)), max_pixels=20_000).size == (100, 100)


# ---------------------------------------------------------------- decode_image: acceptance


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA", "I;16", "1"])
def test_png_in_every_mode_is_accepted(mode: str) -> None:
    image = decode_image(encode(Image.new(mode, (7, 5)), "PNG"))
    assert image.size == (7, 5)
    assert image.mode == mode


@pytest.mark.parametrize(
    ("fmt", "modes"),
    [
        ("JPEG", ["L", "RGB", "CMYK"]),
        ("BMP", ["L", "RGB", "RGBA", "P", "1"]),
        ("WEBP", ["L", "RGB", "RGBA", "P", "LA"]),
        ("GIF", ["L", "P"]),
        ("TIFF", ["L", "RGB", "RGBA", "I;16", "F"]),
    ],
)
def test_other_allowed_formats_are_accepted(fmt: str, modes: list[str]) -> None:
    for mode in modes:
        image = decode_image(encode(Image.new(mode, (9, 6)), fmt))
        assert image.size == (9, 6), (fmt, mode)


def test_decoded_image_is_fully_loaded() -> None:
    image = decode_image(noise_png(3, size=(20, 20)))
    # the pixel data is in memory: reading it cannot touch the (gone) source
    assert np.asarray(image).shape == (20, 20)


@pytest.mark.parametrize(
    ("orientation", "size"), [(1, (20, 10)), (3, (20, 10)), (6, (10, 20)), (8, (10, 20))]
)
def test_exif_orientation_is_applied(orientation: int, size: tuple[int, int]) -> None:
    array = np.zeros((10, 20, 3), dtype=np.uint8)
    array[:, :10] = (255, 0, 0)  # left half red, right half black
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    image = decode_image(encode(Image.fromarray(array), "JPEG", exif=exif, quality=95))
    assert image.size == size
    pixels = np.asarray(image.convert("RGB")).astype(int)
    if orientation == 6:  # rotated 90° clockwise for display: the left half ends up on top
        assert pixels[:5, :, 0].mean() > 200
        assert pixels[15:, :, 0].mean() < 50
    if orientation == 3:  # rotated 180°: the red half is on the right
        assert pixels[:, 15:, 0].mean() > 200


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_decoded_image_keeps_its_format(fmt: str) -> None:
    """app/services/images.py stores `.format`; uprighting the image must not lose it."""
    assert decode_image(image_bytes(fmt=fmt)).format == fmt


def test_rotated_image_keeps_its_format() -> None:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    image = decode_image(encode(Image.new("RGB", (20, 10)), "JPEG", exif=exif))
    assert image.size == (10, 20)
    assert image.format == "JPEG"


# ---------------------------------------------------------------- to_uint8


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA", "I;16", "I", "F", "1", "CMYK", "PA"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("source_size", [(5, 5), (31, 17), (8, 8)])
def test_to_uint8_shape_and_dtype_for_any_mode_and_size(
    mode: str, channels: int, source_size: tuple[int, int]
) -> None:
    tensor = to_uint8(Image.new(mode, source_size), prep(size=8, channels=channels))
    assert tensor.dtype == torch.uint8
    assert tuple(tensor.shape) == (channels, 8, 8)


def test_to_uint8_keeps_pixels_when_no_resize_is_needed() -> None:
    array = np.random.default_rng(0).integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    tensor = to_uint8(Image.fromarray(array), prep(size=6, channels=3))
    assert torch.equal(tensor, torch.from_numpy(array).permute(2, 0, 1))


def test_to_uint8_grayscale_of_rgb_uses_luminance() -> None:
    tensor = to_uint8(Image.new("RGB", (4, 4), (0, 255, 0)), prep(size=4, channels=1))
    # ITU-R 601-2 luma: L = R * 299/1000 + G * 587/1000 + B * 114/1000
    assert tensor.unique().tolist() == [150]


def test_to_uint8_gray_to_rgb_repeats_the_channel() -> None:
    tensor = to_uint8(Image.new("L", (4, 4), 77), prep(size=4, channels=3))
    assert tensor.unique().tolist() == [77]
    assert tuple(tensor.shape) == (3, 4, 4)


def test_to_uint8_resizes_with_antialiasing() -> None:
    # one white column in eight, shrunk 8x: an antialiased resize averages it to ~255/8 everywhere,
    # plain bilinear sampling would miss the white columns and give black
    lines = np.zeros((64, 64), dtype=np.uint8)
    lines[:, ::8] = 255
    tensor = to_uint8(Image.fromarray(lines), prep(size=8, channels=1)).float()
    assert 15 <= float(tensor.min()) <= float(tensor.max()) <= 45
    assert float(tensor[:, :, 1:-1].mean()) == pytest.approx(255 / 8, abs=2)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
@pytest.mark.parametrize("channels", [1, 3])
def test_transparent_pixels_become_white(mode: str, channels: int) -> None:
    colour = (0, 0, 0, 0) if mode == "RGBA" else (0, 0)
    tensor = to_uint8(Image.new(mode, (6, 6), colour), prep(size=6, channels=channels))
    assert tensor.unique().tolist() == [255]


def test_opaque_pixels_keep_their_colour_next_to_transparent_ones() -> None:
    array = np.zeros((4, 4, 4), dtype=np.uint8)
    array[:2] = (10, 20, 30, 255)  # top half opaque dark blue-ish, bottom half fully transparent black
    tensor = to_uint8(Image.fromarray(array, "RGBA"), prep(size=4, channels=3))
    assert tensor[:, :2].permute(1, 2, 0).reshape(-1, 3).unique(dim=0).tolist() == [[10, 20, 30]]
    assert tensor[:, 2:].unique().tolist() == [255]


def test_half_transparent_pixels_are_blended_with_white() -> None:
    tensor = to_uint8(Image.new("RGBA", (2, 2), (0, 0, 0, 128)), prep(size=2, channels=1))
    assert 120 <= int(tensor[0, 0, 0]) <= 135


def test_palette_transparency_becomes_white() -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 200, 0, 0] + [0] * (256 * 3 - 6))
    image.putpixel((0, 0), 1)
    image.info["transparency"] = 0  # index 0 (black) is transparent
    decoded = decode_image(encode(image, "PNG"))
    tensor = to_uint8(decoded, prep(size=4, channels=3))
    assert tensor[:, 0, 0].tolist() == [200, 0, 0]
    assert tensor[:, 3, 3].tolist() == [255, 255, 255]


def test_sixteen_bit_grayscale_keeps_its_contrast() -> None:
    decoded = decode_image(encode(sixteen_bit_gradient(), "PNG"))
    assert decoded.mode.startswith("I;16")
    row = to_uint8(decoded, prep(size=64, channels=1))[0, 0].int()
    assert int(row[0]) == 0
    assert int(row[-1]) == 255
    assert len(row.unique()) > 50, "a clipped conversion would be almost all 255"
    assert bool((row[1:] >= row[:-1]).all()), "the gradient stays monotonic"
    mid = int(row[32])
    assert 110 < mid < 145


def test_sixteen_bit_grayscale_to_rgb_keeps_its_contrast() -> None:
    tensor = to_uint8(sixteen_bit_gradient(), prep(size=64, channels=3))
    assert int(tensor.min()) == 0
    assert int(tensor.max()) == 255
    assert torch.equal(tensor[0], tensor[1])


def test_sixteen_bit_scaling_does_not_depend_on_the_image_content() -> None:
    dim = Image.fromarray(np.full((4, 4), 255, dtype=np.uint16))
    brighter = Image.fromarray(np.full((4, 4), 256, dtype=np.uint16))
    assert dim.mode.startswith("I;16")
    assert brighter.mode.startswith("I;16")
    p = prep(size=4, channels=1)
    assert int(to_uint8(dim, p).max()) <= int(to_uint8(brighter, p).max())
    # one fixed 16 → 8 bit scale for every image: 0 is black, 65535 white, 32768 mid-grey
    values = Image.fromarray(np.array([[0, 256, 32768, 65535]] * 4, dtype=np.uint16))
    assert to_uint8(values, p)[0, 0].tolist() == [0, 1, 128, 255]


def test_float_image_in_unit_range_is_scaled() -> None:
    image = Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32))
    assert image.mode == "F"
    assert to_uint8(image, prep(size=4, channels=1)).unique().tolist() == [127]


def test_float_scaling_does_not_depend_on_the_image_content() -> None:
    p = prep(size=4, channels=1)
    at_one = to_uint8(Image.fromarray(np.full((4, 4), 1.0, dtype=np.float32)), p)
    just_over = to_uint8(Image.fromarray(np.full((4, 4), 1.01, dtype=np.float32)), p)
    assert abs(int(at_one.max()) - int(just_over.max())) <= 3


# ---------------------------------------------------------------- normalize / eval_input


def test_normalize_math() -> None:
    batch = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).repeat(2, 1, 2, 2)
    p = Preprocessing(image_size=2, channels=3, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    out = normalize(batch, p)
    assert out.dtype == torch.float32
    assert out.shape == batch.shape
    expected = torch.tensor([(0.0 - 0.1) / 0.5, (0.2 - 0.2) / 0.25, (1.0 - 0.3) / 2.0])
    torch.testing.assert_close(out[1, :, 1, 0], expected)
    torch.testing.assert_close(out, expected.view(1, 3, 1, 1).expand(2, 3, 2, 2))
    assert batch.dtype == torch.uint8
    assert batch[0, 1, 0, 0] == 51, "the input batch is not modified"


def test_normalize_single_image_and_grayscale() -> None:
    image = torch.full((1, 3, 3), 255, dtype=torch.uint8)
    out = normalize(image, Preprocessing(image_size=3, channels=1, mean=(0.5,), std=(0.5,)))
    torch.testing.assert_close(out, torch.ones(1, 3, 3))


def test_eval_input_is_a_normalised_batch_of_one() -> None:
    p = Preprocessing(image_size=8, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    image = decode_image(noise_png(4, size=(13, 21), mode="RGB"))
    tensor = eval_input(image, p)
    assert tuple(tensor.shape) == (1, 3, 8, 8)
    torch.testing.assert_close(tensor[0], normalize(to_uint8(image, p), p))


# ---------------------------------------------------------------- Preprocessing


@pytest.mark.parametrize(
    "p",
    [
        Preprocessing(image_size=224, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD),
        Preprocessing(image_size=28, channels=1, mean=(0.1307,), std=(0.3081,)),
    ],
)
def test_meta_round_trip_through_json(p: Preprocessing) -> None:
    meta = json.loads(json.dumps(p.to_meta()))
    assert meta == {
        "image_size": p.image_size,
        "channels": p.channels,
        "mean": list(p.mean),
        "std": list(p.std),
    }
    restored = Preprocessing.from_meta(meta)
    assert restored == p
    assert isinstance(restored.mean, tuple)
    assert hash(restored) == hash(p)


def test_from_meta_coerces_types() -> None:
    restored = Preprocessing.from_meta({"image_size": "32", "channels": 1.0, "mean": [0], "std": ["0.5"]})
    assert restored == Preprocessing(image_size=32, channels=1, mean=(0.0,), std=(0.5,))


def test_for_channels_folds_an_rgb_preset_to_one_channel() -> None:
    p = Preprocessing.for_channels(image_size=32, channels=1, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert p.channels == 1
    assert len(p.mean) == len(p.std) == 1
    assert p.mean[0] == pytest.approx(sum(IMAGENET_MEAN) / 3)
    assert p.std[0] == pytest.approx(sum(IMAGENET_STD) / 3)


def test_for_channels_keeps_an_rgb_preset_for_rgb_data() -> None:
    p = Preprocessing.for_channels(image_size=32, channels=3, mean=list(IMAGENET_MEAN), std=IMAGENET_STD)
    assert p == Preprocessing(image_size=32, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def test_for_channels_keeps_a_one_channel_preset() -> None:
    p = Preprocessing.for_channels(image_size=28, channels=1, mean=[0.1307], std=[0.3081])
    assert p == Preprocessing(image_size=28, channels=1, mean=(0.1307,), std=(0.3081,))


def test_folded_preset_normalises_grayscale_like_the_rgb_preset_on_gray_pixels() -> None:
    rgb = Preprocessing(image_size=4, channels=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    gray = Preprocessing.for_channels(image_size=4, channels=1, mean=rgb.mean, std=rgb.std)
    image = Image.new("L", (4, 4), 200)
    torch.testing.assert_close(eval_input(image, gray)[0, 0], eval_input(image, rgb)[0, 0])


def test_a_30000x30000_png_of_a_few_bytes_is_refused_without_allocating_it() -> None:
    import resource

    data = png_declaring(30_000, 30_000)  # 900 megapixels: 900 MB if Pillow allocated it
    assert len(data) < 100
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with pytest.raises(ImageDecodeError, match=r"^image too large: over the limit of 1000000 pixels"):
        decode_image(data, max_pixels=1_000_000)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 100 * 1024


def test_psd_and_eps_renamed_png_never_reach_their_parsers() -> None:
    from PIL import EpsImagePlugin, PsdImagePlugin

    eps = encode(Image.new("RGB", (8, 8), "red"), "EPS")
    psd = b"8BPS\x00\x01" + b"\x00" * 64
    assert EpsImagePlugin._accept(eps) and PsdImagePlugin._accept(psd), "Pillow would claim both"
    for data in (eps, psd):
        with pytest.raises(ImageDecodeError, match="not a supported image"):
            decode_image(data)
