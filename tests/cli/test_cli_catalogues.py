"""`pixelmill produce` on spreadsheets and Shopify exports, with nothing to do, and with a
budget; the demo's run names. In process, on a SQLite database of the test's own."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.demo import default_demo_run
from cli.main import app
from tests.producer.spreadsheets import write_xlsx
from tests.producer.test_shopify import export

TEMPLATES = """key: {key}
defaults: {{steps: 2, width: 64, height: 64, seeds: 2}}
templates:
  studio:
    prompt: "photo of a {{{{ {field} }}}}, {{white|grey}} background"
"""


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("DATABASE_URL", "BROKER_URL", "STORAGE", "MODEL", "BLOCKLIST_PATH"):
        monkeypatch.delenv(f"PIXELMILL_{name}", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "templates.yaml").write_text(TEMPLATES.format(key="sku", field="title"))
    assert invoke("db", "upgrade")[0] == 0
    return tmp_path


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), prog_name="pixelmill")
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, " ".join(result.output.split())


def produce(catalogue: str, *args: str) -> tuple[int, str]:
    return invoke("produce", catalogue, "--template", "templates.yaml", "--no-dispatch", *args)


def runs(workdir: Path) -> list[str]:
    with sqlite3.connect(workdir / "var" / "pixelmill.db") as db:
        return [row[0] for row in db.execute("SELECT name FROM runs ORDER BY id")]


def test_a_spreadsheet_with_its_sheet(workdir: Path) -> None:
    sheets = [("Notes", [["x"], ["y"]]), ("Products", [["sku", "title"], ["A", "mug"]])]
    write_xlsx(workdir / "cat.xlsx", sheets)  # type: ignore[arg-type]

    code, out = produce("cat.xlsx", "--sheet", "Products", "--run", "sheet")

    assert code == 0, out
    assert "1 rows, 1 items, 0 rows skipped; 2 new jobs" in out
    code, out = produce("cat.xlsx", "--sheet", "Prices")
    assert code == 2 and "no sheet 'Prices' (sheets: Notes, Products)" in out


def test_a_shopify_export_by_variant(workdir: Path) -> None:
    (workdir / "products_export.csv").write_text(export())
    (workdir / "templates.yaml").write_text(TEMPLATES.format(key="Variant SKU", field="Title"))

    code, out = produce("products_export.csv", "--run", "shop")

    assert code == 0, out
    assert "6 rows, 6 items, 0 rows skipped; 12 new jobs" in out


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("sku,title\n", "the catalogue has no rows (a header alone)"),
        ("sku,title\nA,\nB,\n", "every row was refused (2 bad rows)"),
    ],
)
def test_nothing_to_do_exits_2_and_writes_no_run(workdir: Path, content: str, reason: str) -> None:
    (workdir / "cat.csv").write_text(content)

    for extra in ((), ("--dry-run",)):
        code, out = produce("cat.csv", *extra)
        assert code == 2, out
        assert f"error: cat.csv: nothing to produce: {reason}; no run was written" in out
    assert runs(workdir) == []


def test_every_job_made_already_exits_2(workdir: Path) -> None:
    (workdir / "cat.csv").write_text("sku,title\nA,mug\n")
    assert produce("cat.csv", "--run", "first")[0] == 0

    code, out = produce("cat.csv", "--run", "second")

    assert code == 2, out
    assert "nothing to produce: all 2 jobs were made already" in out
    assert runs(workdir) == ["first"]
    # Into the same run again: nothing new, and no error.
    assert produce("cat.csv", "--run", "first")[0] == 0


def test_a_budget_shows_its_allocation(workdir: Path) -> None:
    (workdir / "cat.csv").write_text("sku,title\n" + "".join(f"S{n},item {n}\n" for n in range(5)))

    code, out = produce("cat.csv", "--budget", "50", "--dry-run")

    assert code == 0, out
    assert "--budget 50: 10 seeds per item over 2 template variants" in out
    assert "by keep rate on earlier runs of cat.csv" in out
    assert "studio [white]:" in out and "studio [grey]:" in out
    assert "keep rate 0.50 (no decisions yet: the prior's)" in out
    assert "50 images" in out

    code, out = produce("cat.csv", "--keepers-per-item", "2", "--run", "kept")
    assert code == 0, out
    assert "--keepers-per-item 2: 4 seeds per item" in out
    assert "20 images planned" in out


def test_demo_runs_are_named_after_their_catalogue_and_templates() -> None:
    names = {
        default_demo_run(
            Path(folder), Path(folder, "catalogue.csv"), Path(folder, "templates.yaml")
        )
        for folder in ("examples", "examples/product-scenes")
    }
    assert len(names) == 2
    assert {name.rsplit("-", 2)[0] for name in names} == {
        "examples-catalogue-templates",
        "product-scenes-catalogue-templates",
    }
