"""Templates for SD3 and FLUX.1 models: FLUX's true CFG in the job's options and dedupe key, and
the family rules (pixelmill.families) refusing at load, with the file, line and field, a
template whose model is a diffusers folder here that cannot render it; `pixelmill produce`
then writes nothing. Models that cannot be read here are left to the worker."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from cli.common import EXIT_REFUSED
from cli.main import app
from db.models import CatalogueItem, Job, Run
from producer.produce import produce
from producer.templates import TemplateError, load_templates
from producer.templates.model import Template


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each family's pipeline class, as a diffusers folder's files name it: model_index.json
    and the transformer's and VAE's configs are all the producer reads (the worker's tests
    load the tiny folders themselves, tests/worker/test_tiny_families.py)."""
    root = tmp_path_factory.mktemp("family-models")
    folders = {}
    for arch, pipeline, guidance_embeds in (
        ("sd3", "StableDiffusion3Pipeline", None),
        ("flux", "FluxPipeline", True),
        ("flux-schnell", "FluxPipeline", False),
    ):
        folder = root / arch
        (folder / "transformer").mkdir(parents=True)
        (folder / "vae").mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
        transformer = {} if guidance_embeds is None else {"guidance_embeds": guidance_embeds}
        (folder / "transformer" / "config.json").write_text(json.dumps(transformer))
        (folder / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [8] * 4}))
        folders[arch] = str(folder)
    return folders


def write(tmp_path: Path, text: str, models: dict[str, str]) -> Path:
    path = tmp_path / "templates.yaml"
    names = {arch.replace("-", "_"): json.dumps(folder) for arch, folder in models.items()}
    path.write_text(textwrap.dedent(text).format(**names), encoding="utf-8")
    (tmp_path / "linen.safetensors").write_bytes(b"not read: only hashed")
    return path


def load(tmp_path: Path, text: str, models: dict[str, str]) -> dict[str, Template]:
    templates = load_templates(write(tmp_path, text, models)).templates
    return {template.name: template for template in templates}


def load_error(tmp_path: Path, text: str, models: dict[str, str]) -> TemplateError:
    path = write(tmp_path, text, models)
    with pytest.raises(TemplateError) as err:
        load_templates(path)
    assert err.value.path == str(path)
    return err.value


def test_flux_true_cfg_goes_into_the_options_and_the_dedupe_key(
    tmp_path: Path, models: dict[str, str]
) -> None:
    templates = load(
        tmp_path,
        """
        defaults:
          width: 64
          height: 64
          true_cfg: 3
        templates:
          dev:
            prompt: x
            model: {flux}
            negative_prompt: "blurry, text"
            guidance: 3.5
          dev_stronger:
            prompt: x
            model: {flux}
            negative_prompt: "blurry, text"
            guidance: 3.5
            true_cfg: 4.5
          schnell:
            prompt: x
            model: {flux_schnell}
            negative_prompt: "blurry"
            guidance: 0
          plain:
            prompt: x
            model: {flux}
            guidance: 3.5
            true_cfg: null
        """,
        models,
    )
    options = {name: template.conditioning.options for name, template in templates.items()}
    assert options["dev"].true_cfg == 3.0  # from defaults
    assert options["dev_stronger"].true_cfg == 4.5
    assert options["schnell"].true_cfg == 3.0  # schnell takes true CFG, with guidance 0
    assert options["plain"].to_json() is None
    assert options["dev"].canonical() == '{"true_cfg":3.0}'
    assert options["dev_stronger"].canonical() == '{"true_cfg":4.5}'
    assert options["plain"].canonical() == ""  # the plain job's key, as before true CFG


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("1", "must be a number above 1 and at most 50 (1 or less runs no true CFG: leave it out"),
        ("0.5", "must be a number above 1 and at most 50"),
        ("51", "must be a number above 1 and at most 50"),
        ("yes", "must be a number above 1 and at most 50"),
        ("strong", "must be a number above 1 and at most 50"),
    ],
)
def test_bad_true_cfg_names_file_line_and_field(
    tmp_path: Path, models: dict[str, str], value: str, reason: str
) -> None:
    err = load_error(tmp_path, f"templates:\n  a:\n    prompt: x\n    true_cfg: {value}\n", models)
    assert (err.line, err.field) == (4, "templates.a.true_cfg")
    assert err.reason.startswith(reason), err.reason


FLUX_NEGATIVE = (
    "template 'a': FLUX.1 reads a negative prompt only with true CFG (its guidance is distilled "
    "into the model): set true_cfg above 1 to run an unconditional pass per step"
)


@pytest.mark.parametrize(
    ("body", "line", "field", "reason"),
    [
        (
            """
            templates:
              a:
                model: {flux}
                prompt: x
                negative_prompt: "blurry"
            """,
            6,
            "templates.a.negative_prompt",
            FLUX_NEGATIVE,
        ),
        (  # a negative prompt the file's SD templates share, inherited by a FLUX one
            """
            defaults:
              negative_prompt: "blurry"
            templates:
              a:
                model: {flux}
                prompt: x
            """,
            3,
            "defaults.negative_prompt",
            FLUX_NEGATIVE,
        ),
        (
            """
            presets:
              photo: {{negative_prompt: "text"}}
            templates:
              a:
                model: {flux}
                prompt: x
                preset: photo
            """,
            3,
            "presets.photo.negative_prompt",
            FLUX_NEGATIVE,
        ),
        (  # the built-in default guidance (7) is refused at the template's own line
            """
            templates:
              a:
                model: {flux_schnell}
                prompt: x
            """,
            3,
            "templates.a.guidance",
            "template 'a': FLUX.1-schnell takes no guidance (the model has no guidance input), "
            "got 7: set it to 0",
        ),
        (
            """
            templates:
              a:
                model: {flux_schnell}
                prompt: x
                negative_prompt: "blurry"
                true_cfg: 4
                guidance: 3.5
            """,
            8,
            "templates.a.guidance",
            "template 'a': FLUX.1-schnell takes no guidance",
        ),
        (
            """
            templates:
              a:
                model: {sd3}
                prompt: x
                loras: [{{path: linen.safetensors}}]
            """,
            6,
            "templates.a.loras",
            "template 'a': LoRAs and Textual Inversion embeddings work with SD 1.x/2.x and SDXL "
            "models only, not SD3",
        ),
        (
            """
            defaults:
              loras: [{{path: linen.safetensors}}]
            templates:
              a:
                model: {flux}
                prompt: x
                guidance: 3.5
            """,
            3,
            "defaults.loras",
            "template 'a': LoRAs and Textual Inversion embeddings work with SD 1.x/2.x and SDXL "
            "models only, not FLUX.1",
        ),
        (
            """
            templates:
              a:
                model: {sd3}
                prompt: x
                true_cfg: 4
            """,
            6,
            "templates.a.true_cfg",
            "template 'a': true CFG is for FLUX.1 models only; SD3 runs classifier-free "
            "guidance from guidance above 1: leave true_cfg out",
        ),
        (
            """
            templates:
              a:
                model: {sd3}
                prompt: x
                scheduler: euler_a
            """,
            6,
            "templates.a.scheduler",
            "template 'a': SD3 renders with its own flow-matching scheduler",
        ),
        (
            """
            templates:
              a:
                model: {flux}
                prompt: x
                width: 72
            """,
            6,
            "templates.a.width",
            "template 'a': FLUX.1 renders sizes that are multiples of 16, got 72",
        ),
    ],
)
def test_a_template_its_model_cannot_render_is_refused_at_load(
    tmp_path: Path, models: dict[str, str], body: str, line: int, field: str, reason: str
) -> None:
    err = load_error(tmp_path, body, models)
    assert (err.line, err.field) == (line, field), str(err)
    assert err.reason.startswith(reason), err.reason
    assert "\n" not in str(err)


def test_models_that_cannot_be_read_here_are_left_to_the_worker(
    tmp_path: Path, models: dict[str, str]
) -> None:
    """A hub id would need a download, an alias and a missing folder are the worker's: the
    worker checks their jobs, and fails them with the same rule's message."""
    templates = load(
        tmp_path,
        """
        defaults:
          negative_prompt: "blurry"
        templates:
          hub:
            model: black-forest-labs/FLUX.1-schnell
            prompt: x
          alias:
            model: tiny
            prompt: x
            true_cfg: 4
          elsewhere:
            model: /models/not-on-this-machine/flux
            prompt: x
          sd3:
            model: {sd3}
            prompt: x
        """,
        models,
    )
    assert list(templates) == ["hub", "alias", "elsewhere", "sd3"]
    assert templates["sd3"].negative_prompt == "blurry"  # SD3 reads one


def table_counts(session: Session) -> dict[str, int]:
    return {
        model.__tablename__: session.scalar(select(func.count()).select_from(model)) or 0
        for model in (Run, CatalogueItem, Job)
    }


BAD_FLUX = """\
key: sku
templates:
  studio:
    model: {flux}
    prompt: "{{{{ title }}}} on a table"
    negative_prompt: "blurry"
    guidance: 3.5
    width: 64
    height: 64
"""


def test_produce_refuses_the_template_and_writes_nothing(
    tmp_path: Path, db_session: Session, models: dict[str, str]
) -> None:
    catalogue = tmp_path / "catalogue.csv"
    catalogue.write_text("sku,title\nA1,mug\n", encoding="utf-8")
    templates = write(tmp_path, BAD_FLUX, models)
    before = table_counts(db_session)
    with pytest.raises(TemplateError) as err:
        produce(db_session, catalogue_path=catalogue, templates_path=templates, run_name="bad")
    assert str(err.value).startswith(
        f"{templates}:6: field 'templates.studio.negative_prompt': template 'studio': FLUX.1 "
        "reads a negative prompt only with true CFG"
    )
    assert table_counts(db_session) == before


def test_a_template_without_a_model_is_checked_against_produces_default_model(
    tmp_path: Path, db_session: Session, models: dict[str, str]
) -> None:
    catalogue = tmp_path / "catalogue.csv"
    catalogue.write_text("sku,title\nA1,mug\n", encoding="utf-8")
    no_model = BAD_FLUX.replace("    model: {flux}\n", "")
    templates = write(tmp_path, no_model, models)
    before = table_counts(db_session)
    with pytest.raises(TemplateError) as err:
        produce(
            db_session,
            catalogue_path=catalogue,
            templates_path=templates,
            run_name="bad",
            default_model=models["flux"],
        )
    assert (err.value.line, err.value.field) == (5, "templates.studio.negative_prompt")
    assert err.value.reason.startswith("template 'studio': FLUX.1 reads a negative prompt")
    assert err.value.reason.endswith(
        f"(the template names no model: it renders with {models['flux']})"
    )
    assert table_counts(db_session) == before
    # The same file with an SD3 default model is fine: SD3 reads a negative prompt.
    report = produce(
        db_session,
        catalogue_path=catalogue,
        templates_path=templates,
        run_name="good",
        default_model=models["sd3"],
    )
    assert report.jobs_new == 1


def test_the_cli_reports_it_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, models: dict[str, str]
) -> None:
    for name in ("DATABASE_URL", "BROKER_URL", "STORAGE", "MODEL", "BLOCKLIST_PATH"):
        monkeypatch.delenv(f"PIXELMILL_{name}", raising=False)
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(app, ["db", "upgrade"]).exit_code == 0
    (tmp_path / "catalogue.csv").write_text("sku,title\nA1,mug\n", encoding="utf-8")
    write(tmp_path, BAD_FLUX, models)
    result = CliRunner().invoke(
        app, ["produce", "catalogue.csv", "--template", "templates.yaml", "--no-dispatch"]
    )
    assert result.exit_code == EXIT_REFUSED, result.output
    output = " ".join(result.output.split())  # rich may break long lines
    assert "templates.yaml:6: field 'templates.studio.negative_prompt': template 'studio'" in (
        output
    )
    assert "Traceback" not in result.output
