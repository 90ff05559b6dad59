from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from pixelmill.settings import get_settings


def test_embedded_defaults_live_in_the_data_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = get_settings()
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'var' / 'pixelmill.db'}"
    assert settings.resolved_broker_url == f"sqla+sqlite:///{tmp_path / 'var' / 'broker.db'}"
    assert settings.resolved_storage_dir == tmp_path / "var" / "images"
    assert settings.storage == "local"
    assert settings.model == "tiny"


def test_environment_variables_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIXELMILL_DATABASE_URL", "postgresql+psycopg://u@db/pixelmill")
    monkeypatch.setenv("PIXELMILL_STORAGE", "s3")
    monkeypatch.setenv("PIXELMILL_S3_BUCKET", "images")
    monkeypatch.setenv("PIXELMILL_DEVICE", "cuda:1")
    settings = get_settings()
    assert settings.resolved_database_url == "postgresql+psycopg://u@db/pixelmill"
    assert (settings.storage, settings.s3_bucket, settings.device) == ("s3", "images", "cuda:1")


def test_dotenv_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("PIXELMILL_MODEL=/models/sd15\n")
    assert get_settings().model == "/models/sd15"


def test_s3_storage_requires_a_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIXELMILL_STORAGE", "s3")
    with pytest.raises(ValidationError, match="PIXELMILL_S3_BUCKET is required"):
        get_settings()


def test_unknown_storage_kind_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIXELMILL_STORAGE", "ftp")
    with pytest.raises(ValidationError, match="storage"):
        get_settings()
