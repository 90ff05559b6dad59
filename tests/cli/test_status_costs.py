"""`pixelmill status`: what a run's keepers cost (tests/cost_rows.py has the figures), read from
Postgres by the report and printed by the command."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from cli import common
from cli.main import app
from db.session import make_engine, make_sessionmaker
from monitoring.status import run_status
from tests.cost_rows import REVIEWER_SECONDS, make_costed_run


def test_the_report_holds_the_costs_and_the_live_view_skips_them(db_session: Session) -> None:
    made = make_costed_run(db_session)
    report = run_status(db_session, made.run)
    assert report.costs is not None
    total = report.costs.total
    assert (total.images, total.kept, total.auto_rejected) == (7, 3, 1)
    assert total.gpu_seconds_per_keeper == pytest.approx(22 / 3)
    assert total.reviewer_seconds == pytest.approx(REVIEWER_SECONDS)
    assert (total.skipped_seeds, total.gpu_seconds_saved) == (5, pytest.approx(24.0))
    assert report.costs.variants[("outdoor", "dusk")].gpu_seconds_per_image == 4.0
    # Polled every few seconds by --watch: the progress bar needs no costs.
    assert run_status(db_session, made.run, max_failures=0, costs=False).costs is None


def test_status_prints_the_cost_per_keeper(
    fresh_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(fresh_database_url)
    with make_sessionmaker(engine)() as session:
        make_costed_run(session)
        session.commit()
    engine.dispose()
    monkeypatch.setenv("PIXELMILL_DATABASE_URL", fresh_database_url)
    monkeypatch.setattr(common.console, "width", 200)  # the table's columns unwrapped

    result = CliRunner().invoke(app, ["status", "costed"])

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any("cost per keeper" in line for line in lines)

    def cells(marker: str) -> list[str]:
        line = next(line for line in lines if marker in line)
        return line.split()

    dusk = cells("dusk")
    # images, kept, auto-rejected, GPU-s/image, GPU-s/keeper, review-s/keeper, recall, saved
    assert dusk[-8:] == ["2", "1", "0", "4.00", "8.00", "55.00", "100%", "24.0"]
    run_row = cells("(run)")
    assert run_row[-8:] == ["7", "3", "1", "3.14", "7.33", "140.00", "100%", "24.0"]
    assert "5 seeds skipped, 24.0 GPU-seconds saved" in result.output
    assert "capped at 5 min" in result.output

    # In a terminal of 80 columns the table fits: names wrap, nothing ends in an ellipsis.
    monkeypatch.setattr(common.console, "width", 80)
    narrow = CliRunner().invoke(app, ["status", "costed"])
    assert narrow.exit_code == 0, narrow.output
    table = narrow.output[narrow.output.index("cost per keeper") : narrow.output.index("GPU-sec")]
    assert "…" not in table
    assert all(len(line) <= 80 for line in table.splitlines())
