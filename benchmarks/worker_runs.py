"""The runs of benchmarks/worker.py: its catalogue and templates, producing a run into the
database, the worker's settings, and what the worker recorded of its pipeline calls."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from benchmarks.worker_system import Services

TEMPLATES = """\
key: sku
defaults:
  model: {model}
  steps: {steps}
  width: {size}
  height: {size}
  guidance: 7.0
templates:
  studio:
    prompt: "product photo of a {{{{ colour }}}} {{{{ title }}}}, white background"
    negative_prompt: "{negative}"
"""

NEGATIVE = "lowres, blurry, watermark"

TITLES = ["canvas sneaker", "leather tote", "desk lamp", "ceramic mug", "wool scarf", "armchair"]
COLOURS = ["red", "navy", "sage green", "cognac", "matte black", "ivory", "mustard"]


def produce_run(
    database_url: str,
    work: Path,
    name: str,
    model: str,
    args: Any,
    jobs: int,
    *,
    negative: str = "",
) -> int:
    """Write a catalogue of ``jobs`` items and produce them as run ``name``; its id."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from db.models import Run
    from producer.produce import produce

    catalogue = work / f"{name}.csv"
    lines = ["sku,title,colour"]
    for i in range(jobs):
        lines.append(f"{name}-{i:04d},{TITLES[i % len(TITLES)]},{COLOURS[i % len(COLOURS)]}")
    catalogue.write_text("\n".join(lines) + "\n", encoding="utf-8")
    templates = work / f"{name}-templates.yaml"
    templates.write_text(
        TEMPLATES.format(model=model, steps=args.steps, size=args.size, negative=negative)
    )
    engine = create_engine(database_url)
    with Session(engine) as session:
        report = produce(
            session,
            catalogue_path=catalogue,
            templates_path=templates,
            seeds=args.seeds,
            default_model=model,
            run_name=name,
        )
        if report.jobs_new != jobs:
            raise SystemExit(f"produce wrote {report.jobs_new} jobs, expected {jobs}")
        run = session.query(Run).filter_by(name=name).one()
        run_id = run.id
    engine.dispose()
    return run_id


def render_seconds(database_url: str, run_id: int) -> float:
    """The time the worker spent inside pipeline calls for the run (from its image rows)."""
    from sqlalchemy import create_engine, func, select

    from db.models import Image, Job

    engine = create_engine(database_url)
    with engine.connect() as conn:
        total = conn.scalar(
            select(func.sum(Image.render_seconds))
            .join(Job, Job.id == Image.job_id)
            .where(Job.run_id == run_id)
        )
    engine.dispose()
    return float(total or 0.0)


def worker_settings(args: Any, model: str, services: Services, work: Path) -> dict[str, str]:
    return {
        "database_url": services.database_url,
        "broker_url": services.broker,
        "render_queue": f"bench-{uuid.uuid4().hex[:8]}",
        "model": model,
        "device": args.device,
        "data_dir": str(work / "data"),
        "render_batch_size": str(args.batch_size),
        # The bare loops render --batch-size batches: so does the system (no memory probe).
        "render_batch_probe": "false",
        "safety_checker": str(args.safety_checker).lower(),
        **services.storage,
    }
