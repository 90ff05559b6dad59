"""Expand a catalogue and a template file into a run of render jobs.

One streaming pass reads the catalogue, checks every row against every template that applies
and expands the good rows into job rows, which go into temporary staging tables (Postgres
``COPY``, batched inserts on SQLite). Nothing reaches the real tables until the whole
catalogue has been read and accepted: then two set-based statements merge the staging tables
into ``catalogue_items`` and ``jobs``. A refused catalogue (``--strict`` with bad rows, more
jobs than ``--max-jobs``, a structural error) leaves nothing behind, and memory stays flat
however large the catalogue is.

Jobs are deduplicated on a key over everything that determines their pixels, so producing an
unchanged catalogue again creates no jobs; ``force`` salts the key to render again on purpose.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Run, RunStatus
from pixelmill.blocklist import Blocklist
from producer.catalogue import CatalogueError, CatalogueRow
from producer.errors import InputError
from producer.seeds import seed_sweep
from producer.sources import CatalogueSource, open_catalogue
from producer.staging import Staging
from producer.templates import RenderError, Template, TemplateFile, load_templates
from producer.tokens import CLIP_WINDOW, TokenCounter

# Sweep size when neither the command line nor the template gives one.
DEFAULT_SEEDS = 4
# A typo in a variant or a template matching every row can explode into millions of jobs.
DEFAULT_MAX_JOBS = 100_000
# How many problems and warnings a report keeps in full (the rest are counted).
KEEP_PROBLEMS = 200
SAMPLES_PER_TEMPLATE = 3


class ExpansionLimitError(InputError):
    """The catalogue would expand into more jobs than allowed."""


class StrictModeError(InputError):
    """``strict`` was asked for and some rows were bad; ``problems`` lists them."""

    def __init__(self, path: str, problems: list[InputError], total: int) -> None:
        self.problems = problems
        self.total = total
        super().__init__(path, None, None, f"{total} bad rows; nothing was written (--strict)")


@dataclass
class ProduceReport:
    run_name: str
    run_id: int | None = None
    dry_run: bool = False
    rows: int = 0
    rows_skipped: int = 0
    items: int = 0
    items_without_jobs: int = 0
    jobs: int = 0
    jobs_new: int = 0
    jobs_unchanged: int = 0
    images_planned: int = 0
    problems: list[InputError] = field(default_factory=list)
    problems_total: int = 0
    warnings: list[InputError] = field(default_factory=list)
    warnings_total: int = 0
    samples: dict[str, list[str]] = field(default_factory=dict)

    def add_problem(self, problem: InputError) -> None:
        self.problems_total += 1
        if len(self.problems) < KEEP_PROBLEMS:
            self.problems.append(problem)

    def add_warning(self, warning: InputError) -> None:
        self.warnings_total += 1
        if len(self.warnings) < KEEP_PROBLEMS:
            self.warnings.append(warning)

    @property
    def complete(self) -> bool:
        """Every row was accepted."""
        return self.rows_skipped == 0


@dataclass(frozen=True)
class ProduceOptions:
    seeds: int | None = None
    default_model: str = "tiny"
    run_name: str | None = None
    strict: bool = False
    max_jobs: int = DEFAULT_MAX_JOBS
    dry_run: bool = False
    force: bool = False
    priority: int = 0
    blocklist: Blocklist | None = None


# Called with (rows read, jobs expanded) as the catalogue streams: a progress bar hooks in here.
Progress = Callable[[int, int], None]


def content_hash(fields: dict[str, str]) -> str:
    return hashlib.sha256(
        json.dumps(fields, sort_keys=True, ensure_ascii=False).encode("utf-8")
    ).hexdigest()


def dedupe_key(job: dict[str, Any], salt: str = "") -> str:
    """Hash of everything that determines a job's pixels (plus ``salt`` for forced renders)."""
    parts = [
        job["model"],
        str(job["scheduler"]),
        str(job["steps"]),
        repr(float(job["guidance"])),
        str(job["width"]),
        str(job["height"]),
        job["prompt"],
        job["negative_prompt"],
        ",".join(map(str, job["seeds"])),
        salt,
    ]
    # Length-prefixed parts: unambiguous whatever characters the prompts contain.
    encoded = "".join(f"{len(part)}:{part}" for part in parts)
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()


def default_run_name(catalogue: str | Path) -> str:
    stem = Path(str(catalogue)).stem if "://" not in str(catalogue) else "sql"
    return f"{stem}-{datetime.now(UTC):%Y%m%d-%H%M%S}"


def produce(
    session: Session | None,
    *,
    catalogue_path: str | Path,
    templates_path: Path,
    seeds: int | None = None,
    default_model: str = "tiny",
    run_name: str | None = None,
    encoding: str | None = None,
    delimiter: str | None = None,
    table: str | None = None,
    query: str | None = None,
    strict: bool = False,
    max_jobs: int = DEFAULT_MAX_JOBS,
    dry_run: bool = False,
    force: bool = False,
    priority: int = 0,
    blocklist: Blocklist | None = None,
    progress: Progress | None = None,
) -> ProduceReport:
    """Validate the catalogue and write a run's jobs (commits on success).

    Raises an :class:`InputError` (having written nothing) on a structural problem, on bad rows
    when ``strict``, and when the expansion exceeds ``max_jobs``. Otherwise bad rows are
    skipped and listed in the report. ``dry_run`` needs no session and writes nothing.
    """
    templates = load_templates(templates_path)
    source = open_catalogue(
        str(catalogue_path), encoding=encoding, delimiter=delimiter, table=table, query=query
    )
    options = ProduceOptions(
        seeds=seeds,
        default_model=default_model,
        run_name=run_name or default_run_name(catalogue_path),
        strict=strict,
        max_jobs=max_jobs,
        dry_run=dry_run,
        force=force,
        priority=priority,
        blocklist=blocklist,
    )
    return Producer(source, templates, options, progress).run(session)


class Producer:
    def __init__(
        self,
        source: CatalogueSource,
        templates: TemplateFile,
        options: ProduceOptions,
        progress: Progress | None = None,
    ) -> None:
        self.source = source
        self.templates = templates
        self.options = options
        self.progress = progress
        self.label = str(source.path)
        self.report = ProduceReport(run_name=options.run_name or "", dry_run=options.dry_run)
        self.token_counters: dict[str, TokenCounter] = {}
        self.fitting_negatives: set[str] = set()
        # --force: a salt unique to this produce, so its jobs never match earlier ones.
        self.force_salt = (
            f"force:{options.run_name}:{datetime.now(UTC).isoformat()}" if options.force else ""
        )
        source.require_columns([templates.key], who="the template file's 'key'")
        for template in templates.templates:
            source.require_columns(sorted(template.fields()), who=f"template {template.name!r}")

    def run(self, session: Session | None) -> ProduceReport:
        if self.options.dry_run:
            for _item, _jobs in self.expand():
                pass
            return self.report
        if session is None:
            raise ValueError("a database session is needed unless dry_run is set")
        try:
            self._write(session)
        except BaseException:
            session.rollback()
            raise
        session.commit()
        return self.report

    def _write(self, session: Session) -> None:
        staging = Staging(session)
        for item, jobs in self.expand():
            staging.add(item, jobs)
        staging.flush()
        if self.options.strict and self.report.problems_total:
            raise StrictModeError(self.label, self.report.problems, self.report.problems_total)
        run = self._run(session)
        self.report.run_id = run.id
        self.report.jobs_new = staging.merge(run_id=run.id, source=self._source_name())
        self.report.jobs_unchanged = self.report.jobs - self.report.jobs_new

    def _source_name(self) -> str:
        # Items are identified per source: a file by its name, a table or query by its label.
        return self.source.name

    def _run(self, session: Session) -> Run:
        name = self.options.run_name or ""
        run = session.scalars(select(Run).where(Run.name == name)).one_or_none()
        if run is None:
            run = Run(
                name=name,
                source=self.label,
                status=RunStatus.ACTIVE,
                priority=self.options.priority,
            )
            session.add(run)
            session.flush()
        elif run.status == RunStatus.CANCELLED:
            raise InputError(
                self.label, None, None, f"run {name!r} was cancelled; choose another --run name"
            )
        elif run.status == RunStatus.FINISHED:
            run.status = RunStatus.ACTIVE  # more jobs for a run that had finished
            run.finished_at = None
        return run

    # --- expansion -------------------------------------------------------------------------

    def expand(self) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
        """Yields (item, its jobs) for every good row; bad rows go to the report."""
        first_line: dict[str, int] = {}
        key_column = self.templates.key
        for row in self.source.rows():
            self.report.rows += 1
            try:
                if row.problem is not None:
                    raise row.problem
                key = self._check_key(row, key_column, first_line)
                jobs = self._jobs_for(row, key)
            except InputError as problem:
                # Keep reading even in strict mode: report every bad row, then write nothing.
                self.report.add_problem(problem)
                self.report.rows_skipped += 1
                continue
            self.report.items += 1
            if not jobs:
                self.report.items_without_jobs += 1
            self.report.jobs += len(jobs)
            self.report.images_planned += sum(len(job["seeds"]) for job in jobs)
            if self.report.jobs > self.options.max_jobs:
                raise ExpansionLimitError(
                    self.label,
                    row.line,
                    None,
                    f"the catalogue expands to more than {self.options.max_jobs:,} jobs "
                    f"(reached at this row); raise --max-jobs if that is intended",
                )
            if self.progress is not None and self.report.rows % 1000 == 0:
                self.progress(self.report.rows, self.report.jobs)
            yield {"key": key, "fields": row.fields, "hash": content_hash(row.fields)}, jobs
        if self.progress is not None:
            self.progress(self.report.rows, self.report.jobs)

    def _check_key(self, row: CatalogueRow, key_column: str, first_line: dict[str, int]) -> str:
        key = row.fields.get(key_column, "")
        if not key:
            raise CatalogueError(self.label, row.line, key_column, "item key is empty")
        if key in first_line:
            raise CatalogueError(
                self.label,
                row.line,
                key_column,
                f"duplicate item key {key!r} (first seen on line {first_line[key]})",
            )
        first_line[key] = row.line
        return key

    def _jobs_for(self, row: CatalogueRow, key: str) -> list[dict[str, Any]]:
        where = f"{self.label}:{row.line}"
        jobs: list[dict[str, Any]] = []
        for template in self.templates.templates:
            try:
                if not template.applies_to(row.fields, where=where):
                    continue
                prompts = template.expand(row.fields, where=where)
            except RenderError as exc:
                raise CatalogueError(
                    self.label, row.line, exc.field, f"template {template.name!r}: {exc.reason}"
                ) from exc
            for rendered in prompts:
                job = self._job(
                    template, key, rendered.variant, rendered.prompt, rendered.negative_prompt
                )
                self._check_prompt(row, template, job)
                jobs.append(job)
        return jobs

    def _job(
        self, template: Template, key: str, variant: str, prompt: str, negative_prompt: str
    ) -> dict[str, Any]:
        count = self.options.seeds or template.seeds or DEFAULT_SEEDS
        job: dict[str, Any] = {
            "template": template.name,
            "variant": variant,
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "model": template.model or self.options.default_model,
            "scheduler": template.scheduler,
            "steps": template.steps,
            "guidance": template.guidance,
            "width": template.width,
            "height": template.height,
            "seeds": seed_sweep(key, template.name, count, variant=variant),
            "item_key": key,
        }
        salt = self.force_salt
        job["dedupe_key"] = dedupe_key(job, salt)
        return job

    def _check_prompt(self, row: CatalogueRow, template: Template, job: dict[str, Any]) -> None:
        blocklist = self.options.blocklist
        if blocklist is not None:
            match = blocklist.check(job["prompt"])
            if match is not None:
                raise CatalogueError(
                    self.label,
                    row.line,
                    None,
                    f"template {template.name!r}: prompt contains blocked term "
                    f"{match.matched!r} (rule {match.rule!r} at {match.source})",
                )
        counter = self._token_counter(job["model"])
        for part in ("prompt", "negative_prompt"):
            if part == "negative_prompt" and job[part] in self.fitting_negatives:
                continue  # negative prompts repeat across jobs: count each text once
            tokens = counter.over_window(job[part])
            if part == "negative_prompt" and tokens is None:
                if len(self.fitting_negatives) > 10_000:
                    self.fitting_negatives.clear()  # bounded memory
                self.fitting_negatives.add(job[part])
            if tokens is not None:
                self.report.add_warning(
                    InputError(
                        self.label,
                        row.line,
                        None,
                        f"template {template.name!r}: {part.replace('_', ' ')} of item "
                        f"{job['item_key']!r} is about {tokens} tokens; CLIP reads the first "
                        f"{CLIP_WINDOW}",
                    )
                )
        samples = self.report.samples.setdefault(template.name, [])
        if len(samples) < SAMPLES_PER_TEMPLATE:
            samples.append(job["prompt"])

    def _token_counter(self, model: str) -> TokenCounter:
        counter = self.token_counters.get(model)
        if counter is None:
            counter = self.token_counters[model] = TokenCounter.for_model(model)
        return counter
