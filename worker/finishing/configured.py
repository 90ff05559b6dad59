"""The finisher the settings describe: the upscaler and the captioner they name, loaded on
the worker's device, with the database and storage they point at."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from pixelmill.settings import Settings
from pixelmill.storage import Storage, storage_from_settings
from worker.finishing.caption import Captioner, load_captioner
from worker.finishing.finish import Finisher
from worker.finishing.tiny import resolve_caption_model, resolve_upscale_model
from worker.finishing.upscale import Upscaler, load_upscaler
from worker.loading import resolve_device


def upscaler_from_settings(settings: Settings) -> Upscaler | None:
    path = resolve_upscale_model(settings)
    if path is None:
        return None
    return load_upscaler(
        path,
        scale=settings.upscale_scale,
        tile=settings.upscale_tile,
        overlap=settings.upscale_tile_overlap,
        device=resolve_device(settings.device),
        cache_file=settings.model_hash_cache,
    )


def captioner_from_settings(settings: Settings) -> Captioner | None:
    name = resolve_caption_model(settings)
    if name is None:
        return None
    return load_captioner(
        name,
        prompt=settings.caption_prompt,
        max_tokens=settings.caption_max_tokens,
        beams=settings.caption_beams,
        device=resolve_device(settings.device),
        cache_file=settings.model_hash_cache,
    )


def finisher_from_settings(
    settings: Settings,
    *,
    sessions: sessionmaker[Session] | None = None,
    storage: Storage | None = None,
    upscale: bool = True,
    caption: bool = True,
) -> Finisher:
    """A finisher with the configured models (``upscale`` / ``caption`` False: without that
    model even where one is configured). A model that cannot be loaded is a BadInputError
    naming it and its setting."""
    if sessions is None:
        from db.session import make_engine, make_sessionmaker

        sessions = make_sessionmaker(make_engine(settings.resolved_database_url))
    return Finisher(
        settings=settings,
        sessions=sessions,
        storage=storage if storage is not None else storage_from_settings(settings),
        upscaler=upscaler_from_settings(settings) if upscale else None,
        captioner=captioner_from_settings(settings) if caption else None,
    )
