"""Scores at render time, keep predictions and early stop, through the whole render path: the
tiny model and the tiny random scorer on the CPU, real Postgres, local storage and moto S3."""

from __future__ import annotations

import io
import logging
import math
import pathlib
from collections.abc import Callable
from typing import Any

import PIL.Image
import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.job_options import ControlNetSpec, JobOptions, MaskSpec
from db.models import Decision, Image, ImageReview, InputImage, Job, JobStatus, ReviewItem
from db.ranking import ImageScore, KeeperModel, KeeperPrediction
from monitoring.exporter import read_snapshot
from monitoring.status import run_status
from pixelmill.keeper import category, embedding_from_bytes, parameters
from pixelmill.storage import Storage, storage_from_settings
from tests import factories
from tests.worker.support import make_settings, reload_job
from tests.worker.test_render_kinds import product_png, stage
from worker import metrics
from worker.loading import PipelineCache
from worker.render import WorkerRuntime, render_job
from worker.scoring.scorer import Scorer, load_scorer, pixels_of
from worker.scoring.tiny import HEAD_FILE, PROJECTION_DIM, build_tiny_scorer

PROMPT = "a brass desk lamp, studio lighting"
SOURCE = "lamps.csv"


@pytest.fixture(scope="module")
def pipelines() -> PipelineCache:
    return PipelineCache(device=torch.device("cpu"))


@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> Scorer:
    folder = build_tiny_scorer(tmp_path_factory.mktemp("scorer") / "tiny-scorer")
    return load_scorer(str(folder), head_path=folder / HEAD_FILE)


RuntimeFactory = Callable[..., WorkerRuntime]


@pytest.fixture
def make_runtime(
    tiny_model_dir: pathlib.Path,
    tmp_path: pathlib.Path,
    pg_sessions: sessionmaker[Session],
    pipelines: PipelineCache,
    scorer: Scorer,
) -> RuntimeFactory:
    def make(*, scoring: bool = True, **settings: Any) -> WorkerRuntime:
        values = make_settings(tiny_model_dir, tmp_path, **settings)
        return WorkerRuntime(
            settings=values,
            sessions=pg_sessions,
            storage=storage_from_settings(values),
            pipelines=pipelines,
            name="scoring-worker",
            scorer=scorer if scoring else None,
        )

    return make


def add_job(
    session: Session,
    model: pathlib.Path,
    *,
    run: Any = None,
    item: Any = None,
    seeds: tuple[int, ...] = (1, 2, 3),
    template: str = "studio",
    **overrides: Any,
) -> Job:
    return factories.make_job(
        session,
        run,
        item=item or factories.make_item(session, source=SOURCE),
        seeds=seeds,
        template=template,
        prompt=PROMPT,
        model=str(model),
        steps=2,
        guidance=7.0,
        width=64,
        height=64,
        **overrides,
    )


def scores_of(session: Session, job: Job) -> dict[int, ImageScore]:
    session.expire_all()
    rows = session.execute(
        select(Image.seed, ImageScore).join(ImageScore).where(Image.job_id == job.id)
    ).all()
    return {int(seed): score for seed, score in rows}


def rescored(storage: Storage, scorer: Scorer, image: Image, photo: bytes | None = None) -> Any:
    """The scores of the stored PNG, as `pixelmill score` computes them."""
    with PIL.Image.open(io.BytesIO(storage.get(image.storage_key))) as png:
        pixels = pixels_of(png).unsqueeze(0)
    reference = None
    if photo is not None:
        with PIL.Image.open(io.BytesIO(photo)) as decoded:
            reference = pixels_of(decoded)
    return scorer.score(pixels, PROMPT, reference)[0]


def check_scores(
    session: Session, storage: Storage, scorer: Scorer, job: Job, photo: bytes | None = None
) -> list[Image]:
    """Every image of the job has its scores, and they are the scores of the stored PNG."""
    images = list(session.scalars(select(Image).where(Image.job_id == job.id)))
    scores = scores_of(session, job)
    assert images and sorted(scores) == sorted(image.seed for image in images)
    for image in images:
        score = scores[image.seed]
        assert score.scorer == scorer.identity
        embedding = embedding_from_bytes(score.embedding)
        assert embedding.shape == (PROJECTION_DIM,)
        assert float((embedding**2).sum()) == pytest.approx(1.0, abs=1e-2)
        assert score.aesthetic_score is not None
        # The render's own tensor was scored; the stored PNG is it rounded to 8 bits.
        again = rescored(storage, scorer, image, photo)
        assert score.clip_score == pytest.approx(again.clip_score, abs=0.02)
        assert float(embedding @ embedding_from_bytes(again.embedding)) > 0.999
        # The random head magnifies the rounding (its scores spread over hundreds between
        # images), so its scores agree to a few percent where the embeddings agree to 0.1%.
        assert score.aesthetic_score == pytest.approx(again.aesthetic_score, rel=0.1)
        if photo is None:
            assert score.image_similarity is None
        else:
            assert score.image_similarity == pytest.approx(again.image_similarity, abs=0.02)
    return images


# --- scores ---------------------------------------------------------------------------------


def test_every_image_is_scored_with_its_row(
    make_runtime: RuntimeFactory,
    db_session: Session,
    tiny_model_dir: pathlib.Path,
    scorer: Scorer,
) -> None:
    runtime = make_runtime(render_batch_size=2)
    job = add_job(db_session, tiny_model_dir, seeds=(5, 6, 7))

    assert render_job(runtime, job.id) == "done"

    images = check_scores(db_session, runtime.storage, scorer, job)
    assert len(images) == 3
    # No keeper model for the source: nothing predicted, every seed rendered.
    assert db_session.scalars(select(KeeperPrediction)).all() == []
    assert reload_job(db_session, job.id).skipped_seeds is None


def test_scores_with_images_in_s3(
    make_runtime: RuntimeFactory,
    db_session: Session,
    tiny_model_dir: pathlib.Path,
    s3_settings: dict[str, str],
    scorer: Scorer,
) -> None:
    runtime = make_runtime(**s3_settings)
    job = add_job(db_session, tiny_model_dir, seeds=(8, 9))

    assert render_job(runtime, job.id) == "done"

    check_scores(db_session, runtime.storage, scorer, job)


def test_without_a_scorer_nothing_is_scored(
    make_runtime: RuntimeFactory, db_session: Session, tiny_model_dir: pathlib.Path
) -> None:
    runtime = make_runtime(scoring=False, early_stop_keepers=1)
    job = add_job(db_session, tiny_model_dir, seeds=(1, 2))

    assert render_job(runtime, job.id) == "done"

    assert scores_of(db_session, job) == {}
    assert len(db_session.scalars(select(Image).where(Image.job_id == job.id)).all()) == 2


@pytest.mark.parametrize("kind", ["img2img", "inpaint", "controlnet"])
def test_photo_jobs_score_their_likeness_to_the_photo(
    make_runtime: RuntimeFactory,
    db_session: Session,
    tiny_model_dir: pathlib.Path,
    tiny_controlnet_dir: pathlib.Path,
    scorer: Scorer,
    kind: str,
) -> None:
    runtime = make_runtime()
    photo = product_png((64, 64))
    options = {
        "img2img": JobOptions(strength=0.6),
        "inpaint": JobOptions(mask=MaskSpec(source="alpha")),
        "controlnet": JobOptions(controlnet=ControlNetSpec(model=str(tiny_controlnet_dir))),
    }[kind]
    job = add_job(
        db_session,
        tiny_model_dir,
        seeds=(1, 2),
        kind=kind,
        input_image=stage(db_session, runtime, photo),
        options=options.to_json(),
    )

    assert render_job(runtime, job.id) == "done"

    check_scores(db_session, runtime.storage, scorer, job, photo)
    assert db_session.get(InputImage, job.input_image) is not None


def test_flagged_images_are_not_scored(
    make_runtime: RuntimeFactory,
    db_session: Session,
    tiny_model_dir: pathlib.Path,
    tmp_path: pathlib.Path,
) -> None:
    from tests.worker.flagging_model import make_flagging_model

    flagging = make_flagging_model(tiny_model_dir, tmp_path / "flagging")
    runtime = make_runtime()
    job = add_job(db_session, flagging, seeds=(1, 2))

    assert render_job(runtime, job.id) == "done"

    images = db_session.scalars(select(Image).where(Image.job_id == job.id)).all()
    assert {image.safety for image in images} == {"flagged"}
    assert scores_of(db_session, job) == {}


# --- keeper predictions and early stop --------------------------------------------------------


def add_keeper_model(
    session: Session, scorer: str, *, logit: float, version: int = 1, source: str = SOURCE
) -> KeeperModel:
    """A keeper model predicting sigmoid(logit) for every image (all-zero weights)."""
    size = PROJECTION_DIM + 5 + 1
    model = KeeperModel(
        source=source,
        version=version,
        scorer=scorer,
        trained_on=100,
        held_out=20,
        auc=0.8,
        decisions_seen=120,
        parameters=parameters(
            categories=[category("studio", "")],
            mean=[0.0] * size,
            scale=[1.0] * size,
            coef=[0.0] * size,
            intercept=logit,
            calibration_slope=1.0,
            calibration_intercept=0.0,
        ),
    )
    session.add(model)
    session.commit()
    return model


def predictions_of(session: Session, job: Job) -> dict[int, KeeperPrediction]:
    rows = session.execute(
        select(Image.seed, KeeperPrediction).join(KeeperPrediction).where(Image.job_id == job.id)
    ).all()
    return {int(seed): prediction for seed, prediction in rows}


def test_each_image_gets_the_latest_matching_models_prediction(
    make_runtime: RuntimeFactory,
    db_session: Session,
    tiny_model_dir: pathlib.Path,
    scorer: Scorer,
) -> None:
    add_keeper_model(db_session, scorer.identity, logit=-1.0, version=1)
    latest = add_keeper_model(db_session, scorer.identity, logit=1.0, version=2)
    # A newer model of another scorer cannot read these embeddings: not used.
    add_keeper_model(db_session, "f" * 64, logit=3.0, version=3)
    add_keeper_model(db_session, scorer.identity, logit=4.0, version=9, source="other.csv")
    runtime = make_runtime(render_batch_size=2)
    job = add_job(db_session, tiny_model_dir, seeds=(1, 2, 3))

    assert render_job(runtime, job.id) == "done"

    predictions = predictions_of(db_session, job)
    assert sorted(predictions) == [1, 2, 3]
    for prediction in predictions.values():
        assert prediction.model_id == latest.id
        assert prediction.probability == pytest.approx(1 / (1 + math.exp(-1.0)), abs=1e-6)
    # Predictions alone stop nothing: early stop is off.
    assert reload_job(db_session, job.id).skipped_seeds is None


def test_early_stop_records_the_seeds_not_rendered_and_reports_the_time_saved(
    make_runtime: RuntimeFactory,
    db_session: Session,
    tiny_model_dir: pathlib.Path,
    scorer: Scorer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    add_keeper_model(db_session, scorer.identity, logit=5.0)  # every image a likely keeper
    runtime = make_runtime(render_batch_size=2, early_stop_keepers=2, early_stop_probability=0.9)
    run = factories.make_run(db_session, source=SOURCE)
    item = factories.make_item(db_session, source=SOURCE)
    first = add_job(db_session, tiny_model_dir, run=run, item=item, seeds=(1, 2, 3, 4, 5, 6))
    # Another sweep of the item (another template), rendered after the first.
    second = add_job(
        db_session, tiny_model_dir, run=run, item=item, seeds=(7, 8), template="lifestyle"
    )
    skipped_before = metrics.EARLY_STOP_SEEDS._value.get()
    saved_before = metrics.GPU_SECONDS_SAVED._value.get()

    with caplog.at_level(logging.INFO, logger="worker.scoring.keepers"):
        assert render_job(runtime, first.id) == "done"

    row = reload_job(db_session, first.id)
    assert row.status == JobStatus.DONE
    assert sorted(predictions_of(db_session, first)) == [1, 2]  # the first batch had two
    assert row.skipped_seeds == [3, 4, 5, 6]
    mean = sum(image.render_seconds for image in row.images) / 2
    assert metrics.EARLY_STOP_SEEDS._value.get() - skipped_before == 4
    assert metrics.GPU_SECONDS_SAVED._value.get() - saved_before == pytest.approx(4 * mean)
    assert f"job {first.id} stopped early" in caplog.text
    assert "4 of 6 seeds not rendered" in caplog.text

    # The other sweep has nothing left to find: none of its seeds is rendered.
    assert render_job(runtime, second.id) == "done"
    row = reload_job(db_session, second.id)
    assert row.images == [] and row.skipped_seeds == [7, 8]
    # Its time saved is estimated from the run's images of the same model, steps and size.
    assert metrics.GPU_SECONDS_SAVED._value.get() - saved_before == pytest.approx(6 * mean)

    # Skipped seeds are not missing images: the run's planned images are those it has.
    report = run_status(db_session, run)
    assert report.images == report.images_planned == 2
    (figures,) = [f for f in read_snapshot(db_session).runs if f.name == run.name]
    assert (figures.images, figures.images_planned, figures.remaining_images) == (2, 2, 0)


def test_images_a_person_rejected_do_not_stop_a_sweep(
    make_runtime: RuntimeFactory,
    db_session: Session,
    tiny_model_dir: pathlib.Path,
    scorer: Scorer,
) -> None:
    add_keeper_model(db_session, scorer.identity, logit=5.0)
    runtime = make_runtime(render_batch_size=1, early_stop_keepers=1)
    run = factories.make_run(db_session, source=SOURCE)
    item = factories.make_item(db_session, source=SOURCE)
    first = add_job(db_session, tiny_model_dir, run=run, item=item, seeds=(1, 2))
    # Queued with it (a run with a job left is not finished), rendered after the rejection.
    reroll = add_job(db_session, tiny_model_dir, run=run, item=item, seeds=(3, 4))
    assert render_job(runtime, first.id) == "done"
    assert reload_job(db_session, first.id).skipped_seeds == [2]
    # The reviewer rejects the one likely keeper ("none of these" queues more seeds).
    reviewer = factories.make_reviewer(db_session)
    review_item = ReviewItem(run_id=run.id, item_id=item.id)
    db_session.add(review_item)
    db_session.flush()
    (image,) = reload_job(db_session, first.id).images
    db_session.add(
        ImageReview(
            image_id=image.id,
            run_id=run.id,
            review_item_id=review_item.id,
            decision=Decision.REJECT,
            reviewer_id=reviewer.id,
        )
    )
    db_session.commit()

    assert render_job(runtime, reroll.id) == "done"

    row = reload_job(db_session, reroll.id)
    assert [image.seed for image in row.images] == [3]
    assert row.skipped_seeds == [4]
