"""One channel's derivative of an image: sRGB, the canvas (resized, padded or cropped), the
encoding, and the search for a quality (then a size) that fits the channel's byte limit."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from PIL import Image, ImageCms, ImageOps
from PIL.PngImagePlugin import PngInfo

from pixelmill.errors import BadInputError
from review.channels.presets import Preset

# What happens to an encoded file before its size is measured (the C2PA signature, which
# adds a few kilobytes): the limit holds for the file as written.
Finish = Callable[[bytes], bytes]
# When a file is over its limit even at the lowest quality, the size is lowered by the square
# root of the excess (bytes grow with the pixel count) and a little more.
SHRINK_MARGIN = 0.95
MAX_SHRINKS = 12


class DoesNotFitError(BadInputError):
    """The channel's byte limit cannot be met within its lowest quality and smallest size."""


@dataclass(frozen=True)
class Encoded:
    data: bytes
    width: int
    height: int
    quality: int | None


@cache
def srgb_profile() -> bytes:
    """The sRGB ICC profile embedded in converted files (littleCMS's built-in one)."""
    profile: bytes = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return profile


def open_source(data: bytes, preset: Preset) -> Image.Image:
    """The source decoded, upright, in sRGB when the preset asks, RGB or RGBA."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    icc = image.info.get("icc_profile")
    was_cmyk = image.mode == "CMYK"
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if image.mode not in ("RGB", "RGBA", "CMYK"):
        image = image.convert("RGBA" if has_alpha else "RGB")
    mode = "RGBA" if has_alpha else "RGB"
    if preset.srgb and icc:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            converted = ImageCms.profileToProfile(
                image, source, ImageCms.createProfile("sRGB"), outputMode=mode
            )
        except (ImageCms.PyCMSError, OSError, ValueError):
            converted = None  # an unreadable profile: the pixels are taken as sRGB
        if converted is not None:
            image = converted
    image = image.convert(mode) if image.mode != mode else image
    if not preset.srgb and icc and not was_cmyk:
        image.info["icc_profile"] = icc  # kept as it was, so the colours still read right
    return image


def canvas_size(preset: Preset, width: int, height: int, longer: int) -> tuple[int, int]:
    """The derivative's size when its longer side is ``longer`` (the preset's own or less)."""
    if preset.width is not None and preset.height is not None:
        scale = longer / max(preset.width, preset.height)
        return max(1, round(preset.width * scale)), max(1, round(preset.height * scale))
    scale = longer / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def shape(image: Image.Image, preset: Preset, longer: int) -> Image.Image:
    """The image on its canvas: resized, then padded or cropped to the canvas's aspect, and
    flattened onto the background unless that is transparent."""
    size = canvas_size(preset, image.width, image.height, longer)
    if preset.fit == "crop":
        placed = ImageOps.fit(image, size, method=Image.Resampling.LANCZOS)
        return _flatten(placed, preset)
    scale = min(size[0] / image.width, size[1] / image.height)
    inner = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resized = image.resize(inner, Image.Resampling.LANCZOS, reducing_gap=3.0)
    if inner == size:
        return _flatten(resized, preset)
    fill = (0, 0, 0, 0) if preset.background is None else (*preset.background, 255)
    canvas = Image.new("RGBA", size, fill)
    offset = ((size[0] - inner[0]) // 2, (size[1] - inner[1]) // 2)
    canvas.paste(resized, offset, resized if resized.mode == "RGBA" else None)
    if "icc_profile" in image.info:
        canvas.info["icc_profile"] = image.info["icc_profile"]
    return _flatten(canvas, preset)


def _flatten(image: Image.Image, preset: Preset) -> Image.Image:
    if image.mode != "RGBA":
        return image
    if preset.background is None:
        if image.getchannel("A").getextrema() == (255, 255):
            return _keep_info(image.convert("RGB"), image)
        return image
    flat = Image.new("RGB", image.size, preset.background)
    flat.paste(image, (0, 0), image)
    return _keep_info(flat, image)


def _keep_info(target: Image.Image, source: Image.Image) -> Image.Image:
    if "icc_profile" in source.info:
        target.info["icc_profile"] = source.info["icc_profile"]
    return target


def encode(image: Image.Image, preset: Preset, quality: int | None, xmp: bytes) -> bytes:
    """The file: the preset's format at ``quality``, with the XMP packet and the ICC profile
    (sRGB's when converted, else the source's if it had one). No EXIF is carried."""
    options: dict[str, object] = {}
    icc = srgb_profile() if preset.srgb else image.info.get("icc_profile")
    if icc:
        options["icc_profile"] = icc
    buffer = io.BytesIO()
    if preset.format == "jpeg":
        image.save(
            buffer, "JPEG", quality=quality, optimize=True, progressive=True, xmp=xmp, **options
        )
    elif preset.format == "webp":
        image.save(buffer, "WEBP", quality=quality, method=4, xmp=xmp, **options)
    else:
        # Pillow writes a PNG's XMP as the iTXt chunk XMP readers look for.
        info = PngInfo()
        info.add_itxt("XML:com.adobe.xmp", xmp.decode("utf-8"), zip=False)
        image.save(buffer, "PNG", optimize=True, pnginfo=info, **options)
    return buffer.getvalue()


def derive(source: Image.Image, preset: Preset, xmp: bytes, finish: Finish) -> Encoded:
    """The channel's file of ``source``: at the preset's size and quality, or, over its
    ``max_bytes``, at the highest quality down to ``min_quality`` that fits, then at a
    smaller size down to ``min_size``. Raises DoesNotFitError when nothing fits."""
    longer = preset.longer_side
    for _ in range(MAX_SHRINKS + 1):
        image = shape(source, preset, longer)
        data, quality, smallest = _best_quality(image, preset, xmp, finish)
        if data is not None:
            return Encoded(data, image.width, image.height, quality)
        floor = preset.min_size
        if floor is None or longer <= floor:
            break
        assert preset.max_bytes is not None
        ratio = math.sqrt(preset.max_bytes / smallest) * SHRINK_MARGIN
        longer = max(floor, min(longer - 1, math.floor(longer * ratio)))
    assert preset.max_bytes is not None
    lowest = f"quality {preset.min_quality}, " if preset.min_quality is not None else ""
    raise DoesNotFitError(
        f"channel {preset.name!r}: no file under max_bytes {preset.max_bytes} "
        f"({lowest}{longer} px: {smallest} bytes); raise max_bytes or lower min_quality/min_size"
    )


def _best_quality(
    image: Image.Image, preset: Preset, xmp: bytes, finish: Finish
) -> tuple[bytes | None, int | None, int]:
    """(file, quality, smallest size tried): the file at the highest quality that fits (None
    if none does)."""

    def attempt(quality: int | None) -> bytes:
        return finish(encode(image, preset, quality, xmp))

    data = attempt(preset.quality)
    limit = preset.max_bytes
    if limit is None or len(data) <= limit:
        return data, preset.quality, len(data)
    if preset.quality is None or preset.min_quality is None or preset.min_quality >= preset.quality:
        return None, None, len(data)
    low, high = preset.min_quality, preset.quality - 1
    best = attempt(low)
    if len(best) > limit:
        return None, None, len(best)
    best_quality = low
    low += 1
    while low <= high:  # the highest quality that fits: sizes grow with quality
        middle = (low + high) // 2
        candidate = attempt(middle)
        if len(candidate) <= limit:
            best, best_quality, low = candidate, middle, middle + 1
        else:
            high = middle - 1
    return best, best_quality, len(best)
