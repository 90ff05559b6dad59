"""The scorer: a CLIP model (and optionally an aesthetic head) run on each decoded batch.

Images arrive as the pipeline's float tensors in [0, 1] on the render device; they are
resized and normalised there, with no round trip through PIL, so scoring adds one small
forward pass per batch. The prompt's text embedding (and the catalogue photo's image
embedding) is computed once per job and reused for every seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from pixelmill.errors import BadInputError
from pixelmill.keeper import embedding_to_bytes
from worker.identity import model_sha256
from worker.scoring.aesthetic import load_aesthetic_head

log = logging.getLogger(__name__)

# OpenAI CLIP's normalisation, used by every CLIP checkpoint unless its processor says other.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ScorerError(BadInputError):
    """The configured scorer cannot be loaded."""


@dataclass(frozen=True)
class ImageScores:
    embedding: bytes  # L2-normalised float16
    clip_score: float  # cosine similarity to the prompt
    aesthetic_score: float | None
    image_similarity: float | None  # cosine similarity to the job's catalogue photo


class Scorer:
    """Scores batches of rendered images against their prompt."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: object,
        *,
        identity: str,
        image_size: int,
        mean: tuple[float, ...] = CLIP_MEAN,
        std: tuple[float, ...] = CLIP_STD,
        head: torch.nn.Module | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(self.device, dtype).eval()
        self.tokenizer = tokenizer
        self.identity = identity
        self.image_size = image_size
        self.mean = torch.tensor(mean, device=self.device, dtype=dtype).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device, dtype=dtype).view(1, 3, 1, 1)
        self.head = None if head is None else head.to(self.device, torch.float32).eval()
        self._text_cache: dict[str, torch.Tensor] = {}

    @torch.inference_mode()
    def text_embedding(self, prompt: str) -> torch.Tensor:
        cached = self._text_cache.get(prompt)
        if cached is None:
            tokens = self.tokenizer(  # type: ignore[operator]
                [prompt],
                padding="max_length",
                truncation=True,
                max_length=self.tokenizer.model_max_length,  # type: ignore[attr-defined]
                return_tensors="pt",
            )
            features = self.model.get_text_features(  # type: ignore[operator]
                input_ids=tokens.input_ids.to(self.device)
            )
            cached = F.normalize(_as_tensor(features).float(), dim=-1)[0]
            if len(self._text_cache) > 64:  # a worker sees many prompts: keep the recent ones
                self._text_cache.clear()
            self._text_cache[prompt] = cached
        return cached

    @torch.inference_mode()
    def image_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings of images given as (N, 3, H, W) floats in [0, 1]."""
        pixels = pixels.to(self.device, self.dtype)
        resized = F.interpolate(
            pixels,
            size=(self.image_size, self.image_size),
            mode="bicubic",
            align_corners=False,
            antialias=True,
        )
        normalised = (resized.clamp(0, 1) - self.mean) / self.std
        features = self.model.get_image_features(pixel_values=normalised)  # type: ignore[operator]
        return F.normalize(_as_tensor(features).float(), dim=-1)

    @torch.inference_mode()
    def score(
        self, pixels: torch.Tensor, prompt: str, reference: torch.Tensor | None = None
    ) -> list[ImageScores]:
        """Scores of a batch; ``reference`` is the job's catalogue photo as (3, H, W)."""
        photo = None if reference is None else self.photo_embedding(reference)
        return self.score_against(pixels, prompt, photo)

    @torch.inference_mode()
    def photo_embedding(self, reference: torch.Tensor) -> torch.Tensor:
        """The embedding of a catalogue photo given as (3, H, W): computed once per job."""
        return self.image_embeddings(reference.unsqueeze(0))[0]

    @torch.inference_mode()
    def score_against(
        self, pixels: torch.Tensor, prompt: str, photo: torch.Tensor | None
    ) -> list[ImageScores]:
        """Scores of a batch against ``prompt`` and a photo's embedding (None: no photo)."""
        embeddings = self.image_embeddings(pixels)
        columns = [(embeddings @ self.text_embedding(prompt)).clamp(-1, 1)]
        if self.head is not None:
            columns.append(self.head(embeddings).squeeze(-1))
        if photo is not None:
            columns.append((embeddings @ photo).clamp(-1, 1))
        # One transfer from the device for the whole batch, not one per value.
        values = torch.stack(columns, dim=1).cpu().tolist()
        vectors = embeddings.cpu().numpy()
        has_head, has_photo = self.head is not None, photo is not None
        return [
            ImageScores(
                embedding=embedding_to_bytes(vector),
                clip_score=float(row[0]),
                aesthetic_score=float(row[1]) if has_head else None,
                image_similarity=float(row[-1]) if has_photo else None,
            )
            for vector, row in zip(vectors, values, strict=True)
        ]


def pixels_of(image: PIL.Image.Image) -> torch.Tensor:
    """(3, H, W) floats in [0, 1]: what the pipeline hands the scorer, from a PIL image (a
    stored PNG, a catalogue photo)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _as_tensor(features: object) -> torch.Tensor:
    """transformers 5 may return a model output where 4.x returned the tensor."""
    if isinstance(features, torch.Tensor):
        return features
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(features, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"unexpected CLIP features of type {type(features).__name__}")


def _normalisation(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    config = folder / "preprocessor_config.json"
    if not config.is_file():
        return CLIP_MEAN, CLIP_STD
    data = json.loads(config.read_text(encoding="utf-8"))
    return tuple(data.get("image_mean", CLIP_MEAN)), tuple(data.get("image_std", CLIP_STD))


def scorer_identity(model_sha: str | None, name: str, head: Path | None) -> str:
    """sha256 over the CLIP weights' and the head's: what image_scores.scorer records."""
    digest = hashlib.sha256((model_sha or f"name:{name}").encode())
    if head is not None:
        digest.update(b"\0head\0")
        digest.update(hashlib.sha256(head.read_bytes()).digest())
    return digest.hexdigest()


def load_scorer(
    name: str,
    *,
    head_path: Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_file: Path | None = None,
) -> Scorer:
    """A scorer from a local CLIP folder or a hub id (through ``CLIPModel.from_pretrained``)."""
    from transformers import AutoTokenizer, CLIPModel

    try:
        model = CLIPModel.from_pretrained(name)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise ScorerError(f"scorer {name!r}: cannot load a CLIP model ({exc})") from exc
    folder = Path(name)
    mean, std = _normalisation(folder) if folder.is_dir() else (CLIP_MEAN, CLIP_STD)
    head = None
    if head_path is not None:
        head = load_aesthetic_head(head_path, embedding_size=int(model.config.projection_dim or 0))
    identity = scorer_identity(model_sha256(name, cache_file=cache_file), name, head_path)
    log.info("scorer %s loaded (%s)", name, identity[:10])
    return Scorer(
        model,
        tokenizer,
        identity=identity,
        image_size=int(model.config.vision_config.image_size),  # type: ignore[union-attr,arg-type]
        mean=mean,
        std=std,
        head=head,
        device=device,
        dtype=dtype,
    )
