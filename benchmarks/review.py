"""Review benchmark: "next item" and the grid page at 1,000 and at 1,000,000 images.

For each size, a fresh Postgres database is migrated and filled with COPY as a night would
leave it: one finished run, 10 images per catalogue item (2 templates x 5 seeds), so
1,000,000 images over 100,000 items. The review queue is then built by the app's own intake
(review.queue.sync_queue, timed), the first half of the items is marked reviewed (with
decisions, so the decision tables are as large as they get mid-night) and eight reviewers
hold claims. Then, measured in the same run at both sizes:

- intake: the first sync of the run (all items at once), and a re-scan of an active run with
  nothing new (what the app's background sync costs while a night renders);
- next item: review.queue.claim_next, the FOR UPDATE SKIP LOCKED claim, as a reviewer asks
  for their next item (each claimed item is then submitted, untimed, as a reviewer would);
- grid page: GET /items/{id} (the server-rendered grid of the item's 10 images, with
  presigned-or-served URLs), and GET /api/items/{id}, through the ASGI app in process.

Prints the median and 95th percentile in milliseconds at each size and the ratio of the
large to the small (target: the same order of magnitude, under 100 ms).

    .venv/bin/python benchmarks/review.py [--sizes 1000,1000000] [--postgres URL]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg

# The repository root first: this file is itself named review.py, and `import review` must
# find the package, not this script.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from db.migrate import upgrade

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

IMAGES_PER_ITEM = 10
TEMPLATES = ("studio", "lifestyle")
SEEDS_PER_JOB = IMAGES_PER_ITEM // len(TEMPLATES)
REVIEWERS = 8
SAMPLES = 200
PASSWORD = "benchmark password"


def fresh_database(admin_url: str, name: str) -> str:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def fill(url: str, images: int) -> None:
    """One finished run; images/10 items, each with 2 done jobs of 5 seeds and their images."""
    items = images // IMAGES_PER_ITEM
    with psycopg.connect(url.replace("+psycopg", "")) as conn:
        conn.execute(
            "INSERT INTO runs (id, name, source, status, priority, created_at, finished_at) "
            "VALUES (1, 'night', 'bench.csv', 'finished', 0, now(), now())"
        )
        with conn.cursor() as cur:
            with cur.copy(
                "COPY catalogue_items (id, source, external_key, fields, content_hash, "
                "created_at) FROM STDIN"
            ) as copy:
                for i in range(1, items + 1):
                    key = f"SKU-{i:07d}"
                    fields = json.dumps({"sku": key, "title": "canvas sneaker", "colour": "red"})
                    copy.write_row((i, "bench.csv", key, fields, f"h{i}", "2026-11-25 00:00Z"))
            with cur.copy(
                "COPY jobs (id, run_id, item_id, template, variant, prompt, negative_prompt, "
                "model, scheduler, steps, guidance, width, height, seeds, status, attempts, "
                "dedupe_key, created_at, finished_at) FROM STDIN"
            ) as copy:
                job_id = 0
                for i in range(1, items + 1):
                    for template in TEMPLATES:
                        job_id += 1
                        seeds = [job_id * 10 + s for s in range(SEEDS_PER_JOB)]
                        copy.write_row(
                            (job_id, 1, i, template, "", f"photo of red canvas sneaker {i}",
                             "lowres", "tiny", None, 25, 7.0, 512, 512, json.dumps(seeds),
                             "done", 1, f"d{job_id}", "2026-11-25 00:00Z",
                             "2026-11-25 01:00Z")
                        )  # fmt: skip
            with cur.copy(
                "COPY images (id, job_id, seed, storage_key, sha256, width, height, bytes, "
                "safety, thumbnail_key, render_seconds, created_at) FROM STDIN"
            ) as copy:
                image_id = 0
                for job in range(1, job_id + 1):
                    for s in range(SEEDS_PER_JOB):
                        image_id += 1
                        key = f"runs/1/jobs/{job}/{job * 10 + s}-{image_id:016x}.png"
                        copy.write_row(
                            (image_id, job, job * 10 + s, key, "0" * 64, 512, 512, 400_000,
                             "safe", key.replace(".png", ".thumb.jpg"), 1.5,
                             "2026-11-25 01:00Z")
                        )  # fmt: skip
        for table in ("runs", "catalogue_items", "jobs", "images"):
            conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"(SELECT max(id) FROM {table}))"
            )
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE")  # as autovacuum would have, long before review starts


def half_reviewed(url: str) -> None:
    """The first half of the queue submitted: 1 image in 7 kept, the rest rejected."""
    with psycopg.connect(url.replace("+psycopg", "")) as conn:
        conn.execute(
            "UPDATE review_items SET status = 'done', submitted_by = 1, submitted_at = now() "
            "WHERE id <= (SELECT max(id) / 2 FROM review_items)"
        )
        conn.execute(
            "INSERT INTO image_reviews (image_id, run_id, review_item_id, decision, "
            "reviewer_id, decided_at) "
            "SELECT i.id, 1, r.id, CASE WHEN i.id % 7 = 0 THEN 'keep' ELSE 'reject' END, 1, "
            "now() FROM review_items r JOIN jobs j ON j.run_id = r.run_id "
            "AND j.item_id = r.item_id JOIN images i ON i.job_id = j.id "
            "WHERE r.status = 'done'"
        )
        conn.execute(
            "INSERT INTO review_events (run_id, review_item_id, image_id, reviewer_id, action, "
            "undone, created_at) SELECT run_id, review_item_id, image_id, 1, decision, false, "
            "decided_at FROM image_reviews"
        )
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE")


WARMUP = 5


def timed(fn: Callable[[], object], samples: int) -> list[float]:
    for _ in range(WARMUP):  # connections, template compilation, caches: not what we measure
        fn()
    out = []
    for _ in range(samples):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def summary(ms: list[float]) -> tuple[float, float]:
    ordered = sorted(ms)
    return statistics.median(ordered), ordered[int(len(ordered) * 0.95) - 1]


def measure(url: str, images: int) -> dict[str, tuple[float, float]]:
    """Median and p95 (ms) of every measurement on the filled database at ``url``."""
    from db.session import make_engine, make_sessionmaker

    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    results, reviewers = measure_intake(sessions, url, images)
    claims, open_ids = measure_claims(sessions, reviewers, images)
    results.update(claims)
    results.update(measure_pages(sessions, url, open_ids))
    engine.dispose()
    return results


def measure_intake(
    sessions: sessionmaker[Session], url: str, images: int
) -> tuple[dict[str, tuple[float, float]], list[int]]:
    """The first sync of the run and the re-scans of an active run; adds the reviewers and
    leaves the first half of the queue reviewed. Returns the timings and the reviewers' ids."""
    from sqlalchemy import update

    from db.models import Run
    from review.accounts import add_reviewer
    from review.queue import sync_queue

    results: dict[str, tuple[float, float]] = {}
    with sessions() as session:
        reviewers = [
            add_reviewer(session, f"reviewer{n}", PASSWORD, admin=n == 0).id
            for n in range(REVIEWERS)
        ]
        start = time.perf_counter()
        report = sync_queue(session)
        sync_ms = (time.perf_counter() - start) * 1000
        assert report.added == images // IMAGES_PER_ITEM, report
        results["intake (sync_queue, once)"] = (sync_ms, sync_ms)
    half_reviewed(url)
    with sessions() as session:
        # While a run renders, the app re-scans it every PIXELMILL_REVIEW_SYNC_SECONDS.
        session.execute(update(Run).where(Run.id == 1).values(status="active"))
        session.commit()
        rescans = timed(lambda: sync_queue(session), 5)
        results["intake re-scan (active run)"] = summary(rescans)
    return results, reviewers


def measure_claims(
    sessions: sessionmaker[Session], reviewers: list[int], images: int
) -> tuple[dict[str, tuple[float, float]], list[int]]:
    """The "next item" claim while the other reviewers hold claims; returns the timings and the
    ids of open items for the page measurements."""
    from sqlalchemy import select

    from db.models import ReviewItem
    from review.queue import claim_next, submit

    lease = timedelta(minutes=10)
    with sessions() as session:
        # Other reviewers hold claims at the front of the queue: the claim scan skips them.
        for reviewer in reviewers[1:]:
            claim_next(session, run_id=1, reviewer_id=reviewer, lease=lease)
        samples = min(SAMPLES, images // IMAGES_PER_ITEM // 2 - REVIEWERS - WARMUP)
        ms = []
        for attempt in range(WARMUP + samples):
            start = time.perf_counter()
            item = claim_next(session, run_id=1, reviewer_id=reviewers[0], lease=lease)
            if attempt >= WARMUP:
                ms.append((time.perf_counter() - start) * 1000)
            assert item is not None
            submit(session, item, reviewer_id=reviewers[0], lease=lease)
        open_ids = list(
            session.scalars(select(ReviewItem.id).where(ReviewItem.status == "open").limit(samples))
        )
    return {"next item (claim)": summary(ms)}, open_ids


def measure_pages(
    sessions: sessionmaker[Session], url: str, open_ids: list[int]
) -> dict[str, tuple[float, float]]:
    """The grid page and the item JSON of ``open_ids``, through the ASGI app in process, as
    the first reviewer (logged in)."""
    from fastapi.testclient import TestClient

    from pixelmill.settings import get_settings
    from pixelmill.storage import LocalStorage
    from review.app import create_app

    results: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as data_dir:
        settings = get_settings(
            data_dir=Path(data_dir), database_url=url, review_secret_key="b" * 40
        )
        app = create_app(
            settings,
            sessions=sessions,
            storage=LocalStorage(Path(data_dir) / "images"),
            background_sync=False,
        )
        with TestClient(app) as client:
            page = client.get("/login").text
            token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
            client.post(
                "/login", data={"name": "reviewer0", "password": PASSWORD, "csrf_token": token}
            )
            targets = iter(open_ids * 3)

            def grid() -> None:
                response = client.get(f"/items/{next(targets)}")
                assert response.status_code == 200 and response.text.count("<figure") == 10

            results["grid page (GET /items/N)"] = summary(timed(grid, len(open_ids)))
            targets = iter(open_ids * 3)

            def api() -> None:
                response = client.get(f"/api/items/{next(targets)}")
                assert response.status_code == 200 and len(response.json()["images"]) == 10

            results["item JSON (GET /api/items/N)"] = summary(timed(api, len(open_ids)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,1000000", help="image counts, comma-separated")
    parser.add_argument(
        "--postgres",
        default=os.environ.get(
            "PIXELMILL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument("--keep", action="store_true", help="keep the benchmark databases")
    args = parser.parse_args()
    admin = args.postgres.replace("+psycopg", "")
    sizes = [int(size) for size in args.sizes.split(",")]
    table: dict[int, dict[str, tuple[float, float]]] = {}
    for images in sizes:
        name = f"pixelmill_bench_review_{images}"
        url = fresh_database(admin, name).replace("postgresql://", "postgresql+psycopg://")
        try:
            upgrade(url)
            start = time.perf_counter()
            fill(url, images)
            print(
                f"{images:>9,} images / {images // IMAGES_PER_ITEM:,} items filled in "
                f"{time.perf_counter() - start:.1f} s",
                flush=True,
            )
            table[images] = measure(url, images)
        finally:
            if not args.keep:
                drop_database(admin, name)

    print()
    header = "".join(f"{f'{n:,} images':>24}" for n in sizes)
    print(f"{'ms (median / p95)':<32}{header}{'ratio (median)':>16}")
    for metric in table[sizes[0]]:
        cells = "".join(
            f"{f'{table[n][metric][0]:.2f} / {table[n][metric][1]:.2f}':>24}" for n in sizes
        )
        ratio = table[sizes[-1]][metric][0] / max(table[sizes[0]][metric][0], 1e-9)
        print(f"{metric:<32}{cells}{ratio:>15.1f}x")


if __name__ == "__main__":
    main()
