"""The claim's one round trip (its job's details read back with it) and the finish that records
a job's last images in the transaction marking it done, on real Postgres."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Image, JobStatus
from tests.factories import image_row, make_item, make_job, make_run
from tests.worker.support import expire_lease, reload
from worker.claim import JobDetails, claim_job, finish_job, read_details

LEASE = timedelta(minutes=30)


def _image_count(session: Session, job_id: int) -> int:
    session.expire_all()
    return int(session.scalar(select(func.count()).where(Image.job_id == job_id)) or 0)


def test_the_claim_reads_back_what_the_render_needs(db_session: Session) -> None:
    suffix = uuid.uuid4().hex[:8]
    run = make_run(db_session, name=f"spring-{suffix}")
    item = make_item(db_session, external_key=f"SKU-{suffix}")
    job = make_job(
        db_session,
        run,
        item=item,
        seeds=[1, 2, 3],
        template="studio",
        variant="warm",
        options={"strength": 0.5},
    )
    db_session.add(image_row(job.id, 2))
    db_session.commit()

    claimed = claim_job(db_session, job.id, worker="w", lease=LEASE, max_attempts=3)

    assert claimed is not None
    assert claimed.details == JobDetails(
        run_name=f"spring-{suffix}",
        item_key=f"SKU-{suffix}",
        template="studio",
        variant="warm",
        kind="txt2img",
        options={"strength": 0.5},
        input_image=None,
        mask_image=None,
        images=1,  # seed 2 has its image already: the render reads which seeds are left
    )
    # The same as read separately, for a job claimed some other way.
    assert read_details(db_session, job.id) == claimed.details


def test_a_fresh_job_claims_with_no_images(db_session: Session) -> None:
    job = make_job(db_session)
    claimed = claim_job(db_session, job.id, worker="w", lease=LEASE)
    assert claimed is not None and claimed.details is not None
    assert claimed.details.images == 0


def test_finish_records_the_last_rows_with_done(db_session: Session) -> None:
    job = make_job(db_session, seeds=[1, 2])
    claimed = claim_job(db_session, job.id, worker="w", lease=LEASE)
    assert claimed is not None

    def record() -> None:
        db_session.add_all([image_row(job.id, 1), image_row(job.id, 2)])
        db_session.flush()

    assert finish_job(db_session, claimed, record=record) is True

    assert reload(db_session, job).status == JobStatus.DONE
    assert _image_count(db_session, job.id) == 2


def test_finish_of_a_job_taken_over_records_nothing(db_session: Session) -> None:
    """The rows written with ``done`` are fenced like ``done``: a worker that lost the job
    leaves neither, and the new owner's claim stands."""
    job = make_job(db_session, seeds=[1, 2])
    old = claim_job(db_session, job.id, worker="old", lease=LEASE)
    assert old is not None
    expire_lease(db_session, job.id)
    new = claim_job(db_session, job.id, worker="new", lease=LEASE)
    assert new is not None

    def record() -> None:
        db_session.add(image_row(job.id, 1))
        db_session.flush()

    assert finish_job(db_session, old, record=record) is False

    row = reload(db_session, job)
    assert (row.status, row.worker, row.attempts) == (JobStatus.RUNNING, "new", 2)
    assert _image_count(db_session, job.id) == 0
