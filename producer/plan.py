"""What a produce is asked for, and what the jobs of each template variant share.

A bulk run makes a job per row and variant, so everything that does not depend on the row is
worked out here, once per produce (:class:`VariantPlan`, :class:`TemplatePlan`); the
expansion (:mod:`producer.expansion`) then adds each row's prompts, seeds and images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace

from db.limits import string_length, unstorable
from db.models import Job
from pixelmill.blocklist import Blocklist
from pixelmill.errors import BadInputError
from pixelmill.identity import conditioning_parts, length_prefixed, settings_parts
from pixelmill.seeds import SweepPlan
from producer import bounds
from producer.input_images import StagedImage
from producer.staging import JobShape
from producer.templates import Template, TemplateFile
from producer.tokens import TokenCounter

# Sweep size when neither the command line nor the template gives one.
DEFAULT_SEEDS = 4
# A typo in a variant or a template matching every row can explode into millions of jobs.
DEFAULT_MAX_JOBS = 100_000

# The jobs table's column for a variant's label (see db.limits).
VARIANT_LABEL_LENGTH = string_length(Job.__table__.c.variant)


@dataclass(frozen=True)
class ProduceOptions:
    seeds: int | None = None
    # A budget instead of a fixed sweep (producer.budget): the run's images in all, or the
    # keepers wanted per item; seeds then go to each template variant by its keep rate.
    budget: int | None = None
    keepers_per_item: int | None = None
    default_model: str = "tiny"
    run_name: str | None = None
    strict: bool = False
    max_jobs: int = DEFAULT_MAX_JOBS
    dry_run: bool = False
    force: bool = False
    # None: a new run gets 0, an existing run keeps its own.
    priority: int | None = None
    blocklist: Blocklist | None = None

    def __post_init__(self) -> None:
        """The template file's bounds hold for the options too (producer.bounds)."""
        given = [
            name
            for name, value in (
                ("--seeds", self.seeds),
                ("--budget", self.budget),
                ("--keepers-per-item", self.keepers_per_item),
            )
            if value is not None
        ]
        if len(given) > 1:
            raise BadInputError(f"give one of {', '.join(given)}, not both")
        for name, value, bound in (
            ("--seeds", self.seeds, bounds.SEEDS),
            ("--budget", self.budget, bounds.BUDGET),
            ("--keepers-per-item", self.keepers_per_item, bounds.KEEPERS_PER_ITEM),
            ("--max-jobs", self.max_jobs, bounds.MAX_JOBS),
            ("--priority", self.priority, bounds.PRIORITY),
        ):
            if value is not None:
                bound.check(value, name)


class VariantPlan:
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
        # The row keeps every choice; only the dedupe key leaves out the exact ones.
        options = template.conditioning.options.stored()
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
                f"variant label {shorten(variant)!r} is {len(variant)} characters; "
                f"the jobs table holds at most {VARIANT_LABEL_LENGTH}"
            )
        elif (reason := unstorable(variant)) is not None:
            self.label_problem = f"variant label {shorten(variant)!r} {reason}"


def shorten(value: str, length: int = 60) -> str:
    """``value`` cut for an error message (a too long value is not repeated in full)."""
    return value if len(value) <= length else f"{value[:length]}..."


class TemplatePlan:
    """One template's variants, and what its jobs' dedupe keys add after the prompt parts."""

    def __init__(self, template: Template, variants: list[VariantPlan], force_salt: str) -> None:
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


def plan_templates(
    templates: TemplateFile,
    options: ProduceOptions,
    force_salt: str,
    seeds_per_arm: Mapping[tuple[str, str], int] | None = None,
) -> list[TemplatePlan]:
    """Every template's plan, in the file's order; a model's token counter is loaded once.

    ``seeds_per_arm``: the sweep of each (template, variant) a budget allocated; the seeds
    are derived as always, so seed i is the same whatever the sweep's length."""
    counters: dict[str, TokenCounter] = {}
    plans = []
    for template in templates.templates:
        model = template.model or options.default_model
        counter = counters.get(model)
        if counter is None:
            counter = counters[model] = TokenCounter.for_model(model)
        count = options.seeds or template.seeds or DEFAULT_SEEDS
        variants = [
            VariantPlan(
                template,
                label,
                model=model,
                seeds=count if seeds_per_arm is None else seeds_per_arm[(template.name, label)],
                token_counter=counter,
            )
            for label in template.variants()
        ]
        plans.append(TemplatePlan(template, variants, force_salt))
    return plans
