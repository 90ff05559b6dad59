"""Upscaling kept images with a Real-ESRGAN-family model, read by spandrel from a model file.

spandrel recognises the architecture from the state dict alone (ESRGAN and Real-ESRGAN's
RRDBNet, Real-ESRGAN's compact SRVGGNet, SwinIR, ...), so any super-resolution file of a kind
it knows works. The image is processed in tiles: each tile is run with ``overlap`` pixels of
its neighbours around it and only its own part of the result is kept, so the model's memory
depends on the tile size alone, whatever the image's, and seams stay invisible as long as the
overlap covers what the model looks at around a pixel.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import pickle
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import PIL.Image
import torch

from pixelmill.errors import BadInputError
from worker.identity import model_sha256

log = logging.getLogger(__name__)

SCALES = (2, 4)


class UpscalerError(BadInputError):
    """The configured upscale model cannot be used: missing, unreadable, or not an upscaler."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = str(path)
        super().__init__(f"PIXELMILL_UPSCALE_MODEL {self.path}: {reason}")


def _torchvision_unavailable(*_: object, **__: object) -> NoReturn:
    raise RuntimeError("this model needs torchvision, which is not installed")


class _InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"


@contextlib.contextmanager
def _torchvision_stand_in() -> Iterator[None]:
    """A placeholder torchvision while spandrel is imported, removed after. spandrel imports
    three torchvision names for two architectures that are no upscalers (LaMa inpainting,
    RestoreFormer face restoration) and uses them only when such a model runs; the CPU torch
    wheel has no torchvision build to match it, and nothing else must see a stand-in."""
    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    modules = {name: types.ModuleType(name) for name in names}
    functional = modules["torchvision.transforms.functional"]
    functional.InterpolationMode = _InterpolationMode  # type: ignore[attr-defined]
    functional.rotate = _torchvision_unavailable  # type: ignore[attr-defined]
    functional.normalize = _torchvision_unavailable  # type: ignore[attr-defined]
    modules["torchvision"].transforms = modules["torchvision.transforms"]  # type: ignore[attr-defined]
    modules["torchvision.transforms"].functional = functional  # type: ignore[attr-defined]
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, module in modules.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


def import_spandrel() -> types.ModuleType:
    """spandrel, imported (with :func:`_torchvision_stand_in` where torchvision is absent)."""
    try:
        import spandrel
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing in ("spandrel", "einops"):
            raise BadInputError(
                f"PIXELMILL_UPSCALE_MODEL: upscaling needs {missing}, which is not installed "
                "(pip install einops; pip install --no-deps 'spandrel>=0.4.2,<0.5')"
            ) from None
        if missing != "torchvision":
            raise
    else:
        return spandrel
    with _torchvision_stand_in():
        import spandrel
    return spandrel


@dataclass
class Upscaler:
    """An upscale model on its device, and how it is run."""

    model: Any  # spandrel's ImageModelDescriptor
    path: Path
    identity: str  # sha256 of the model file
    scale: int  # of the result: 2 or 4
    tile: int
    overlap: int

    @property
    def native_scale(self) -> int:
        return int(self.model.scale)

    @property
    def name(self) -> str:
        return str(self.path)

    def upscale(self, image: PIL.Image.Image) -> PIL.Image.Image:
        """``image`` (as RGB) ``scale`` times larger on each side."""
        pixels = np.array(image.convert("RGB"))  # a writable copy: torch warns on read-only
        height, width = pixels.shape[:2]
        native = self.native_scale
        out = np.empty((height * native, width * native, 3), dtype=np.uint8)
        tile = max(height, width) if _tiles_itself(self.model) else self.tile
        for top in range(0, height, tile):
            for left in range(0, width, tile):
                box = (top, left, min(top + tile, height), min(left + tile, width))
                self._run_tile(pixels, out, box)
        result = PIL.Image.fromarray(out)
        if native != self.scale:
            result = result.resize(
                (width * self.scale, height * self.scale), PIL.Image.Resampling.LANCZOS
            )
        return result

    def _run_tile(
        self, pixels: np.ndarray, out: np.ndarray, box: tuple[int, int, int, int]
    ) -> None:
        """Upscale pixels[top:bottom, left:right] with ``overlap`` pixels of context around it
        into its place in ``out``."""
        top, left, bottom, right = box
        height, width = pixels.shape[:2]
        pad_top, pad_left = max(top - self.overlap, 0), max(left - self.overlap, 0)
        pad_bottom = min(bottom + self.overlap, height)
        pad_right = min(right + self.overlap, width)
        patch = torch.from_numpy(
            np.ascontiguousarray(pixels[pad_top:pad_bottom, pad_left:pad_right])
        )
        tensor = patch.permute(2, 0, 1)[None].to(self.model.device, self.model.dtype) / 255.0
        with torch.inference_mode():
            result = self.model(tensor)[0]
        s = self.native_scale
        kept = result[
            :,
            (top - pad_top) * s : (bottom - pad_top) * s,
            (left - pad_left) * s : (right - pad_left) * s,
        ]
        values = (kept.float().clamp(0, 1) * 255).round().to(torch.uint8)
        out[top * s : bottom * s, left * s : right * s] = values.permute(1, 2, 0).cpu().numpy()


def _tiles_itself(model: Any) -> bool:
    return bool(model.tiling == import_spandrel().ModelTiling.INTERNAL)


def _read_model(path: Path, device: torch.device) -> Any:
    from safetensors import SafetensorError

    spandrel = import_spandrel()
    try:
        return spandrel.ModelLoader(device=device).load_from_file(path)
    except spandrel.UnsupportedModelError:
        raise UpscalerError(path, "not a model architecture spandrel knows") from None
    # An unknown extension, a damaged or truncated file, a pickle that is no plain state dict
    # (spandrel's restricted unpickler refuses to run code).
    except (pickle.UnpicklingError, SafetensorError, ValueError, RuntimeError, OSError,
            KeyError, EOFError) as exc:  # fmt: skip
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise UpscalerError(path, f"cannot read it as a model ({reason[:300]})") from None


def load_upscaler(
    path: Path | str,
    *,
    scale: int = 4,
    tile: int = 256,
    overlap: int = 16,
    device: torch.device | str = "cpu",
    cache_file: Path | None = None,
) -> Upscaler:
    """The upscaler in the model file at ``path``, on ``device`` (float16 on CUDA where the
    model supports it). :class:`UpscalerError` names the file when it cannot serve: missing,
    unreadable, no super-resolution model, or a native scale smaller than ``scale``."""
    path = Path(path).expanduser()
    if scale not in SCALES:
        raise BadInputError(f"PIXELMILL_UPSCALE_SCALE: {scale}: use 2 or 4")
    if not path.is_file():
        raise UpscalerError(path, "no such file" if not path.exists() else "not a file")
    device = torch.device(device)
    model = _read_model(path, device)
    if getattr(model, "purpose", None) != "SR" or int(getattr(model, "scale", 1)) < 2:
        raise UpscalerError(path, "not a super-resolution (upscale) model")
    if model.input_channels != 3 or model.output_channels != 3:
        raise UpscalerError(path, "not an RGB model")
    if model.scale < scale:
        raise UpscalerError(path, f"a x{model.scale} model cannot upscale x{scale}")
    if device.type == "cuda" and model.supports_half:
        model = model.half()
    model.eval()
    identity = model_sha256(str(path), cache_file=cache_file)
    assert identity is not None  # a file that exists has a digest
    log.info(
        "upscaler %s loaded (%s x%d, %s)", path.name, model.architecture.name, model.scale,
        identity[:10],
    )  # fmt: skip
    return Upscaler(model, path, identity, scale, tile, overlap)
