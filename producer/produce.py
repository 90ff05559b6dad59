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

Nothing to do is not a run: a catalogue with no rows, every row refused, no template
applying, or (for a new run) every job made already, by an earlier or a concurrent produce,
raises :class:`~producer.report.NothingToProduceError` and writes nothing: a run with no jobs
would stay active forever. A bad row otherwise is skipped and listed in the report.

A budget (``budget``: images in all, or ``keepers_per_item``) instead of ``seeds`` gives each
template variant the sweep its keep rate on earlier runs of the same source earns
(:mod:`producer.budget`).

Templates that start from the catalogue's images (img2img, inpaint, controlnet) have their
images staged first, in a pass of their own over the catalogue (:mod:`producer.input_images`,
in the same transaction); the jobs then refer to the staged images by content hash, and an
image that cannot be fetched or decoded makes its item a bad row.

The pieces: :mod:`producer.plan` (what each template variant's jobs share),
:mod:`producer.expansion` (the pass over the catalogue), :mod:`producer.row_images` (the
rows' staged images) and :mod:`producer.report` (what the produce reports); this module
runs them in one transaction.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.limits import string_length, unstorable
from db.models import CatalogueItem, Run, RunStatus
from db.run_locks import lock_loaded_run
from pixelmill.blocklist import Blocklist
from pixelmill.errors import InputError
from pixelmill.settings import Settings, get_settings
from pixelmill.storage import Storage
from producer.budget import spend_budget
from producer.catalogue import CatalogueSource, open_catalogue
from producer.expansion import Expansion
from producer.input_images import InputStager
from producer.plan import DEFAULT_MAX_JOBS, ProduceOptions, TemplatePlan, plan_templates, shorten
from producer.report import (
    ExpansionLimitError,
    NothingToProduceError,
    ProduceReport,
    Progress,
    StrictModeError,
)
from producer.row_images import RowImages, StagedImages, image_addresses, image_base
from producer.staging import open_staging
from producer.templates import TemplateFile, load_templates

# Lengths of the columns the producer fills from its inputs (see db.limits).
RUN_NAME_LENGTH = string_length(Run.__table__.c.name)
SOURCE_NAME_LENGTH = string_length(CatalogueItem.__table__.c.source)


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
    budget: int | None = None,
    keepers_per_item: int | None = None,
    default_model: str = "tiny",
    run_name: str | None = None,
    encoding: str | None = None,
    delimiter: str | None = None,
    table: str | None = None,
    query: str | None = None,
    sheet: str | None = None,
    format: str | None = None,
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
    """Validate the catalogue and write a run's jobs (commits on success); what is refused
    and why is in the module's docstring. ``dry_run`` writes nothing, fetches no image and
    needs no session (given one, it reads the keep rates a budget allocates by).
    ``settings`` (default: from the environment) and ``storage`` (default: the settings')
    serve templates with an image column, to fetch and store their images."""
    # The options check their bounds (producer.bounds) before any file is read.
    options = ProduceOptions(
        seeds=seeds,
        budget=budget,
        keepers_per_item=keepers_per_item,
        default_model=default_model,
        run_name=run_name or default_run_name(catalogue_path),
        strict=strict,
        max_jobs=max_jobs,
        dry_run=dry_run,
        force=force,
        priority=priority,
        blocklist=blocklist,
    )
    templates = load_templates(templates_path, default_model=default_model)
    source = open_catalogue(
        str(catalogue_path),
        encoding=encoding,
        delimiter=delimiter,
        table=table,
        query=query,
        sheet=sheet,
        format=format,
        key=templates.key,
    )
    producer = Producer(source, templates, options, progress, settings=settings, storage=storage)
    return producer.run(session)


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
        # Negative prompts that fit CLIP's window, shared by every pass over the catalogue.
        self.fitting_negatives: set[str] = set()
        # --force: a salt unique to this produce, so its jobs never match earlier ones.
        self.force_salt = (
            f"force:{options.run_name}:{datetime.now(UTC).isoformat()}" if options.force else ""
        )
        self._require_columns()
        self.plans = plan_templates(templates, options, self.force_salt)
        self.image_base = image_base(source)
        # Address -> staged image or why it failed; None until staged (and on a dry run).
        self.inputs: StagedImages | None = None
        # Whether this produce makes its run (rather than adding jobs to an existing one).
        self.run_created = False

    def _require_columns(self) -> None:
        source, templates = self.source, self.templates
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
                    f"{what} {shorten(name)!r} is {len(name)} characters; "
                    f"the database holds at most {length}",
                )
            if (reason := unstorable(name)) is not None:
                raise InputError(self.label, None, None, f"{what} {shorten(name)!r} {reason}")

    def _expansion(
        self, report: ProduceReport, progress: Progress | None, images: RowImages
    ) -> Expansion:
        return Expansion(
            self.source,
            self.templates.key,
            self.plans,
            self.options,
            report=report,
            progress=progress,
            images=images,
            fitting_negatives=self.fitting_negatives,
        )

    def run(self, session: Session | None) -> ProduceReport:
        if self.options.dry_run:
            self._spend_budget(session)
            images = RowImages(self.label, self.image_base, None)
            for _item in self._expansion(self.report, self.progress, images).items():
                pass
            self.report.inputs = len(images.addresses)
            self._refuse_nothing_to_do()
            return self.report
        if session is None:
            raise ValueError("a database session is needed unless dry_run is set")
        try:
            self._spend_budget(session)
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
        images = RowImages(self.label, self.image_base, self.inputs)
        try:
            for item in self._expansion(self.report, self.progress, images).items():
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
            self._refuse_nothing_to_do()
            assert staging is not None
            self.report.jobs_new = staging.finish()
            if self.report.jobs_new == 0 and self.run_created:
                self.report.jobs_unchanged = self.report.jobs
                raise NothingToProduceError(
                    self.label,
                    f"all {self.report.jobs:,} jobs were made already, by earlier runs or a "
                    "produce at the same time (--force renders them again)",
                    self.report,
                )
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
        self.run_created = run is None
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

    def _refuse_nothing_to_do(self) -> None:
        """Raises NothingToProduceError when the catalogue gave no job at all: a run with
        none would stay active forever, and the reason is worth an exit status of its own."""
        report = self.report
        if report.jobs:
            return
        if report.rows == 0:
            reason = "the catalogue has no rows (a header alone)"
            if self.source.columns is None or self.label.startswith("sql:"):
                reason = "the catalogue has no rows"
        elif report.items == 0:
            reason = f"every row was refused ({report.rows_skipped:,} bad rows)"
        else:
            reason = f"no template applies to any of the {report.items:,} items"
        raise NothingToProduceError(self.label, reason, report)

    # --- the budget --------------------------------------------------------------------------

    def _spend_budget(self, session: Session | None) -> None:
        """With ``--budget`` or ``--keepers-per-item``: the plans' sweeps become the seeds the
        keep rates on earlier runs of this source allocate (none known: an even split)."""
        options = self.options
        if options.budget is None and options.keepers_per_item is None:
            return
        items = 0
        if options.budget is not None:
            counting = self._counting_pass()
            items = counting.items - counting.items_without_jobs
        arms = [(plan.template.name, v.shape.variant) for plan in self.plans for v in plan.variants]
        self.report.budget, seeds = spend_budget(
            session,
            arms,
            source=self.source.name,
            budget=options.budget,
            keepers_per_item=options.keepers_per_item,
            items=items,
            seed_text=options.run_name or "",
        )
        self.plans = plan_templates(self.templates, options, self.force_salt, seeds)
        planned = items * self.report.budget.per_item
        if options.budget is not None and planned > options.budget:
            # Every template variant keeps at least one seed per item (none starves).
            self.report.add_warning(
                InputError(
                    self.label,
                    None,
                    None,
                    f"--budget {options.budget:,} is less than one seed for each of the "
                    f"{items:,} items' {len(arms)} template variants: up to {planned:,} "
                    "images are planned",
                )
            )

    def _counting_pass(self) -> ProduceReport:
        """The items and jobs of the catalogue, counted as a dry run does (every image taken
        as good, none fetched)."""
        counting = ProduceReport(run_name=self.report.run_name, dry_run=True)
        expansion = self._expansion(counting, None, RowImages(self.label, self.image_base, None))
        for _item in expansion.items():
            pass
        return counting

    # --- catalogue images ------------------------------------------------------------------

    def _stage_inputs(self, session: Session) -> None:
        """Stages every image the catalogue's rows name for templates that take one.

        A pass of its own before the jobs are expanded: staging uses the session, which the
        job writer then has to itself.
        """
        plans: list[TemplatePlan] = [plan for plan in self.plans if plan.images]
        if not plans:
            return
        self._refuse_an_explosion_before_fetching()
        settings = self.settings if self.settings is not None else get_settings()
        with InputStager(
            session, settings, refetch=self.options.force, storage=self.storage
        ) as stager:
            stager.stage(image_addresses(self.source, plans, self.image_base, self.progress))
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
        try:
            # A quick pass: the terminal shows the staging and the expansion.
            self._counting_pass()
        except ExpansionLimitError as exc:
            raise ExpansionLimitError(
                exc.path, exc.line, exc.field, f"{exc.reason} (counted before fetching images)"
            ) from None
