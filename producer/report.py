"""What a produce reports: its counts, its bad rows and warnings, and why it was refused."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pixelmill.errors import InputError

# How many problems and warnings a report keeps in full (the rest are counted).
KEEP_PROBLEMS = 200


class ExpansionLimitError(InputError):
    """The catalogue would expand into more jobs than allowed."""


class StrictModeError(InputError):
    """``strict`` was asked for and some rows were bad; ``problems`` lists them."""

    def __init__(self, path: str, problems: list[InputError], total: int) -> None:
        self.problems = problems
        self.total = total
        super().__init__(path, None, None, f"{total} bad rows; nothing was written (--strict)")


@dataclass(frozen=True)
class ArmSeeds:
    """The seeds per item a budget gave one template variant, and the keep rate (the
    posterior mean) it was given them by."""

    template: str
    variant: str
    seeds: int
    keep_rate: float
    kept: int
    decided: int


@dataclass(frozen=True)
class BudgetReport:
    """How a budget (``--budget`` or ``--keepers-per-item``) was spent."""

    asked: str  # the option as given, such as "--budget 1000"
    per_item: int  # seeds per item, over every template variant
    arms: list[ArmSeeds]
    source: str  # the catalogue source whose earlier runs' decisions were read


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
    budget: BudgetReport | None = None

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


class NothingToProduceError(InputError):
    """The produce would make no new job: no run is written. ``report`` says what was read
    (its bad rows, if every row was refused)."""

    def __init__(self, path: str, reason: str, report: ProduceReport) -> None:
        self.report = report
        super().__init__(path, None, None, f"nothing to produce: {reason}; no run was written")


# Called with (rows read, jobs expanded) as the catalogue streams: a progress bar hooks in here.
Progress = Callable[[int, int], None]
