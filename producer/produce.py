"""Expand a catalogue and a template file into a run of render jobs.

The whole catalogue is validated and written in one transaction: a malformed catalogue raises
before commit and leaves nothing behind. Jobs are deduplicated on a key over everything that
determines their pixels, so producing an unchanged catalogue again creates no jobs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from db.models import CatalogueItem, Job, Run, RunStatus
from db.upsert import insert_ignoring_conflicts, insert_ignoring_conflicts_stmt
from producer.catalogue import CatalogueError, CatalogueRow, CsvCatalogue
from producer.seeds import seed_sweep
from producer.templates import RenderError, Template, TemplateFile, load_templates

BATCH_ROWS = 500
# Sweep size when neither the command line nor the template gives one.
DEFAULT_SEEDS = 4


@dataclass
class ProduceReport:
    run_id: int
    run_name: str
    items: int = 0
    jobs_new: int = 0
    jobs_unchanged: int = 0
    images_planned: int = 0
    job_ids: list[int] = field(default_factory=list)


def content_hash(fields: dict[str, str]) -> str:
    return hashlib.sha256(
        json.dumps(fields, sort_keys=True, ensure_ascii=False).encode("utf-8")
    ).hexdigest()


def dedupe_key(job: dict[str, Any]) -> str:
    """Hash of everything that determines a job's pixels."""
    parts = [
        job["model"],
        job["scheduler"],
        job["steps"],
        job["guidance"],
        job["width"],
        job["height"],
        job["prompt"],
        job["negative_prompt"],
        job["seeds"],
    ]
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode("utf-8")).hexdigest()


def default_run_name(catalogue: Path) -> str:
    return f"{catalogue.stem}-{datetime.now(UTC):%Y%m%d-%H%M%S}"


def produce(
    session: Session,
    *,
    catalogue_path: Path,
    templates_path: Path,
    seeds: int | None,
    default_model: str,
    run_name: str | None = None,
    encoding: str = "utf-8-sig",
) -> ProduceReport:
    """Validate and write a run's jobs; commits on success, raises (having written nothing)
    on a bad catalogue or template file."""
    templates = load_templates(templates_path)
    catalogue = CsvCatalogue(catalogue_path, encoding=encoding)
    catalogue.require_columns([templates.key], who="the template file's 'key'")
    for template in templates.templates:
        catalogue.require_columns(sorted(template.fields()), who=f"template {template.name!r}")
    try:
        report = _write(
            session,
            catalogue=catalogue,
            templates=templates,
            seeds=seeds,
            default_model=default_model,
            run_name=run_name or default_run_name(catalogue_path),
        )
    except BaseException:
        session.rollback()
        raise
    session.commit()
    return report


def _write(
    session: Session,
    *,
    catalogue: CsvCatalogue,
    templates: TemplateFile,
    seeds: int | None,
    default_model: str,
    run_name: str,
) -> ProduceReport:
    run = session.scalars(select(Run).where(Run.name == run_name)).one_or_none()
    if run is None:
        run = Run(name=run_name, source=str(catalogue.path), status=RunStatus.ACTIVE)
        session.add(run)
        session.flush()
    report = ProduceReport(run_id=run.id, run_name=run.name)
    source = catalogue.path.name
    for batch in _batches(_unique_rows(catalogue, templates.key), BATCH_ROWS):
        item_ids = _write_items(session, source, templates.key, batch)
        jobs = []
        for row in batch:
            key = row.fields[templates.key]
            for template in templates.templates:
                jobs.append(
                    _job_row(
                        row, template, key, item_ids[key], run.id, seeds, default_model, catalogue
                    )
                )
        report.items += len(batch)
        report.images_planned += sum(len(j["seeds"]) for j in jobs)
        if jobs:
            inserted = session.execute(
                insert_ignoring_conflicts_stmt(session, Job).returning(Job.id), jobs
            ).scalars()
            new_ids = list(inserted)
            report.job_ids.extend(new_ids)
            report.jobs_new += len(new_ids)
            report.jobs_unchanged += len(jobs) - len(new_ids)
    return report


def _unique_rows(catalogue: CsvCatalogue, key_column: str) -> Iterator[CatalogueRow]:
    first_line: dict[str, int] = {}
    for row in catalogue:
        key = row.fields.get(key_column, "")
        if not key:
            raise CatalogueError(catalogue.path, row.line, key_column, "item key is empty")
        if key in first_line:
            raise CatalogueError(
                catalogue.path,
                row.line,
                key_column,
                f"duplicate item key {key!r} (first seen on line {first_line[key]})",
            )
        first_line[key] = row.line
        yield row


def _batches(rows: Iterator[CatalogueRow], size: int) -> Iterator[list[CatalogueRow]]:
    batch: list[CatalogueRow] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_items(
    session: Session, source: str, key_column: str, rows: list[CatalogueRow]
) -> dict[str, int]:
    values = [
        {
            "source": source,
            "external_key": row.fields[key_column],
            "fields": row.fields,
            "content_hash": content_hash(row.fields),
        }
        for row in rows
    ]
    insert_ignoring_conflicts(session, CatalogueItem, values)
    wanted = [(v["external_key"], v["content_hash"]) for v in values]
    found = session.execute(
        select(CatalogueItem.external_key, CatalogueItem.id).where(
            CatalogueItem.source == source,
            tuple_(CatalogueItem.external_key, CatalogueItem.content_hash).in_(wanted),
        )
    )
    return {external_key: item_id for external_key, item_id in found}


def _job_row(
    row: CatalogueRow,
    template: Template,
    key: str,
    item_id: int,
    run_id: int,
    seeds: int | None,
    default_model: str,
    catalogue: CsvCatalogue,
) -> dict[str, Any]:
    try:
        prompt, negative_prompt = template.render(row.fields, where=f"{catalogue.path}:{row.line}")
    except RenderError as exc:
        raise CatalogueError(
            catalogue.path, row.line, exc.field, f"template {template.name!r}: {exc.reason}"
        ) from exc
    count = seeds or template.seeds or DEFAULT_SEEDS
    job: dict[str, Any] = {
        "run_id": run_id,
        "item_id": item_id,
        "template": template.name,
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "model": template.model or default_model,
        "scheduler": template.scheduler,
        "steps": template.steps,
        "guidance": template.guidance,
        "width": template.width,
        "height": template.height,
        "seeds": seed_sweep(key, template.name, count),
    }
    job["dedupe_key"] = dedupe_key(job)
    return job
