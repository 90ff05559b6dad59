"""`pixelmill export RUN --channel ... --to ...` on the embedded defaults (SQLite, local
storage): the built-in presets, a second run that adds nothing, and bad input (presets,
options, settings) refused with one line and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from db.session import make_engine, make_sessionmaker
from pixelmill.settings import get_settings
from pixelmill.storage import storage_from_settings
from review.accounts import add_reviewer
from review.channels.marking import TRAINED_ALGORITHMIC_MEDIA, digital_source_type, read_c2pa
from tests.review.c2pa_chain import make_chain
from tests.review.keepers import run_with_keepers


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in (
        "DATABASE_URL", "BROKER_URL", "STORAGE", "MODEL", "CHANNEL_PRESETS_PATH",
        "C2PA_CERT_PATH", "C2PA_KEY_PATH",
    ):  # fmt: skip
        monkeypatch.delenv(f"PIXELMILL_{name}", raising=False)
    monkeypatch.chdir(tmp_path)
    assert invoke("db", "upgrade")[0] == 0
    settings = get_settings()
    engine = make_engine(settings.resolved_database_url)
    try:
        with make_sessionmaker(engine)() as session:
            alice = add_reviewer(session, "alice", "correct horse battery")
            run_with_keepers(
                session, storage_from_settings(settings), alice.id, items=2, open_items=1
            )
    finally:
        engine.dispose()
    return tmp_path


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), prog_name="pixelmill")
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, " ".join(result.output.split())


def test_export_to_channels_then_again(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chain = make_chain(workdir / "chain")
    monkeypatch.setenv("PIXELMILL_C2PA_CERT_PATH", str(chain.cert_path))
    monkeypatch.setenv("PIXELMILL_C2PA_KEY_PATH", str(chain.key_path))
    args = ("export", "night-1", "--channel", "cn-marketplace", "--channel", "web-shop")

    code, out = invoke(*args, "--to", "out")

    assert code == 0, out
    assert "cn-marketplace: 2 written, 0 already there" in out
    assert "web-shop: 2 written, 0 already there" in out
    assert "4 files in" in out and "marked as AI-generated in XMP and C2PA" in out
    assert "1 items not submitted yet were left out" in out
    manifest = (workdir / "out/manifest.jsonl").read_text()
    records = [json.loads(line) for line in manifest.splitlines()]
    assert {r["channel"] for r in records} == {"cn-marketplace", "web-shop"}
    for record in records:
        data = (workdir / "out" / record["file"]).read_bytes()
        assert digital_source_type(data) == TRAINED_ALGORITHMIC_MEDIA
        content_type = "image/jpeg" if record["format"] == "jpeg" else "image/webp"
        assert read_c2pa(data, content_type) is not None
    images = [path for path in (workdir / "out").rglob("*/*") if path.is_file()]
    before = {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in images}
    assert len(before) == 4

    code, out = invoke(*args, "--to", "out")

    assert code == 0, out
    assert "cn-marketplace: 0 written, 2 already there" in out
    for path, stamp in before.items():  # the manifests are rewritten, the images are not
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == stamp

    code, out = invoke("export", "night-1", "--channel", "cn-marketplace", "--to", "out.zip")
    assert code == 0 and (workdir / "out.zip").is_file(), out


def test_bad_input_is_one_line_and_writes_nothing(workdir: Path) -> None:
    (workdir / "bad.yaml").write_text("channels:\n  shop:\n    size: 2000\n    format: tiff\n")
    code, out = invoke(
        "export", "night-1", "--channel", "shop", "--presets", "bad.yaml", "--to", "out"
    )
    assert code == 2
    assert "bad.yaml:4: field 'channels.shop.format': 'tiff': use one of jpeg, webp, png" in out
    assert not (workdir / "out").exists()

    code, out = invoke("export", "night-1", "--channel", "amazon", "--to", "out")
    assert code == 2 and "no channel 'amazon'" in out and not (workdir / "out").exists()
    code, out = invoke("export", "night-1", "--channel", "web-shop")
    assert code == 2 and "--channel and --to go together" in out
    code, out = invoke("export", "night-1", "--channel", "web-shop", "--to", "o", "--out", "x")
    assert code == 2 and "no --format, --out or --copy-approved" in out
    code, out = invoke("export", "night-9", "--channel", "web-shop", "--to", "out")
    assert code == 2 and "no run named 'night-9'" in out
    (workdir / "key.pem").write_text("not a key")
    (workdir / "cert.pem").write_text("not a certificate")
    environment = {"PIXELMILL_C2PA_CERT_PATH": "cert.pem", "PIXELMILL_C2PA_KEY_PATH": "key.pem"}
    result = CliRunner().invoke(
        app, ["export", "night-1", "--channel", "web-shop", "--to", "out"], env=environment
    )
    assert result.exit_code == 2 and "PIXELMILL_C2PA_CERT_PATH" in result.output
    assert not (workdir / "out").exists()
    result = CliRunner().invoke(
        app, ["export", "night-1", "--channel", "web-shop", "--to", "out"],
        env={"PIXELMILL_C2PA_CERT_PATH": "cert.pem"},
    )  # fmt: skip
    assert result.exit_code == 2 and "go together" in result.output
