"""Finishing fixtures: tiny random upscalers and a tiny random BLIP captioner built in code
and saved as real ones are (an ESRGAN state dict in .pth and .safetensors, a BLIP folder by
save_pretrained), and runs with reviewed keepers."""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.PngImagePlugin
import pytest
import torch
from sqlalchemy.orm import Session

from db.models import Decision, ReviewItem
from pixelmill.storage import Storage
from review.queue import claim_next, decide, submit, sync_queue
from tests.factories import make_reviewer
from tests.review.factory import MadeRun, make_run
from worker.finishing.tiny import build_tiny_captioner, build_tiny_upscaler

LEASE = timedelta(minutes=10)
PARAMETERS = "a brass lamp\nSteps: 2, Sampler: Euler, CFG scale: 7.0, Seed: 1, Size: 32x24"


def real_esrgan_state_dict(
    *, scale: int = 4, num_feat: int = 8, blocks: int = 1, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A random state dict in Real-ESRGAN's own layout (basicsr's RRDBNet: conv_first,
    body.N.rdbM.convK, conv_body, conv_up1/2, conv_hr, conv_last; 32 growth channels, as
    every RRDBNet has). x2 models see the image pixel-unshuffled by 2: 12 input channels."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def conv(name: str, out_channels: int, in_channels: int) -> None:
        shape = (out_channels, in_channels, 3, 3)
        state[f"{name}.weight"] = torch.randn(shape, generator=generator) * 0.05
        state[f"{name}.bias"] = torch.zeros(out_channels)

    grow = 32
    conv("conv_first", num_feat, 3 * (4 if scale == 2 else 1))
    for block in range(blocks):
        for rdb in (1, 2, 3):
            for number in range(1, 6):
                out_channels = num_feat if number == 5 else grow
                conv(
                    f"body.{block}.rdb{rdb}.conv{number}",
                    out_channels,
                    num_feat + (number - 1) * grow,
                )
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        conv(name, num_feat, num_feat)
    conv("conv_last", 3, num_feat)
    return state


@dataclass(frozen=True)
class Models:
    esrgan_x4: Path  # spandrel's RRDBNet layout, safetensors
    real_esrgan_x4: Path  # Real-ESRGAN's layout, .pth
    real_esrgan_x2: Path  # Real-ESRGAN x2plus's layout (pixel-unshuffle), .pth
    blip: Path  # a BLIP folder


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    folder = tmp_path_factory.mktemp("finishing-models")
    made = Models(
        esrgan_x4=build_tiny_upscaler(folder / "esrgan-x4.safetensors"),
        real_esrgan_x4=folder / "real-esrgan-x4.pth",
        real_esrgan_x2=folder / "real-esrgan-x2.pth",
        blip=build_tiny_captioner(folder / "blip"),
    )
    torch.save(real_esrgan_state_dict(scale=4), made.real_esrgan_x4)
    torch.save(real_esrgan_state_dict(scale=2, seed=1), made.real_esrgan_x2)
    return made


def noise_png(width: int, height: int, seed: int) -> bytes:
    """A render-like PNG of noise, with the generation parameters' text chunk."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text("parameters", PARAMETERS)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels, "RGB").save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def reviewed_run(
    session: Session,
    storage: Storage,
    *,
    items: int = 2,
    open_items: int = 1,
    size: tuple[int, int] = (32, 24),
    fields: list[dict[str, object]] | None = None,
) -> MadeRun:
    """A run of ``items + open_items`` items of two images (noise of ``size``) each, reviewed
    as a person would: the first image of each kept, the second rejected, and the first
    ``items`` submitted; of the open ones, the first is decided but not submitted, the rest
    not reviewed. ``fields`` replaces the items' fields. Commits."""
    made = make_run(
        session, items=items + open_items, templates=("studio",), seeds=2, storage=storage
    )
    for item, values in zip(made.items, fields or [], strict=False):
        item.fields = values
    for number, image in enumerate(made.images):
        storage.put(image.storage_key, noise_png(*size, seed=number), content_type="image/png")
    session.commit()
    reviewer = make_reviewer(session)
    sync_queue(session)
    for number in range(items + min(open_items, 1)):
        item_id = claim_next(session, run_id=made.run.id, reviewer_id=reviewer.id, lease=LEASE)
        assert item_id is not None
        review_item = session.get(ReviewItem, item_id)
        assert review_item is not None
        item = next(i for i in made.items if i.id == review_item.item_id)
        first, second = made.images_of(item)
        decide(session, item_id, first.id, Decision.KEEP, reviewer_id=reviewer.id, lease=LEASE)
        decide(session, item_id, second.id, Decision.REJECT, reviewer_id=reviewer.id, lease=LEASE)
        if number < items:
            submit(session, item_id, reviewer_id=reviewer.id, lease=LEASE)
    return made
