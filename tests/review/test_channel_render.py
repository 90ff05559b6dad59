"""A channel's derivative: the canvas (size, pad or crop, background), sRGB, the format and
its quality, the byte limit, and the XMP marking read back from each format."""

from __future__ import annotations

import io
import struct
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageCms

from review.channels.marking import TRAINED_ALGORITHMIC_MEDIA, digital_source_type, xmp_packet
from review.channels.presets import Preset
from review.channels.render import (
    DoesNotFitError,
    derive,
    encode,
    open_source,
    srgb_profile,
)


def png(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **options)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """Random pixels: they compress badly, so byte limits bite."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def same(data: bytes) -> bytes:
    return data


def channels(pixel: object) -> tuple[int, ...]:
    assert isinstance(pixel, tuple)
    return pixel


def near(pixel: object, colour: tuple[int, int, int], tolerance: int) -> bool:
    pixel = channels(pixel)
    return all(abs(a - b) <= tolerance for a, b in zip(pixel[:3], colour, strict=True))


def read(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


JPEG = Preset(name="main", format="jpeg", longer_side=400, width=400, height=400, quality=90)


def test_pad_centres_the_image_on_a_white_square() -> None:
    source = open_source(png(Image.new("RGB", (200, 100), (200, 0, 0))), JPEG)
    made = derive(source, JPEG, xmp_packet(), same)
    image = read(made.data)
    assert (image.format, image.size, made.width, made.height) == ("JPEG", (400, 400), 400, 400)
    assert near(image.getpixel((200, 5)), (255, 255, 255), 5)
    assert near(image.getpixel((200, 200)), (200, 0, 0), 11)


def test_crop_fills_the_canvas_and_a_plain_size_keeps_the_aspect() -> None:
    source = open_source(png(Image.new("RGB", (300, 100), (0, 0, 200))), JPEG)
    cropped = read(derive(source, replace(JPEG, fit="crop"), xmp_packet(), same).data)
    assert cropped.size == (400, 400)
    assert near(cropped.getpixel((2, 2)), (0, 0, 200), 11)
    longer = replace(JPEG, width=None, height=None, longer_side=600)
    assert read(derive(source, longer, xmp_packet(), same).data).size == (600, 200)


def test_transparency_is_kept_on_png_and_flattened_on_jpeg() -> None:
    clear = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    clear.paste((0, 200, 0, 255), (25, 25, 75, 75))
    as_png = Preset(name="p", format="png", longer_side=200, width=200, height=100, background=None)
    image = read(derive(open_source(png(clear), as_png), as_png, xmp_packet(), same).data)
    assert image.mode == "RGBA" and image.size == (200, 100)
    assert channels(image.getpixel((5, 50)))[3] == 0  # the padding is transparent
    assert image.getpixel((100, 50)) == (0, 200, 0, 255)
    flat = read(derive(open_source(png(clear), JPEG), JPEG, xmp_packet(), same).data)
    assert flat.mode == "RGB" and near(flat.getpixel((10, 10)), (255, 255, 255), 10)


def linear_rgb_profile() -> bytes:
    """An ICC profile that is not sRGB: sRGB's primaries with linear tone curves (littleCMS's
    sRGB profile with its parametric curve's parameters set to the identity)."""
    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    data[84:100] = bytes(16)  # the profile id (an MD5 of the rest) no longer holds
    (count,) = struct.unpack(">I", data[128:132])
    for index in range(count):
        signature, offset, _ = struct.unpack(">4sII", data[132 + 12 * index : 144 + 12 * index])
        if signature in (b"rTRC", b"gTRC", b"bTRC"):
            assert data[offset : offset + 4] == b"para"
            one, zero = struct.pack(">i", 1 << 16), bytes(4)
            data[offset + 12 : offset + 32] = one + one + zero + one + zero  # g a b c d
    return bytes(data)


def test_a_non_srgb_image_is_converted_and_tagged_srgb() -> None:
    linear = linear_rgb_profile()
    data = png(Image.new("RGB", (64, 64), (128, 128, 128)), icc_profile=linear)
    converted = open_source(data, JPEG)
    untouched = open_source(data, replace(JPEG, srgb=False))
    # Linear 50% grey is sRGB's 188.
    assert untouched.getpixel((0, 0)) == (128, 128, 128)
    assert near(converted.getpixel((0, 0)), (188, 188, 188), 2)
    made = read(derive(converted, JPEG, xmp_packet(), same).data)
    assert made.info["icc_profile"] == srgb_profile()
    kept = read(derive(untouched, replace(JPEG, srgb=False), xmp_packet(), same).data)
    assert kept.info["icc_profile"] == linear


@pytest.mark.parametrize("fmt", ["jpeg", "webp", "png"])
def test_every_format_carries_the_digital_source_type_in_xmp(fmt: str) -> None:
    quality = None if fmt == "png" else 80
    preset = Preset(name="x", format=fmt, longer_side=64, quality=quality)  # type: ignore[arg-type]
    data = encode(Image.new("RGB", (64, 64), (10, 20, 30)), preset, preset.quality, xmp_packet())
    assert read(data).format == {"jpeg": "JPEG", "webp": "WEBP", "png": "PNG"}[fmt]
    assert digital_source_type(data) == TRAINED_ALGORITHMIC_MEDIA
    assert b"trainedAlgorithmicMedia" in data


def test_over_the_byte_limit_the_quality_is_lowered() -> None:
    source = noise(400, 400)
    at_90 = len(encode(source, JPEG, 90, xmp_packet()))
    at_60 = len(encode(source, JPEG, 60, xmp_packet()))
    limit = (at_90 + at_60) // 2
    preset = replace(JPEG, max_bytes=limit, min_quality=60)
    made = derive(source, preset, xmp_packet(), same)
    assert len(made.data) <= limit and made.quality is not None and 60 <= made.quality < 90
    assert len(encode(source, JPEG, made.quality + 1, xmp_packet())) > limit  # the highest
    assert made.width == 400


def test_then_the_size_down_to_min_size_and_past_it_an_error() -> None:
    source = noise(400, 400)
    at_60 = len(encode(source, JPEG, 60, xmp_packet()))
    preset = replace(JPEG, max_bytes=at_60 // 3, min_quality=60, min_size=150)
    made = derive(source, preset, xmp_packet(), same)
    assert len(made.data) <= at_60 // 3 and 150 <= made.width < 400 and made.width == made.height
    with pytest.raises(DoesNotFitError, match="channel 'main': no file under max_bytes"):
        derive(source, replace(preset, max_bytes=1024, min_size=300), xmp_packet(), same)
    with pytest.raises(DoesNotFitError):
        derive(source, replace(preset, min_size=None), xmp_packet(), same)


def test_the_limit_holds_for_the_finished_file() -> None:
    source = noise(200, 200)
    plain = len(encode(source, JPEG, 90, xmp_packet()))
    padding = b"\0" * (plain // 2)
    preset = replace(JPEG, longer_side=200, width=200, height=200, max_bytes=plain, min_quality=30)
    made = derive(source, preset, xmp_packet(), lambda data: data + padding)
    assert len(made.data) <= plain and made.quality is not None and made.quality < 90
