"""The scorer the settings name, loaded on the worker's device (or None: nothing scored)."""

from __future__ import annotations

from pixelmill.settings import Settings
from worker.loading import default_dtype, resolve_device
from worker.scoring.scorer import Scorer, load_scorer
from worker.scoring.tiny import resolve_scorer


def scorer_from_settings(settings: Settings) -> Scorer | None:
    resolved = resolve_scorer(settings)
    if resolved is None:
        return None
    name, head = resolved
    device = resolve_device(settings.device)
    return load_scorer(
        name,
        head_path=head,
        device=device,
        dtype=default_dtype(device),
        cache_file=settings.model_hash_cache,
    )
