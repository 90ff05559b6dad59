"""The demo after the render: a stand-in reviewer keeps the top-ranked image of each item and
submits it, as a person would in the review app; the demo's worker finishes the keepers on
its finishing queue (the tiny upscaler and captioner); the keepers are exported for every
channel of the presets into the data folder."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cli import common
from cli.common import console, fail
from pixelmill.settings import TINY_MODEL, Settings

if TYPE_CHECKING:
    from sqlalchemy import Select
    from sqlalchemy.orm import Session

# The stand-in's account: its decisions are told apart from a person's by this name.
DEMO_REVIEWER = "demo"
_TINY = {"upscale_model": "PIXELMILL_UPSCALE_MODEL", "caption_model": "PIXELMILL_CAPTION_MODEL"}


@dataclass
class Submitted:
    review_items: list[int] = field(default_factory=list)
    kept: int = 0
    ranked_by: set[str] = field(default_factory=set)


def tiny_finishing(settings: Settings) -> Settings:
    """The settings with the built-in tiny upscaler and captioner where none is configured
    (the variable unset, here and in .env), set in the environment the worker inherits too."""
    chosen: dict[str, str] = {}
    for name, variable in _TINY.items():
        if not getattr(settings, name) and variable not in os.environ:
            os.environ[variable] = TINY_MODEL
            chosen[name] = TINY_MODEL
    return settings.model_copy(update=chosen) if chosen else settings


def finishing_models_checked(settings: Settings) -> None:
    """The upscale and caption models the demo's worker will finish with, checked before
    anything is rendered: a bad one would otherwise only be logged by the worker while the
    demo waits for finishing that never comes."""
    from worker.finishing.configured import check_finishing_models

    check_finishing_models(settings)


def export_channels_checked(settings: Settings) -> list[str]:
    """The channels the demo exports for (every one of the presets), with the presets file
    and any C2PA signing credentials checked: a bad one stops the demo before it starts."""
    from review.channels.marking import signer_from_settings
    from review.channels.presets import load_presets

    channels = list(load_presets(settings.channel_presets_path))
    signer = signer_from_settings(settings)
    if signer is not None:
        signer.close()
    return channels


def export_folder(settings: Settings, run_name: str) -> Path:
    return (settings.data_dir / "exports" / run_name).resolve()


def finish_and_export(
    settings: Settings,
    run_name: str,
    channels: list[str],
    check_worker: Callable[[], None],
    timeout: float,
    worker_log: Path,
) -> None:
    """Keep, finish and export the run's keepers for ``channels``. ``check_worker`` ends the
    command when the worker has exited; finishing not done within ``timeout`` seconds ends
    it too, pointing at the worker's log."""
    from db.runs import find_run
    from pixelmill.tasks import finishing_enabled

    sessions = common.sessions(settings)
    with sessions() as session:
        found = find_run(session, run_name)
        assert found is not None
        run_id = found.id
        submitted = _keep_top_ranked(session, settings, run_id)
    _print_submitted(settings, submitted)
    if not submitted.kept:
        return
    if finishing_enabled(settings):
        _publish(settings, submitted.review_items)
        _wait_for_finishing(settings, run_id, check_worker, timeout, worker_log)
        with sessions() as session:
            _print_finished(session, settings, run_id)
    _export(settings, run_name, channels)


def _demo_reviewer(session: Session) -> int:
    """The stand-in's account, made on first use with a random password nobody is told: it
    records decisions; nobody logs in as it."""
    from sqlalchemy import select

    from db.models import Reviewer
    from review.accounts import add_reviewer

    found = session.scalar(select(Reviewer.id).where(Reviewer.name == DEMO_REVIEWER))
    if found is not None:
        return found
    return add_reviewer(session, DEMO_REVIEWER, secrets.token_urlsafe(24)).id


def _keep_top_ranked(session: Session, settings: Settings, run_id: int) -> Submitted:
    """Each of the run's items claimed, its top-ranked card kept ("keep the top 1": its
    near-duplicates rejected) and the item submitted (the rest rejected), through the
    functions the review app's claim, keep-top and submit call."""
    from db.models import Decision, ReviewItem
    from review.bulk import item_grid, keep_top
    from review.queue import claim_next, submit, sync_queue

    reviewer_id = _demo_reviewer(session)
    lease = timedelta(seconds=settings.review_claim_lease_seconds)
    similarity = settings.duplicate_similarity
    sync_queue(session, run_id)
    submitted = Submitted()
    while True:
        claimed = claim_next(session, run_id=run_id, reviewer_id=reviewer_id, lease=lease)
        if claimed is None:
            return submitted
        item = session.get(ReviewItem, claimed)
        assert item is not None
        submitted.ranked_by.add(item_grid(session, item, similarity).ranked_by)
        changed = keep_top(
            session, claimed, 1, reviewer_id=reviewer_id, lease=lease,
            duplicate_similarity=similarity,
        )  # fmt: skip
        submitted.kept += sum(change.decision == Decision.KEEP for change in changed)
        submit(session, claimed, reviewer_id=reviewer_id, lease=lease)
        submitted.review_items.append(claimed)


def _print_submitted(settings: Settings, submitted: Submitted) -> None:
    ranking = ", ".join(sorted(submitted.ranked_by)) or "nothing to rank"
    console.print(
        f"review: reviewer {DEMO_REVIEWER!r} kept the top-ranked image of each of "
        f"{len(submitted.review_items)} items (ranked by {ranking}) and submitted them: "
        f"{submitted.kept} keepers"
    )
    console.print(
        "  (a stand-in for a person's choice in the review app, `make review`; recorded in "
        f"this demo's database only, {common.safe_url(settings.resolved_database_url)})"
    )


def _publish(settings: Settings, review_items: list[int]) -> None:
    """The submitted items on the worker's finishing queue, as the review app's submit
    publishes them, but at once: nobody will reopen the demo's submits."""
    from pixelmill.tasks import publish_finishing

    console.print(
        f"  (the review app finishes a submit once its {settings.review_reopen_seconds} s "
        "reopen window has passed; the demo queues them at once)"
    )
    at_once = settings.model_copy(update={"review_reopen_seconds": 0})
    for review_item_id in review_items:
        if not publish_finishing(at_once, review_item_id):
            fail(f"review item {review_item_id}: the broker did not take its finishing task")


def _keepers(run_id: int) -> Select[Any]:
    """The kept images of the run's submitted items."""
    from sqlalchemy import select

    from db.finishing import submitted_keeper
    from db.models import Image, ImageReview, ReviewItem

    return (
        select(ImageReview.image_id)
        .join(ReviewItem, ReviewItem.id == ImageReview.review_item_id)
        .join(Image, Image.id == ImageReview.image_id)
        .where(ImageReview.run_id == run_id, *submitted_keeper())
    )


def _finishing_counts(session: Session, settings: Settings, run_id: int) -> tuple[int, int]:
    """(finished, keepers): finished is upscaled and captioned (what of it is configured)."""
    from sqlalchemy import exists, func, select

    from db.finishing import ImageCaption, UpscaledImage
    from db.models import ImageReview

    keepers = _keepers(run_id)
    finished = keepers
    if settings.upscale_model:
        finished = finished.where(exists().where(UpscaledImage.image_id == ImageReview.image_id))
    if settings.caption_model:
        finished = finished.where(exists().where(ImageCaption.image_id == ImageReview.image_id))

    def count(query: Select[Any]) -> int:
        return session.scalar(select(func.count()).select_from(query.subquery())) or 0

    return count(finished), count(keepers)


def _wait_for_finishing(
    settings: Settings,
    run_id: int,
    check_worker: Callable[[], None],
    timeout: float,
    worker_log: Path,
) -> None:
    sessions = common.sessions(settings)

    def poll() -> tuple[int, int, bool]:
        with sessions() as session:
            finished, keepers = _finishing_counts(session, settings, run_id)
        return finished, keepers, finished >= keepers

    wait_with_bar(
        "finishing",
        poll,
        between=check_worker,
        timeout=timeout,
        timed_out=f"finishing not done after {timeout:.0f} s; the worker's log: {worker_log}",
    )


def wait_with_bar(
    label: str,
    poll: Callable[[], tuple[int, int | None, bool]],
    *,
    between: Callable[[], None],
    timeout: float,
    timed_out: str,
) -> None:
    """A progress bar fed by ``poll`` (completed, total, done) every half second until it
    says done; ``between`` runs after each poll that is not (it may end the command), and
    ``timeout`` seconds without being done end the command with ``timed_out``."""
    deadline = time.monotonic() + timeout
    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task(label, total=None)
        while True:
            completed, total, done = poll()
            progress.update(task, total=total, completed=completed)
            if done:
                return
            between()
            if time.monotonic() > deadline:
                fail(timed_out)
            time.sleep(0.5)


def _print_finished(session: Session, settings: Settings, run_id: int) -> None:
    """How the keepers were upscaled (from and to what size, by what model) and one of their
    alt texts."""
    from sqlalchemy import select

    from db.finishing import ImageCaption, UpscaledImage
    from db.models import CatalogueItem, Image, Job

    kept = Image.id.in_(_keepers(run_id))
    upscaled = session.execute(
        select(Job.width, Job.height, UpscaledImage.width, UpscaledImage.height,
               UpscaledImage.scale, UpscaledImage.model_name)
        .join(Image, Image.job_id == Job.id)
        .join(UpscaledImage, UpscaledImage.image_id == Image.id)
        .where(kept)
    ).all()  # fmt: skip
    if upscaled:
        sizes = sorted({f"{w}x{h} -> {uw}x{uh}" for w, h, uw, uh, _, _ in upscaled})
        scales = "/".join(sorted({f"x{scale}" for *_, scale, _ in upscaled}))
        models = ", ".join(sorted({Path(name).name for *_, name in upscaled}))
        console.print(f"upscaled: {len(upscaled)} keepers {scales}, {', '.join(sizes)} ({models})")
    captions = session.execute(
        select(CatalogueItem.external_key, ImageCaption.alt_text, ImageCaption.captioner_name)
        .join(Job, Job.item_id == CatalogueItem.id)
        .join(Image, Image.job_id == Job.id)
        .join(ImageCaption, ImageCaption.image_id == Image.id)
        .where(kept)
        .order_by(Image.id)
    ).all()
    if captions:
        key, text, name = captions[0]
        console.print(
            f"captioned: {len(captions)} keepers ({Path(name).name}); alt text of {key}: {text!r}"
        )
    if TINY_MODEL in (settings.upscale_model, settings.caption_model):
        console.print(
            "  (the tiny models have random weights: noise and nonsense words that show the "
            "plumbing; set PIXELMILL_UPSCALE_MODEL and PIXELMILL_CAPTION_MODEL for real ones)"
        )


def _export(settings: Settings, run_name: str, channels: list[str]) -> None:
    """The keepers as each channel's files, as `pixelmill export RUN --channel ... --to DIR`
    makes them (and says what it wrote)."""
    from cli.channels import export_to_channels

    with console.status(f"exporting for {', '.join(channels)}"):
        export_to_channels(
            run_name, channels, None, str(export_folder(settings, run_name)), rows_options=False
        )
