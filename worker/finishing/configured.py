"""The finisher the settings describe: the upscaler and the captioner they name, loaded on
the worker's device, with the database and storage they point at."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from pixelmill.settings import TINY_MODEL, Settings
from pixelmill.storage import Storage, storage_from_settings
from worker.finishing.caption import Captioner, check_caption_source, load_captioner
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


def check_finishing_models(settings: Settings) -> None:
    """A configured upscale or caption model the workers could not use, refused before any
    work starts (a BadInputError naming the setting): the upscaler is loaded (a small file,
    read on the CPU), the captioner's folder or hub id checked without reading its weights.
    The built-in tiny ones are not built here: they are always usable, and a refusal writes
    nothing."""
    if settings.upscale_model and settings.upscale_model != TINY_MODEL:
        load_upscaler(settings.upscale_model, scale=settings.upscale_scale, device="cpu")
    if settings.caption_model and settings.caption_model != TINY_MODEL:
        check_caption_source(settings.caption_model)


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
