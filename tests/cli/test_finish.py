"""`pixelmill finish RUN`, in process, on the embedded defaults (SQLite, a local folder) with
the built-in tiny upscaler and captioner."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from cli.main import app
from db.finishing import ImageCaption, UpscaledImage
from db.migrate import upgrade
from db.session import make_engine, make_sessionmaker
from pixelmill.storage import LocalStorage
from tests.worker.finishing.conftest import reviewed_run


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


@pytest.fixture
def session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Session]:
    for name in ("DATABASE_URL", "BROKER_URL", "STORAGE", "STORAGE_DIR", "MODEL"):
        monkeypatch.delenv(f"PIXELMILL_{name}", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PIXELMILL_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("PIXELMILL_UPSCALE_MODEL", "tiny")
    monkeypatch.setenv("PIXELMILL_UPSCALE_TILE", "16")
    monkeypatch.setenv("PIXELMILL_CAPTION_MODEL", "tiny")
    monkeypatch.setenv("PIXELMILL_CAPTION_MAX_TOKENS", "5")
    url = f"sqlite:///{tmp_path / 'var' / 'pixelmill.db'}"
    (tmp_path / "var").mkdir()
    upgrade(url)
    engine = make_engine(url)
    with make_sessionmaker(engine)() as session:
        yield session
    engine.dispose()


def _count(session: Session, model: type) -> int:
    return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_finish_a_runs_keepers_then_again(session: Session, tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "var" / "images")
    made = reviewed_run(session, storage, items=2, open_items=1, size=(16, 12))
    code, out = invoke("finish", made.run.name)
    assert code == 0, out
    assert f"run {made.run.name!r}: 2 keepers: 2 upscaled, 2 captioned, 0 fields filled" in out
    assert _count(session, UpscaledImage) == 2 and _count(session, ImageCaption) == 2
    for key in session.scalars(select(UpscaledImage.storage_key)):
        assert (tmp_path / "var" / "images" / key).is_file()

    code, out = invoke("finish", str(made.run.id))
    assert code == 0, out
    assert "2 keepers: 0 upscaled, 0 captioned" in out


def test_finish_with_captions_only(session: Session, tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "var" / "images")
    made = reviewed_run(session, storage, items=1, open_items=0, size=(16, 12))
    code, out = invoke("finish", made.run.name, "--no-upscale")
    assert code == 0, out
    assert "1 keepers: 0 upscaled, 1 captioned" in out
    assert _count(session, UpscaledImage) == 0


def test_finish_refuses_what_it_cannot_do(
    session: Session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out = invoke("finish", "no-such-run")
    assert code == 1 and "no run 'no-such-run'" in out

    storage = LocalStorage(tmp_path / "var" / "images")
    made = reviewed_run(session, storage, items=1, open_items=0, size=(16, 12))
    monkeypatch.setenv("PIXELMILL_UPSCALE_MODEL", str(tmp_path / "models" / "x4.pth"))
    code, out = invoke("finish", made.run.name)
    assert code == 2
    assert f"PIXELMILL_UPSCALE_MODEL {tmp_path / 'models' / 'x4.pth'}: no such file" in out
    assert "Traceback" not in out

    code, out = invoke("finish", made.run.name, "--no-upscale", "--no-caption")
    assert code == 2 and "nothing to do" in out
