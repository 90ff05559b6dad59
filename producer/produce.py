"""Expand a catalogue and a template file into a run of render jobs.

One streaming pass reads the catalogue, checks every row against every template that applies
and expands the good rows into job rows. These go, chunk by chunk, through temporary staging
tables (Postgres ``COPY``, batched inserts on SQLite) and two set-based statements merge each
chunk into ``catalogue_items`` and ``jobs`` (see :mod:`producer.staging`; on Postgres this
overlaps with the expansion). All of it happens in one transaction, committed only once the
whole catalogue has been read and accepted: a refused catalogue (``--strict`` with bad rows,
more jobs than ``--max-jobs``, a structural error, a cancelled run) leaves nothing behind,
and memory stays flat however large the catalogue is.

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
from producer.seeds import SweepPlan, item_seed_state
from producer.sources import CatalogueSource, open_catalogue
from producer.staging import JobShape, StagedJob, open_staging
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


@dataclass(frozen=True)
class _Item:
    """An accepted catalogue row and its jobs, as :meth:`Producer.expand` yields them."""

    key: str
    fields: dict[str, str]
    fields_json: str
    content_hash: str
    jobs: list[StagedJob]


class _Variant:
    """What the jobs of one template variant share, worked out once per produce.

    A bulk run makes a job per row and variant, so everything that does not depend on the
    row is prepared here: the job's settings columns, the seed sweep's fixed parts, the hash
    state of the dedupe key after the settings (copied per job), the token counter.
    """

    def __init__(
        self,
        template: Template,
        variant: str,
        *,
        model: str,
        seeds: int,
        token_counter: TokenCounter,
    ) -> None:
        self.template = template
        self.shape = JobShape(
            template=template.name,
            variant=variant,
            model=model,
            scheduler=template.scheduler,
            steps=template.steps,
            guidance=template.guidance,
            width=template.width,
            height=template.height,
        )
        self.sweep = SweepPlan(template.name, seeds, variant=variant)
        self.settings_state = hashlib.sha256(
            _settings_parts(
                model,
                template.scheduler,
                template.steps,
                template.guidance,
                template.width,
                template.height,
            ).encode("utf-8")
        )
        self.token_counter = token_counter


def fields_json(fields: dict[str, str]) -> str:
    """An item's fields as canonical JSON (sorted keys): what its content hash covers."""
    return json.dumps(fields, sort_keys=True, ensure_ascii=False)


def content_hash(fields: dict[str, str]) -> str:
    return hashlib.sha256(fields_json(fields).encode("utf-8")).hexdigest()


def _length_prefixed(part: str) -> str:
    # Length-prefixed parts: unambiguous whatever characters the prompts contain.
    return f"{len(part)}:{part}"


def _settings_parts(
    model: str, scheduler: str | None, steps: int, guidance: float, width: int, height: int
) -> str:
    parts = (model, str(scheduler), str(steps), repr(float(guidance)), str(width), str(height))
    return "".join(map(_length_prefixed, parts))


def dedupe_key(job: dict[str, Any], salt: str = "") -> str:
    """Hash of everything that determines a job's pixels (plus ``salt`` for forced renders).

    The reference definition; the producer computes the same value through :class:`_Variant`
    (the settings hashed once per template variant).
    """
    encoded = _settings_parts(
        job["model"], job["scheduler"], job["steps"], job["guidance"], job["width"], job["height"]
    ) + "".join(
        map(
            _length_prefixed,
            (job["prompt"], job["negative_prompt"], ",".join(map(str, job["seeds"])), salt),
        )
    )
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
        self.variants = [(template, self._variants(template)) for template in templates.templates]

    def _variants(self, template: Template) -> list[_Variant]:
        model = template.model or self.options.default_model
        counter = self._token_counter(model)
        count = self.options.seeds or template.seeds or DEFAULT_SEEDS
        return [
            _Variant(template, label, model=model, seeds=count, token_counter=counter)
            for label in template.variants()
        ]

    def run(self, session: Session | None) -> ProduceReport:
        if self.options.dry_run:
            for _item in self.expand():
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
        run, refusal = self._run(session)
        # A cancelled run is refused, but only once the catalogue has been read: bad rows
        # (--strict) and --max-jobs are reported first, as they always were.
        staging = None if refusal else open_staging(session, run_id=run.id, source=self.source.name)
        try:
            for item in self.expand():
                # In strict mode one bad row refuses the catalogue: stop writing, keep reading
                # to report every bad row.
                if staging is not None and not (self.options.strict and self.report.problems_total):
                    staging.add(
                        item.key, item.content_hash, item.fields, item.fields_json, item.jobs
                    )
            if self.options.strict and self.report.problems_total:
                raise StrictModeError(self.label, self.report.problems, self.report.problems_total)
            if refusal is not None:
                raise refusal
            assert staging is not None
            self.report.jobs_new = staging.finish()
        except BaseException:
            if staging is not None:
                staging.abort()
            raise
        self.report.run_id = run.id
        self.report.jobs_unchanged = self.report.jobs - self.report.jobs_new

    def _run(self, session: Session) -> tuple[Run, InputError | None]:
        """The run to add jobs to, and why it must be refused (a cancelled run), if it must.

        Looked up before the catalogue is read, since jobs are merged as it streams; the
        transaction is rolled back if the produce is refused.
        """
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
            return run, InputError(
                self.label, None, None, f"run {name!r} was cancelled; choose another --run name"
            )
        elif run.status == RunStatus.FINISHED:
            run.status = RunStatus.ACTIVE  # more jobs for a run that had finished
            run.finished_at = None
            session.flush()
        return run, None

    # --- expansion -------------------------------------------------------------------------

    def expand(self) -> Iterator[_Item]:
        """Yields every good row with its jobs; bad rows go to the report."""
        first_line: dict[str, int] = {}
        key_column = self.templates.key
        report = self.report
        for row in self.source.rows():
            report.rows += 1
            try:
                if row.problem is not None:
                    raise row.problem
                key = self._check_key(row, key_column, first_line)
                jobs, images = self._jobs_for(row, key)
            except InputError as problem:
                # Keep reading even in strict mode: report every bad row, then write nothing.
                report.add_problem(problem)
                report.rows_skipped += 1
                continue
            report.items += 1
            if not jobs:
                report.items_without_jobs += 1
            report.jobs += len(jobs)
            report.images_planned += images
            if report.jobs > self.options.max_jobs:
                raise ExpansionLimitError(
                    self.label,
                    row.line,
                    None,
                    f"the catalogue expands to more than {self.options.max_jobs:,} jobs "
                    f"(reached at this row); raise --max-jobs if that is intended",
                )
            if self.progress is not None and report.rows % 1000 == 0:
                self.progress(report.rows, report.jobs)
            canonical = fields_json(row.fields)
            item_hash = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
            yield _Item(key, row.fields, canonical, item_hash, jobs)
        if self.progress is not None:
            self.progress(report.rows, report.jobs)

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

    def _jobs_for(self, row: CatalogueRow, key: str) -> tuple[list[StagedJob], int]:
        """The row's jobs, and the images they plan."""
        where = f"{self.label}:{row.line}"
        jobs: list[StagedJob] = []
        images = 0
        seed_state = item_seed_state(key)
        salt = _length_prefixed(self.force_salt)
        for template, variants in self.variants:
            try:
                if not template.applies_to(row.fields, where=where):
                    continue
                prompts = template.expand_prompts(row.fields, where=where)
            except RenderError as exc:
                raise CatalogueError(
                    self.label, row.line, exc.field, f"template {template.name!r}: {exc.reason}"
                ) from exc
            for variant, (prompt, negative) in zip(variants, prompts, strict=True):
                self._check_prompt(row, variant, key, prompt, negative)
                seeds = ",".join(map(str, variant.sweep.seeds(seed_state)))
                digest = variant.settings_state.copy()
                # The rest of dedupe_key()'s parts: prompt, negative prompt, seeds, salt.
                rest = f"{len(prompt)}:{prompt}{len(negative)}:{negative}{len(seeds)}:{seeds}"
                digest.update(f"{rest}{salt}".encode())
                jobs.append((variant.shape, prompt, negative, f"[{seeds}]", digest.hexdigest()))
                images += variant.sweep.count
        return jobs, images

    def _check_prompt(
        self, row: CatalogueRow, variant: _Variant, key: str, prompt: str, negative: str
    ) -> None:
        template = variant.template
        blocklist = self.options.blocklist
        if blocklist is not None:
            match = blocklist.check(prompt)
            if match is not None:
                raise CatalogueError(
                    self.label,
                    row.line,
                    None,
                    f"template {template.name!r}: prompt contains blocked term "
                    f"{match.matched!r} (rule {match.rule!r} at {match.source})",
                )
        counter = variant.token_counter
        for part, text in (("prompt", prompt), ("negative_prompt", negative)):
            if part == "negative_prompt" and text in self.fitting_negatives:
                continue  # negative prompts repeat across jobs: count each text once
            tokens = counter.over_window(text)
            if part == "negative_prompt" and tokens is None:
                if len(self.fitting_negatives) > 10_000:
                    self.fitting_negatives.clear()  # bounded memory
                self.fitting_negatives.add(text)
            if tokens is not None:
                self.report.add_warning(
                    InputError(
                        self.label,
                        row.line,
                        None,
                        f"template {template.name!r}: {part.replace('_', ' ')} of item "
                        f"{key!r} is about {tokens} tokens; CLIP reads the first "
                        f"{CLIP_WINDOW}",
                    )
                )
        samples = self.report.samples.setdefault(template.name, [])
        if len(samples) < SAMPLES_PER_TEMPLATE:
            samples.append(prompt)

    def _token_counter(self, model: str) -> TokenCounter:
        counter = self.token_counters.get(model)
        if counter is None:
            counter = self.token_counters[model] = TokenCounter.for_model(model)
        return counter
