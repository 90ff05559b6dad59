"""Captions and alt text for kept images, by a BLIP captioning model (transformers'
``BlipForConditionalGeneration`` with its processor).

The caption describes the image in the model's words ("a brass lamp on a wooden table"); an
optional prompt starts it ("a product photo of", BLIP's conditional captioning) and is left
out of what is stored. The alt text is the caption as one sentence, short enough for the
screen readers' and marketplaces' usual limit (125 characters by default), cut at a word.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from pixelmill.errors import BadInputError
from pixelmill.settings import is_hub_id
from worker.identity import model_sha256

log = logging.getLogger(__name__)


class CaptionerError(BadInputError):
    """The configured caption model cannot be used."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        super().__init__(f"PIXELMILL_CAPTION_MODEL {name}: {reason}")


@dataclass
class Captioner:
    model: Any  # BlipForConditionalGeneration, on its device
    processor: Any  # BlipProcessor
    name: str
    identity: str  # sha256 over the weight files (or over the hub id, for a remote model)
    prompt: str = ""
    max_tokens: int = 30
    beams: int = 3

    def caption(self, image: PIL.Image.Image) -> str:
        """The image's caption, without the prompt ("" if the model says nothing)."""
        inputs = self.processor(
            images=image.convert("RGB"), text=self.prompt or None, return_tensors="pt"
        )
        device, dtype = self.model.device, self.model.dtype
        inputs = {
            key: value.to(device, dtype) if key == "pixel_values" else value.to(device)
            for key, value in inputs.items()
        }
        with torch.inference_mode():
            ids = self.model.generate(
                **inputs, max_new_tokens=self.max_tokens, min_new_tokens=1, num_beams=self.beams
            )
        text = " ".join(self.processor.decode(ids[0], skip_special_tokens=True).split())
        return _without_prompt(text, self.prompt)


def _without_prompt(text: str, prompt: str) -> str:
    """BLIP repeats the prompt (lower-cased, re-spaced by its tokenizer) before the rest."""
    words = prompt.split()
    if words and text.lower().split()[: len(words)] == [word.lower() for word in words]:
        return " ".join(text.split()[len(words) :])
    return text


def alt_text(caption: str, max_chars: int = 125) -> str:
    """The caption as one sentence of at most ``max_chars`` characters: a capital first,
    a full stop last, cut at a word boundary where it is too long."""
    text = " ".join(caption.split()).rstrip(" .,;:")
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    if len(text) + 1 > max_chars:
        cut = text[: max_chars - 1]
        space = cut.rfind(" ")
        text = (cut[:space] if space > 0 else cut).rstrip(" .,;:")
    return text if text.endswith(("!", "?")) else text + "."


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """No transformers progress bars (loading and saving weights) in the meantime: a worker
    logs one line per model instead."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def _identity(name: str, cache_file: Path | None) -> str:
    return (
        model_sha256(name, cache_file=cache_file)
        or hashlib.sha256(f"name:{name}".encode()).hexdigest()
    )


def _image_processor_class() -> Any:
    """BLIP's image processor; its PIL flavour where torchvision is absent (transformers
    falls back to it anyway, with a warning on every load)."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import BlipImageProcessor

        return BlipImageProcessor
    from transformers import BlipImageProcessorPil

    return BlipImageProcessorPil


def _read(name: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoTokenizer, BlipForConditionalGeneration, BlipProcessor

    try:
        config = AutoConfig.from_pretrained(name)
        if config.model_type != "blip":
            raise CaptionerError(name, f"a {config.model_type!r} model, not a BLIP captioner")
        model: Any = BlipForConditionalGeneration.from_pretrained(name)
        processor = BlipProcessor(
            image_processor=_image_processor_class().from_pretrained(name),
            tokenizer=AutoTokenizer.from_pretrained(name),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise CaptionerError(name, f"cannot load a BLIP captioner ({reason[:300]})") from None
    model = model.to(device=device, dtype=dtype)
    return model.eval(), processor


def check_caption_source(name: str) -> Path:
    """The folder ``name`` names; :class:`CaptionerError` if it is neither a folder nor a hub
    id (a hub id is only known to exist once loaded)."""
    folder = Path(name).expanduser()
    if not folder.exists() and not is_hub_id(name):
        raise CaptionerError(name, "no such folder (and not a hub id)")
    if folder.exists() and not (folder / "config.json").is_file():
        raise CaptionerError(name, "no config.json in the folder (not a transformers model)")
    return folder


def load_captioner(
    name: str,
    *,
    prompt: str = "",
    max_tokens: int = 30,
    beams: int = 3,
    device: torch.device | str = "cpu",
    cache_file: Path | None = None,
) -> Captioner:
    """The BLIP captioner in the folder ``name`` (or the hub id), on ``device`` (float16 on
    CUDA). :class:`CaptionerError` names it when it cannot be loaded."""
    folder = check_caption_source(name)
    device = torch.device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    source = str(folder) if folder.exists() else name
    with quiet_progress():
        model, processor = _read(source, device, dtype)
    identity = _identity(source, cache_file)
    log.info("captioner %s loaded (%s)", name, identity[:10])
    return Captioner(model, processor, name, identity, prompt, max_tokens, beams)
