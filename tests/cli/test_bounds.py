"""One set of bounds: the command line's options obey the template file's (producer.bounds),
and the producer's own arguments do too."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from pixelmill.errors import BadInputError
from producer import bounds
from producer.produce import produce
from producer.templates import TemplateError, load_templates

TEMPLATES = """key: sku
defaults: {{width: 64, height: 64, {setting}}}
templates:
  studio:
    prompt: "photo of a {{{{ title }}}}"
"""


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("DATABASE_URL", "BROKER_URL", "STORAGE", "MODEL", "BLOCKLIST_PATH"):
        monkeypatch.delenv(f"PIXELMILL_{name}", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cat.csv").write_text("sku,title\nA,mug\n")
    (tmp_path / "templates.yaml").write_text(TEMPLATES.format(setting="seeds: 2"))
    assert invoke("db", "upgrade")[0] == 0
    return tmp_path


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), prog_name="pixelmill")
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, " ".join(result.output.split())


@pytest.mark.parametrize(
    ("setting", "bound"),
    [
        ("seeds", bounds.SEEDS),
        ("steps", bounds.STEPS),
        ("max_variants", bounds.MAX_VARIANTS),
    ],
)
def test_the_template_file_refuses_past_the_bound(
    tmp_path: Path, setting: str, bound: bounds.Bound
) -> None:
    path = tmp_path / "templates.yaml"
    path.write_text(TEMPLATES.format(setting=f"{setting}: {bound.high}"))
    load_templates(path)
    for value in (bound.low - 1, bound.high + 1):
        path.write_text(TEMPLATES.format(setting=f"{setting}: {value}"))
        with pytest.raises(TemplateError, match=f"in {bound.low}..{bound.high}"):
            load_templates(path)


@pytest.mark.parametrize(
    ("option", "bound"),
    [
        ("--seeds", bounds.SEEDS),
        ("--max-jobs", bounds.MAX_JOBS),
        ("--priority", bounds.PRIORITY),
        ("--budget", bounds.BUDGET),
        ("--keepers-per-item", bounds.KEEPERS_PER_ITEM),
    ],
)
def test_the_command_line_obeys_the_same_bounds(
    workdir: Path, option: str, bound: bounds.Bound
) -> None:
    for value in (bound.low - 1, bound.high + 1):
        code, out = invoke("produce", "cat.csv", "-t", "templates.yaml", option, str(value))
        assert code == 2, out
        assert f"pixelmill produce: Invalid value for '{option}'" in out
        assert len(out.splitlines()) == 1
    code, out = invoke(
        "produce", "cat.csv", "-t", "templates.yaml", "--dry-run", option, str(bound.high)
    )
    assert code == 0, out


def test_seeds_1000000_plans_nothing(workdir: Path) -> None:
    code, out = invoke("produce", "cat.csv", "-t", "templates.yaml", "--seeds", "1000000")
    assert code == 2
    assert "less than or equal to 1000" in out or "1<=x<=1000" in out


@pytest.mark.parametrize(
    ("option", "value"),
    [("seeds", 1001), ("seeds", 0), ("max_jobs", 0), ("priority", 10**9)],
)
def test_the_producer_s_arguments_obey_them_too(workdir: Path, option: str, value: int) -> None:
    with pytest.raises(BadInputError, match="must be an integer in"):
        produce(
            None,
            catalogue_path=workdir / "cat.csv",
            templates_path=workdir / "templates.yaml",
            dry_run=True,
            **{option: value},  # type: ignore[arg-type]
        )


def test_run_priority_obeys_the_bound(workdir: Path) -> None:
    code, out = invoke("run", "priority", "nightly", str(bounds.PRIORITY.high + 1))
    assert code == 2
    assert "Invalid value for 'PRIORITY'" in out or "Invalid value for 'priority'" in out
