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

Templates that start from the catalogue's images (img2img, inpaint, controlnet) have their
images staged first, in a pass of their own over the catalogue (:mod:`producer.input_images`,
in the same transaction); the jobs then refer to the staged images by content hash, and an
image that cannot be fetched or decoded makes its item a bad row.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.limits import string_length, unstorable
from db.models import CatalogueItem, Job, Run, RunStatus
from db.run_locks import lock_loaded_run
from pixelmill.blocklist import Blocklist
from pixelmill.errors import InputError
from pixelmill.identity import (
    conditioning_parts,
    fields_json,
    length_prefixed,
    settings_parts,
)
from pixelmill.seeds import SweepPlan, item_seed_state
from pixelmill.settings import Settings, get_settings
from pixelmill.storage import Storage
from producer.catalogue import CatalogueError, CatalogueRow
from producer.input_images import InputImageError, InputStager, StagedImage, source_address
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


# Lengths of the columns the producer fills from its inputs (see db.limits).
RUN_NAME_LENGTH = string_length(Run.__table__.c.name)
SOURCE_NAME_LENGTH = string_length(CatalogueItem.__table__.c.source)
ITEM_KEY_LENGTH = string_length(CatalogueItem.__table__.c.external_key)
VARIANT_LABEL_LENGTH = string_length(Job.__table__.c.variant)


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
    # Catalogue images (templates with an image column): distinct addresses the accepted and
    # rejected rows name; of those, fetched now, already staged by an earlier run, failed.
    # A dry run fetches nothing: only ``inputs`` is counted.
    inputs: int = 0
    inputs_fetched: int = 0
    inputs_reused: int = 0
    inputs_failed: int = 0

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
    # None: a new run gets 0, an existing run keeps its own.
    priority: int | None = None
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
        options = template.conditioning.options.canonical()
        self.shape = JobShape(
            template=template.name,
            variant=variant,
            model=model,
            scheduler=template.scheduler,
            steps=template.steps,
            guidance=template.guidance,
            width=template.width,
            height=template.height,
            kind=template.conditioning.kind,
            options=options or None,
        )
        self.sweep = SweepPlan(template.name, seeds, variant=variant)
        self.settings_state = hashlib.sha256(
            settings_parts(
                model,
                template.scheduler,
                template.steps,
                template.guidance,
                template.width,
                template.height,
            ).encode("utf-8")
        )
        self.token_counter = token_counter
        # Why the jobs table cannot store this variant's label, if it cannot. Reported for
        # each row the template applies to (the label is the template's, but a bad row is
        # what the catalogue's other rows can proceed without).
        self.label_problem: str | None = None
        if len(variant) > VARIANT_LABEL_LENGTH:
            self.label_problem = (
                f"variant label {_shorten(variant)!r} is {len(variant)} characters; "
                f"the jobs table holds at most {VARIANT_LABEL_LENGTH}"
            )
        elif (reason := unstorable(variant)) is not None:
            self.label_problem = f"variant label {_shorten(variant)!r} {reason}"


def _shorten(value: str, length: int = 60) -> str:
    """``value`` cut for an error message (a too long value is not repeated in full)."""
    return value if len(value) <= length else f"{value[:length]}..."


class _Plan:
    """One template's variants, and what its jobs' dedupe keys add after the prompt parts."""

    def __init__(self, template: Template, variants: list[_Variant], force_salt: str) -> None:
        self.template = template
        self.variants = variants
        self.label_problem = next(
            (variant.label_problem for variant in variants if variant.label_problem), None
        )
        self.conditioning = template.conditioning
        self.shapes = [variant.shape for variant in variants]
        # Whether the jobs start from a catalogue image (staged per row).
        self.images = self.conditioning.image is not None
        self.salt = length_prefixed(force_salt)
        self.options = self.conditioning.options.canonical()
        # The dedupe key's tail (salt, then conditioning_parts()) of a job without images.
        self.tail = self.salt + conditioning_parts(self.conditioning.kind, None, None, self.options)

    def for_images(
        self, image: StagedImage, mask: StagedImage | None
    ) -> tuple[list[JobShape], str]:
        """The shapes and dedupe key tail of one row's jobs, which start from ``image``."""
        mask_sha = None if mask is None else mask.sha256
        shapes = [
            replace(shape, input_image=image.sha256, mask_image=mask_sha) for shape in self.shapes
        ]
        tail = self.salt + conditioning_parts(
            self.conditioning.kind, image.sha256, mask_sha, self.options
        )
        return shapes, tail


def default_run_name(catalogue: str | Path) -> str:
    stem = Path(str(catalogue)).stem if "://" not in str(catalogue) else "sql"
    suffix = f"-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    # A long file name is cut so that the name fits the runs table.
    return stem[: RUN_NAME_LENGTH - len(suffix)] + suffix


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
    priority: int | None = None,
    blocklist: Blocklist | None = None,
    progress: Progress | None = None,
    settings: Settings | None = None,
    storage: Storage | None = None,
) -> ProduceReport:
    """Validate the catalogue and write a run's jobs (commits on success).

    Raises an :class:`InputError` (having written nothing) on a structural problem, on bad rows
    when ``strict``, and when the expansion exceeds ``max_jobs``. Otherwise bad rows are
    skipped and listed in the report. ``dry_run`` needs no session and writes nothing (and
    fetches no catalogue image).

    ``settings`` (default: from the environment) and ``storage`` (default: the settings')
    are used only by templates with an image column, to fetch and store their images.
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
    return Producer(source, templates, options, progress, settings=settings, storage=storage).run(
        session
    )


class Producer:
    def __init__(
        self,
        source: CatalogueSource,
        templates: TemplateFile,
        options: ProduceOptions,
        progress: Progress | None = None,
        *,
        settings: Settings | None = None,
        storage: Storage | None = None,
    ) -> None:
        self.source = source
        self.settings = settings
        self.storage = storage
        self.templates = templates
        self.options = options
        self.progress = progress
        self.label = str(source.path)
        self.report = ProduceReport(run_name=options.run_name or "", dry_run=options.dry_run)
        self._check_names(options.run_name or "", source.name)
        self.token_counters: dict[str, TokenCounter] = {}
        self.fitting_negatives: set[str] = set()
        # --force: a salt unique to this produce, so its jobs never match earlier ones.
        self.force_salt = (
            f"force:{options.run_name}:{datetime.now(UTC).isoformat()}" if options.force else ""
        )
        source.require_columns([templates.key], who="the template file's 'key'")
        for template in templates.templates:
            # Only the rows a template applies to need its fields (see require_columns).
            source.require_columns(
                sorted(template.fields()), who=f"template {template.name!r}", every_row=False
            )
            source.require_columns(
                template.conditioning.columns(),
                who=f"template {template.name!r} (images)",
                every_row=False,
            )
        self.plans = [
            _Plan(template, self._variants(template), self.force_salt)
            for template in templates.templates
        ]
        # Relative image paths in the catalogue start at the catalogue file's folder.
        path = os.fspath(source.path)
        self.image_base = Path(os.path.abspath(path)).parent if os.path.isfile(path) else Path()
        # Address -> staged image or why it failed; None until staged (and on a dry run).
        self.inputs: dict[str, StagedImage | InputImageError] | None = None
        self.dry_run_addresses: set[str] = set()

    def _check_names(self, run_name: str, source_name: str) -> None:
        """Refuses, before anything is read or written (a dry run too), a run name or a
        catalogue name the database cannot store."""
        for what, name, length in (
            ("the --run name", run_name, RUN_NAME_LENGTH),
            ("the catalogue's name", source_name, SOURCE_NAME_LENGTH),
        ):
            if len(name) > length:
                raise InputError(
                    self.label,
                    None,
                    None,
                    f"{what} {_shorten(name)!r} is {len(name)} characters; "
                    f"the database holds at most {length}",
                )
            if (reason := unstorable(name)) is not None:
                raise InputError(self.label, None, None, f"{what} {_shorten(name)!r} {reason}")

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
            self.report.inputs = len(self.dry_run_addresses)
            return self.report
        if session is None:
            raise ValueError("a database session is needed unless dry_run is set")
        try:
            self._stage_inputs(session)
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
        self._lock_run(session, run)
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
                priority=self.options.priority or 0,
            )
            session.add(run)
            session.flush()
        elif run.status == RunStatus.CANCELLED:
            return run, self._cancelled(name)
        elif self.options.priority is not None and self.options.priority != run.priority:
            run.priority = self.options.priority  # given again: the run's priority changes
            session.flush()
        return run, None

    def _lock_run(self, session: Session, run: Run) -> None:
        """Locks the run's row until the commit, and refuses the produce if the run was
        cancelled meanwhile; a run that finished meanwhile (or before) is active again if
        this produce adds jobs to it (with none, nothing would ever end it again).

        Called once the jobs are merged, just before the commit. Without the lock, a `run
        cancel` committing while the catalogue streamed would be missed: the pending jobs
        written here would be committed into a cancelled run (the jobs' foreign key takes
        only a key-share lock, which a status update does not wait for). With it, a cancel
        that committed first refuses the produce (nothing is written), and one that comes
        later waits for the commit, then cancels these jobs as well; likewise a worker
        ending the run's last earlier job cannot mark it finished past the jobs added here.
        Taken here rather than when the run is first read: the workers lock the same row
        (FOR NO KEY UPDATE, db.run_locks) whenever one of the run's jobs ends, and would
        wait for as long as the catalogue takes to read. FOR NO KEY UPDATE too, as the row
        may be updated here. SQLite ignores the lock (it has one writer at a time).
        """
        lock_loaded_run(session, run)
        if run.status == RunStatus.CANCELLED:
            raise self._cancelled(run.name)
        if run.status == RunStatus.FINISHED and self.report.jobs_new:
            run.status = RunStatus.ACTIVE  # more jobs for a run that had finished
            run.finished_at = None
            session.flush()

    def _cancelled(self, name: str) -> InputError:
        return InputError(
            self.label, None, None, f"run {name!r} was cancelled; choose another --run name"
        )

    # --- catalogue images ------------------------------------------------------------------

    def _stage_inputs(self, session: Session) -> None:
        """Stages every image the catalogue's rows name for templates that take one.

        A pass of its own before the jobs are expanded: staging uses the session, which the
        job writer then has to itself.
        """
        plans = [plan for plan in self.plans if plan.images]
        if not plans:
            return
        self._refuse_an_explosion_before_fetching()
        settings = self.settings if self.settings is not None else get_settings()
        with InputStager(
            session, settings, refetch=self.options.force, storage=self.storage
        ) as stager:
            stager.stage(self._addresses(plans))
        self.inputs = stager.results
        self.report.inputs = len(stager.results)
        self.report.inputs_fetched = stager.counts.fetched
        self.report.inputs_reused = stager.counts.reused
        self.report.inputs_failed = stager.counts.failed

    def _refuse_an_explosion_before_fetching(self) -> None:
        """Raises ExpansionLimitError if the catalogue expands to more than ``--max-jobs``
        jobs, counted as a dry run does (every image taken as good, none fetched).

        A template that matches far more rows than meant would otherwise download all their
        images (hours, for a large catalogue) before the expansion refuses it.
        """
        report, progress = self.report, self.progress
        self.report = ProduceReport(run_name=report.run_name, dry_run=True)
        self.progress = None  # a quick pass: the terminal shows the staging and the expansion
        try:
            for _item in self.expand():
                pass
        except ExpansionLimitError as exc:
            raise ExpansionLimitError(
                exc.path, exc.line, exc.field, f"{exc.reason} (counted before fetching images)"
            ) from None
        finally:
            self.report, self.progress = report, progress
            self.dry_run_addresses.clear()

    def _addresses(self, plans: list[_Plan]) -> Iterable[str]:
        """The image addresses of the rows the templates apply to (with repeats).

        Rows that are bad for another reason are left to the expansion to report.
        """
        rows = 0
        for row in self.source.rows():
            rows += 1
            if self.progress is not None and rows % 100 == 0:
                self.progress(rows, 0)
            if row.problem is not None:
                continue
            for plan in plans:
                try:
                    if not plan.template.applies_to(row.fields, where=""):
                        continue
                except RenderError:
                    continue
                for column in plan.conditioning.columns():
                    try:
                        yield source_address(row.fields.get(column, ""), self.image_base)
                    except InputImageError:
                        continue

    def _images_for(
        self, plan: _Plan, row: CatalogueRow, key: str
    ) -> tuple[StagedImage, StagedImage | None] | None:
        """The row's staged image (and mask image) for ``plan``; None on a dry run.

        Raises a CatalogueError naming the line, the column and the item when an image is
        missing, failed to stage, or does not suit the template's mask.
        """
        conditioning = plan.conditioning
        assert conditioning.image is not None
        image_address, image = self._staged(row, key, conditioning.image)
        mask = None
        if conditioning.mask_column is not None:
            _mask_address, mask = self._staged(row, key, conditioning.mask_column)
        if image is None:
            return None  # a dry run: nothing was fetched, so nothing more to check
        if conditioning.mask_from_alpha and not image.has_alpha:
            raise CatalogueError(
                self.label,
                row.line,
                conditioning.image,
                f"item {key!r}: template {plan.template.name!r}: mask 'alpha' needs an image "
                f"with an alpha channel, and {image_address} has none (mode {image.mode})",
            )
        if mask is not None and (mask.width, mask.height) != (image.width, image.height):
            raise CatalogueError(
                self.label,
                row.line,
                conditioning.mask_column,
                f"item {key!r}: mask {mask.width}x{mask.height} does not match image "
                f"{image.width}x{image.height}",
            )
        return image, mask

    def _staged(self, row: CatalogueRow, key: str, column: str) -> tuple[str, StagedImage | None]:
        try:
            address = source_address(row.fields.get(column, ""), self.image_base)
        except InputImageError as exc:
            raise CatalogueError(
                self.label, row.line, column, f"item {key!r}: {exc.reason}"
            ) from None
        if self.inputs is None:
            self.dry_run_addresses.add(address)
            return address, None
        result = self.inputs.get(address)
        if result is None:
            # _addresses() yields every address expand() can reach; this is a bug guard.
            raise CatalogueError(
                self.label, row.line, column, f"item {key!r}: {address}: was not staged"
            )
        if isinstance(result, InputImageError):
            raise CatalogueError(
                self.label, row.line, column, f"item {key!r}: {address}: {result.reason}"
            )
        return address, result

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
        if len(key) > ITEM_KEY_LENGTH:
            raise CatalogueError(
                self.label,
                row.line,
                key_column,
                f"item key {_shorten(key)!r} is {len(key)} characters; "
                f"the database holds at most {ITEM_KEY_LENGTH}",
            )
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
        for plan in self.plans:
            template = plan.template
            try:
                if not template.applies_to(row.fields, where=where):
                    continue
                prompts = template.expand_prompts(row.fields, where=where)
            except RenderError as exc:
                raise CatalogueError(
                    self.label, row.line, exc.field, f"template {template.name!r}: {exc.reason}"
                ) from exc
            if plan.label_problem is not None:
                raise CatalogueError(
                    self.label, row.line, None, f"template {template.name!r}: {plan.label_problem}"
                )
            shapes, tail = plan.shapes, plan.tail
            if plan.images:
                staged = self._images_for(plan, row, key)
                if staged is not None:
                    shapes, tail = plan.for_images(*staged)
            for variant, shape, (prompt, negative) in zip(
                plan.variants, shapes, prompts, strict=True
            ):
                self._check_prompt(row, variant, key, prompt, negative)
                seeds = ",".join(map(str, variant.sweep.seeds(seed_state)))
                digest = variant.settings_state.copy()
                # The rest of dedupe_key()'s parts: prompt, negative prompt, seeds, then the
                # salt and conditioning_parts() in the tail.
                rest = f"{len(prompt)}:{prompt}{len(negative)}:{negative}{len(seeds)}:{seeds}"
                digest.update(f"{rest}{tail}".encode())
                jobs.append((shape, prompt, negative, f"[{seeds}]", digest.hexdigest()))
                images += variant.sweep.count
        return jobs, images

    def _check_prompt(
        self, row: CatalogueRow, variant: _Variant, key: str, prompt: str, negative: str
    ) -> None:
        template = variant.template
        # The row's fields were checked as they were read (producer.catalogue): what the
        # database cannot store here came from the template or a wildcard file.
        if (reason := unstorable(prompt) or unstorable(negative)) is not None:
            raise CatalogueError(
                self.label,
                row.line,
                None,
                f"template {template.name!r}: the prompt of item {key!r} {reason}",
            )
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
