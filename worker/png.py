"""PNG encoding with AUTOMATIC1111-compatible generation metadata.

Tools that read A1111 images (the web UI's "PNG Info" tab, civitai, image browsers) look
for a text chunk named "parameters" holding a prompt block followed by one settings line.
"""

from __future__ import annotations

import io

import PIL.Image
import PIL.PngImagePlugin

PARAMETERS_KEY = "parameters"


def a1111_parameters(
    *,
    prompt: str,
    negative_prompt: str,
    steps: int,
    sampler: str,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    model_name: str,
    model_hash: str | None,
    version: str,
) -> str:
    """The A1111 "parameters" text, e.g.::

    a cat
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 123, Size: 512x512, Model hash: ...
    """
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    settings = [
        f"Steps: {steps}",
        f"Sampler: {sampler}",
        f"CFG scale: {float(cfg_scale)}",
        f"Seed: {seed}",
        f"Size: {width}x{height}",
    ]
    if model_hash is not None:
        settings.append(f"Model hash: {model_hash}")
    settings.append(f"Model: {model_name}")
    settings.append(f"Version: {version}")
    lines.append(", ".join(settings))
    return "\n".join(lines)


def _is_latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def encode_png(image: PIL.Image.Image, *, parameters: str, compress_level: int = 1) -> bytes:
    """PNG bytes of ``image`` with ``parameters`` in a "parameters" text chunk.

    tEXt is latin-1 only, so non-latin text (e.g. a Chinese prompt) goes in a UTF-8 iTXt
    chunk instead. compress_level 1: nightly batches are CPU-bound on encoding, and level 1
    is several times faster than the default for only slightly larger files.
    """
    info = PIL.PngImagePlugin.PngInfo()
    if _is_latin1(parameters):
        info.add_text(PARAMETERS_KEY, parameters)
    else:
        info.add_itxt(PARAMETERS_KEY, parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    return buffer.getvalue()


def read_parameters(png: bytes) -> str | None:
    """The "parameters" text of a PNG (tEXt, zTXt or iTXt), or None if it has none."""
    with PIL.Image.open(io.BytesIO(png)) as image:
        if not isinstance(image, PIL.PngImagePlugin.PngImageFile):
            raise ValueError("not a PNG image")
        # .text reads every text chunk, including any after the image data.
        value = image.text.get(PARAMETERS_KEY)
    return None if value is None else str(value)
