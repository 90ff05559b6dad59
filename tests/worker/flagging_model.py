"""A copy of the tiny model whose safety checker flags every image.

StableDiffusionSafetyChecker flags an image when cos(image, concept) - threshold > 0 for any
concept; cosines are >= -1, so thresholds of -2 flag everything.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def make_flagging_model(tiny_model_dir: Path, out_dir: Path) -> Path:
    shutil.copytree(tiny_model_dir, out_dir)
    weights = out_dir / "safety_checker" / "model.safetensors"
    tensors = load_file(str(weights))
    for name in ("concept_embeds_weights", "special_care_embeds_weights"):
        assert name in tensors, sorted(tensors)
        tensors[name] = torch.full_like(tensors[name], -2.0)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return out_dir
