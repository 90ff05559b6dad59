"""Upscaling through spandrel: tiny random ESRGAN state dicts built in code, saved, and read
back by spandrel's ModelLoader; tiling that bounds memory and leaves no seams; model files
that cannot serve named in one clear error."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch

from pixelmill.errors import BadInputError
from tests.worker.finishing.conftest import Models, real_esrgan_state_dict
from worker.finishing.upscale import Upscaler, UpscalerError, import_spandrel, load_upscaler


def noise(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels, "RGB")


@pytest.mark.parametrize(
    ("model", "architecture", "native"),
    [("esrgan_x4", "ESRGAN", 4), ("real_esrgan_x4", "ESRGAN", 4), ("real_esrgan_x2", "ESRGAN", 2)],
)
def test_state_dicts_load_through_spandrel(
    models: Models, model: str, architecture: str, native: int
) -> None:
    """spandrel's own RRDBNet layout (safetensors) and Real-ESRGAN's (.pth, x4 and the
    pixel-unshuffling x2) are recognised from the state dict alone."""
    upscaler = load_upscaler(getattr(models, model), scale=2)
    assert upscaler.model.architecture.name == architecture
    assert upscaler.native_scale == native
    assert len(upscaler.identity) == 64
    result = upscaler.upscale(noise(12, 8))
    assert result.size == (24, 16) and result.mode == "RGB"


def test_x4_and_a_x4_model_resized_to_x2(models: Models) -> None:
    image = noise(10, 6)
    assert load_upscaler(models.esrgan_x4, scale=4).upscale(image).size == (40, 24)
    assert load_upscaler(models.esrgan_x4, scale=2).upscale(image).size == (20, 12)


def test_upscaling_is_deterministic(models: Models) -> None:
    upscaler = load_upscaler(models.real_esrgan_x4, scale=4, tile=8, overlap=4)
    image = noise(14, 10, seed=3)
    first, second = upscaler.upscale(image), upscaler.upscale(image)
    assert first.tobytes() == second.tobytes()


def test_tiles_with_enough_overlap_leave_no_seams(models: Models) -> None:
    """With an overlap wider than what the model looks at around a pixel, the tiled result is
    the image upscaled whole, to the bit; without overlap, tile edges show."""
    image = noise(40, 28, seed=1)
    whole = np.asarray(load_upscaler(models.esrgan_x4, tile=4096, overlap=0).upscale(image))
    tiled = np.asarray(load_upscaler(models.esrgan_x4, tile=16, overlap=24).upscale(image))
    seams = np.asarray(load_upscaler(models.esrgan_x4, tile=16, overlap=0).upscale(image))
    assert np.array_equal(whole, tiled)
    assert not np.array_equal(whole, seams)


class RecordingModel:
    """Stands in for spandrel's descriptor: nearest-neighbour x4, recording each input's size."""

    scale = 4
    device = torch.device("cpu")
    dtype = torch.float32
    tiling = None

    def __init__(self) -> None:
        self.sizes: list[tuple[int, int]] = []

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        self.sizes.append((tensor.shape[2], tensor.shape[3]))
        return tensor.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)


def test_memory_is_bounded_by_the_tile_whatever_the_image_size() -> None:
    """A 700x520 image reaches the model only as tiles of at most tile + 2 x overlap a side,
    and every output pixel comes from its own tile."""
    recorder = RecordingModel()
    upscaler = Upscaler(recorder, Path("nearest"), "0" * 64, scale=4, tile=128, overlap=16)
    image = noise(700, 520, seed=2)
    result = upscaler.upscale(image)
    assert result.size == (2800, 2080)
    assert max(max(size) for size in recorder.sizes) <= 128 + 2 * 16
    assert len(recorder.sizes) == 6 * 5
    expected = np.asarray(image).repeat(4, axis=0).repeat(4, axis=1)
    assert np.array_equal(np.asarray(result), expected)


def test_spandrel_is_imported_without_leaving_a_torchvision_behind() -> None:
    """Where torchvision is not installed, the stand-in spandrel is imported with is gone
    after: transformers and everything else still see no torchvision."""
    import_spandrel()
    try:
        import torchvision  # noqa: F401
    except ModuleNotFoundError:
        assert "torchvision" not in sys.modules
        from transformers.utils import is_torchvision_available

        assert not is_torchvision_available()


def _errors(path: Path, **options: Any) -> str:
    with pytest.raises(UpscalerError) as caught:
        load_upscaler(path, **options)
    assert isinstance(caught.value, BadInputError)
    message = str(caught.value)
    assert message.startswith(f"PIXELMILL_UPSCALE_MODEL {path}: ")
    return message


def test_bad_model_files_are_named_in_one_clear_error(tmp_path: Path, models: Models) -> None:
    assert "no such file" in _errors(tmp_path / "missing.pth")
    assert "not a file" in _errors(tmp_path)
    (tmp_path / "text.pth").write_text("not a model")
    assert "cannot read it as a model" in _errors(tmp_path / "text.pth")
    (tmp_path / "text.safetensors").write_text("not a model")
    assert "cannot read it as a model" in _errors(tmp_path / "text.safetensors")
    (tmp_path / "model.onnx").write_bytes(b"\0" * 16)
    assert "cannot read it as a model" in _errors(tmp_path / "model.onnx")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    assert "not a model architecture spandrel knows" in _errors(tmp_path / "other.pth")
    assert "a x2 model cannot upscale x4" in _errors(models.real_esrgan_x2, scale=4)


def test_a_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    import pickle

    class Payload:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (print, ("ran",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps(Payload()))
    assert "cannot read it as a model" in _errors(tmp_path / "evil.pth")


def test_a_restoration_model_is_no_upscaler(tmp_path: Path) -> None:
    """A 1x ESRGAN (denoising, deblurring) is a model spandrel knows, but upscales nothing."""
    state = real_esrgan_state_dict(scale=4)
    for name in ("conv_up1", "conv_up2"):
        del state[f"{name}.weight"], state[f"{name}.bias"]
    torch.save(state, tmp_path / "restore-1x.pth")
    assert "not a super-resolution" in _errors(tmp_path / "restore-1x.pth")
