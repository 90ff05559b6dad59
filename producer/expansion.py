"""The expansion: one streaming pass over the catalogue, checking every row against every
template that applies and expanding the good rows into job rows.

Bad rows go to the report and the pass goes on (so that every bad row is reported); more
jobs than ``--max-jobs`` stop it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from db.limits import string_length, unstorable
from db.models import CatalogueItem
from pixelmill.errors import InputError
from pixelmill.identity import fields_json
from pixelmill.seeds import item_seed_state
from producer.catalogue import CatalogueError, CatalogueRow, CatalogueSource
from producer.plan import ProduceOptions, TemplatePlan, VariantPlan, shorten
from producer.report import ExpansionLimitError, ProduceReport, Progress
from producer.row_images import RowImages
from producer.staging import StagedJob
from producer.templates import RenderError
from producer.tokens import CLIP_WINDOW

SAMPLES_PER_TEMPLATE = 3
# The catalogue_items column an item's key goes into (see db.limits).
ITEM_KEY_LENGTH = string_length(CatalogueItem.__table__.c.external_key)
# Negative prompts known to fit CLIP's window are not counted again; past this many the
# set starts over, so memory stays bounded.
MAX_FITTING_NEGATIVES = 10_000


@dataclass(frozen=True)
class Item:
    """An accepted catalogue row and its jobs, as :meth:`Expansion.items` yields them."""

    key: str
    fields: dict[str, str]
    fields_json: str
    content_hash: str
    jobs: list[StagedJob]


class Expansion:
    """One pass over ``source``: the good rows' items, the bad rows in ``report``.

    ``fitting_negatives`` (negative prompts that fit CLIP's window) may be shared between
    passes over the same catalogue: it only saves counting a text's tokens again.
    """

    def __init__(
        self,
        source: CatalogueSource,
        key_column: str,
        plans: list[TemplatePlan],
        options: ProduceOptions,
        *,
        report: ProduceReport,
        progress: Progress | None,
        images: RowImages,
        fitting_negatives: set[str],
    ) -> None:
        self.source = source
        self.label = str(source.path)
        self.key_column = key_column
        self.plans = plans
        self.options = options
        self.report = report
        self.progress = progress
        self.images = images
        self.fitting_negatives = fitting_negatives

    def items(self) -> Iterator[Item]:
        """Yields every good row with its jobs; bad rows go to the report."""
        first_line: dict[str, int] = {}
        report = self.report
        for row in self.source.rows():
            report.rows += 1
            try:
                if row.problem is not None:
                    raise row.problem
                key = self._check_key(row, first_line)
                jobs, images = self._jobs_for(row, key)
            except InputError as problem:
                # Keep reading even in strict mode: report every bad row, then write nothing.
                report.add_problem(problem)
                report.rows_skipped += 1
                continue
            self._count(row, jobs, images)
            canonical = fields_json(row.fields)
            item_hash = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
            yield Item(key, row.fields, canonical, item_hash, jobs)
        if self.progress is not None:
            self.progress(report.rows, report.jobs)

    def _count(self, row: CatalogueRow, jobs: list[StagedJob], images: int) -> None:
        """Counts an accepted row's jobs; raises ExpansionLimitError past ``--max-jobs``."""
        report = self.report
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

    def _check_key(self, row: CatalogueRow, first_line: dict[str, int]) -> str:
        key_column = self.key_column
        key = row.fields.get(key_column, "")
        if not key:
            raise CatalogueError(self.label, row.line, key_column, "item key is empty")
        if len(key) > ITEM_KEY_LENGTH:
            raise CatalogueError(
                self.label,
                row.line,
                key_column,
                f"item key {shorten(key)!r} is {len(key)} characters; "
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
                staged = self.images.for_plan(plan, row, key)
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
        self, row: CatalogueRow, variant: VariantPlan, key: str, prompt: str, negative: str
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
        self._warn_over_window(row, variant, key, prompt, negative)
        samples = self.report.samples.setdefault(template.name, [])
        if len(samples) < SAMPLES_PER_TEMPLATE:
            samples.append(prompt)

    def _warn_over_window(
        self, row: CatalogueRow, variant: VariantPlan, key: str, prompt: str, negative: str
    ) -> None:
        """Warns of a prompt longer than CLIP reads (the rest of it has no effect)."""
        counter = variant.token_counter
        for part, text in (("prompt", prompt), ("negative_prompt", negative)):
            if part == "negative_prompt" and text in self.fitting_negatives:
                continue  # negative prompts repeat across jobs: count each text once
            tokens = counter.over_window(text)
            if part == "negative_prompt" and tokens is None:
                if len(self.fitting_negatives) > MAX_FITTING_NEGATIVES:
                    self.fitting_negatives.clear()  # bounded memory
                self.fitting_negatives.add(text)
            if tokens is not None:
                self.report.add_warning(
                    InputError(
                        self.label,
                        row.line,
                        None,
                        f"template {variant.template.name!r}: {part.replace('_', ' ')} of item "
                        f"{key!r} is about {tokens} tokens; CLIP reads the first "
                        f"{CLIP_WINDOW}",
                    )
                )
