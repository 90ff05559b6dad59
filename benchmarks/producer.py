"""Producer benchmark: 250,000 catalogue rows x 2 templates x 2 variants = 1,000,000 jobs.

Runs the real `pixelmill produce` (a child process, so its peak RSS and CPU time are its own)
into a fresh Postgres database, then, in the same run, times a raw COPY of the very same job
rows (read back from ``jobs``) into scratch tables. The ratio is producer jobs/s divided by
raw-COPY jobs/s (target: >= 0.5, peak RSS < 500 MB), printed against each baseline:

- ``bare table``: a plain table of the jobs columns, no indexes or constraints: the plain
  scratch table, and the baseline the target is judged against first, as it is the cost
  of moving that much data into Postgres at all.
- ``jobs' indexes``: ``LIKE jobs INCLUDING ALL`` (its five indexes, unique dedupe key
  included, and CHECK constraints). The cheapest way to store these rows in a table shaped
  like ``jobs``; the target is reported against it too.
- ``+ foreign keys`` (informational): the same plus ``jobs``' two foreign keys, i.e. what
  any writer of these rows into ``jobs`` pays at the very least. Its time divided by the bare
  table's is the best ratio against the bare table that even a producer doing nothing but
  a COPY into ``jobs`` could reach.

The producer's CPU time is printed beside its wall time: the difference is time spent
waiting for Postgres (or, on a busy machine, for a CPU).

    .venv/bin/python benchmarks/producer.py [--rows 250000] [--postgres URL]
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

TEMPLATES = """\
key: sku
defaults:
  steps: 25
  width: 512
  height: 512
  seeds: 4
  negative_prompt: "lowres, blurry, watermark, text"
templates:
  studio:
    prompt: >-
      best quality, product photography, {{ colour }} {{ title }} made of {{ material }},
      {white|light grey} seamless background, soft studio lighting
  lifestyle:
    prompt: >-
      best quality, editorial photo, {{ colour }} {{ title }} in {{ scene }},
      {morning|golden hour} light, shallow depth of field
"""

TITLES = ["canvas sneaker", "leather tote", "desk lamp", "ceramic mug", "wool scarf", "armchair"]
COLOURS = ["red", "navy", "sage green", "cognac", "matte black", "ivory", "mustard"]
MATERIALS = ["canvas", "leather", "aluminium", "stoneware", "merino wool", "oak"]
SCENES = ["a sunlit street", "a marble table", "a tidy office", "a rustic kitchen", "a park"]

JOB_COLUMNS = (
    "run_id, item_id, template, variant, prompt, negative_prompt, model, scheduler, steps, "
    "guidance, width, height, seeds, status, attempts, dedupe_key, created_at"
)


def write_catalogue(path: Path, rows: int) -> None:
    rng = random.Random(7)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["sku", "title", "colour", "material", "scene"])
        for i in range(rows):
            writer.writerow(
                [
                    f"SKU-{i:07d}",
                    rng.choice(TITLES),
                    rng.choice(COLOURS),
                    rng.choice(MATERIALS),
                    rng.choice(SCENES),
                ]
            )


def fresh_database(admin_url: str, name: str) -> str:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


FOREIGN_KEYS = (
    "FOREIGN KEY (run_id) REFERENCES runs (id) ON DELETE CASCADE",
    "FOREIGN KEY (item_id) REFERENCES catalogue_items (id)",
)


def timed_copy(
    conn: psycopg.Connection, table: str, like: str, data: bytes, extra: tuple[str, ...] = ()
) -> float:
    conn.execute(f"CREATE TABLE {table} (LIKE jobs {like})")
    for constraint in extra:
        conn.execute(f"ALTER TABLE {table} ADD {constraint}")
    conn.commit()
    started = time.perf_counter()
    with conn.cursor().copy(f"COPY {table} ({JOB_COLUMNS}) FROM STDIN") as copy:
        for offset in range(0, len(data), 1 << 20):
            copy.write(data[offset : offset + (1 << 20)])
    conn.commit()
    seconds = time.perf_counter() - started
    conn.execute(f"DROP TABLE {table}")  # one scratch table at a time in shared buffers
    conn.commit()
    return seconds


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class ProducerRun:
    seconds: float
    cpu_seconds: float
    peak_rss_mb: float


def run_producer(database_url: str, rows: int) -> ProducerRun | None:
    """Produces a catalogue of ``rows`` rows into the database (None if the produce failed)."""
    env = {**os.environ, "PIXELMILL_DATABASE_URL": database_url}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        catalogue, templates = work / "catalogue.csv", work / "templates.yaml"
        write_catalogue(catalogue, rows)
        templates.write_text(TEMPLATES)
        pixelmill = [sys.executable, "-m", "cli"]
        subprocess.run([*pixelmill, "db", "upgrade"], env=env, check=True, capture_output=True)

        cpu_before = children_cpu_seconds()
        started = time.perf_counter()
        produced = subprocess.run(
            [
                *pixelmill,
                "produce",
                str(catalogue),
                "--template",
                str(templates),
                "--run",
                "bench",
                "--max-jobs",
                str(rows * 4 + 1),
                "--no-dispatch",
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - started
        cpu_seconds = children_cpu_seconds() - cpu_before
        peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if produced.returncode != 0:
        print(produced.stdout, produced.stderr, file=sys.stderr)
        return None
    return ProducerRun(seconds, cpu_seconds, peak_rss_mb)


def time_raw_copies(url: str) -> tuple[int, dict[str, float]]:
    """The number of jobs produced, and the seconds a raw COPY of them takes per baseline."""
    with psycopg.connect(url) as conn:
        jobs = conn.execute("SELECT count(*) FROM jobs").fetchone()[0]  # type: ignore[index]
        # The same rows, as bytes in COPY format, then COPY them into a bare scratch table.
        buffer = io.BytesIO()
        with conn.cursor().copy(f"COPY (SELECT {JOB_COLUMNS} FROM jobs) TO STDOUT") as copy:
            for chunk in copy:
                buffer.write(chunk)
        data = buffer.getvalue()
        copy_seconds = {
            "bare table": timed_copy(conn, "scratch_bare", "INCLUDING DEFAULTS", data),
            "jobs' indexes": timed_copy(conn, "scratch_indexed", "INCLUDING ALL", data),
            "+ foreign keys": timed_copy(
                conn, "scratch_fk", "INCLUDING ALL", data, extra=FOREIGN_KEYS
            ),
        }
    return jobs, copy_seconds


def print_results(
    rows: int, jobs: int, producer: ProducerRun, copy_seconds: dict[str, float]
) -> None:
    producer_rate = jobs / producer.seconds
    print(f"rows:            {rows:,}")
    print(f"jobs:            {jobs:,}")
    print(
        f"producer:        {producer.seconds:8.2f} s  {producer_rate:12,.0f} jobs/s  "
        f"(CPU {producer.cpu_seconds:.2f} s)"
    )
    ratios: dict[str, float] = {}
    for name, seconds in copy_seconds.items():
        rate = jobs / seconds
        ratios[name] = producer_rate / rate
        print(
            f"raw COPY, {name + ':':15} {seconds:6.2f} s  {rate:12,.0f} jobs/s  "
            f"ratio producer/raw-COPY {ratios[name]:.2f}"
        )
    floor = copy_seconds["bare table"] / copy_seconds["+ foreign keys"]
    print(f"best ratio against the bare table for any writer into jobs: {floor:.2f}")
    for name in ("bare table", "jobs' indexes"):
        verdict = "met" if ratios[name] >= 0.5 else "NOT met"
        print(f"target ratio >= 0.5 against the {name}: {verdict} ({ratios[name]:.2f})")
    verdict = "met" if producer.peak_rss_mb < 500 else "NOT met"
    print(f"producer peak RSS: {producer.peak_rss_mb:.0f} MB  (target < 500 MB: {verdict})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=250_000)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()

    url = fresh_database(args.postgres, "pixelmill_bench")
    sa_url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    producer = run_producer(sa_url, args.rows)
    if producer is None:
        return 1
    jobs, copy_seconds = time_raw_copies(url)
    print_results(args.rows, jobs, producer, copy_seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
