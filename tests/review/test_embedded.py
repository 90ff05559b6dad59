"""The embedded setup (SQLite, a local folder, no settings): `pixelmill reviewer add`, the app
with a generated secret key, a review, `pixelmill export`; and the secret key rules."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from cli.main import app as cli
from db.migrate import upgrade
from db.session import make_engine, make_sessionmaker
from pixelmill.settings import get_settings
from pixelmill.storage import LocalStorage
from review.app import create_app
from review.secret import SECRET_FILE, SecretKeyError, secret_key
from tests.review.conftest import PASSWORD, log_in
from tests.review.factory import make_run


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("DATABASE_URL", "BROKER_URL", "STORAGE", "STORAGE_DIR", "REVIEW_SECRET_KEY"):
        monkeypatch.delenv(f"PIXELMILL_{name}", raising=False)
    (tmp_path / "var").mkdir()
    monkeypatch.setenv("PIXELMILL_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def invoke(*args: str, stdin: str | None = None, stdout: bool = False) -> tuple[int, str]:
    """Exit code and output (stdout and stderr, or with ``stdout`` only stdout)."""
    result = CliRunner().invoke(cli, list(args), input=stdin)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout if stdout else result.output


def test_review_on_the_embedded_setup(workdir: Path) -> None:
    settings = get_settings()
    assert not settings.database_url  # the embedded SQLite database
    upgrade(settings.resolved_database_url)

    assert (
        invoke("reviewer", "add", "ann", "--admin", "--password-stdin", stdin=PASSWORD + "\n")[0]
        == 0
    )
    code, out = invoke("reviewer", "add", "ann", "--password-stdin", stdin=PASSWORD + "\n")
    assert code == 2 and "exists already" in out
    code, out = invoke("reviewer", "add", "bo", "--password-stdin", stdin="short\n")
    assert code == 2 and "at least 10 characters" in out
    assert "ann  admin" in invoke("reviewer", "list")[1]

    sessions = make_sessionmaker(make_engine(settings.resolved_database_url))
    storage = LocalStorage(settings.resolved_storage_dir)
    with sessions() as session:
        made = make_run(session, items=2, templates=("studio",), seeds=2, storage=storage)
    app = create_app(settings, background_sync=False)
    assert (settings.data_dir / SECRET_FILE).stat().st_mode & 0o777 == 0o600
    with TestClient(app) as client:
        token = log_in(client, "ann")
        headers = {"X-CSRF-Token": token}
        item_id = client.post(f"/api/runs/{made.run.id}/claim", headers=headers).json()[
            "review_item_id"
        ]
        assert item_id is not None
        images = client.get(f"/api/items/{item_id}").json()["images"]
        assert client.get(images[0]["url"]).content.startswith(b"\x89PNG")
        keep = images[0]["id"]
        client.post(
            f"/api/items/{item_id}/decisions",
            json={"image_id": keep, "decision": "keep"},
            headers=headers,
        ).raise_for_status()
        client.post(f"/api/items/{item_id}/submit", headers=headers).raise_for_status()
        other = client.post(f"/api/runs/{made.run.id}/claim", headers=headers).json()
        assert other["review_item_id"] not in (None, item_id)

    code, out = invoke("export", made.run.name, "--format", "csv", stdout=True)
    assert code == 0, out
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [row["image_id"] for row in rows] == [str(keep)]
    code, out = invoke("export", "no-such-run")
    assert code == 2 and "no run named 'no-such-run'" in out
    code, out = invoke("export", made.run.name, "--format", "xlsx")
    assert code == 2 and "--format 'xlsx'" in out


def test_the_embedded_secret_key_is_made_once(tmp_path: Path) -> None:
    settings = get_settings(data_dir=tmp_path, database_url="")
    first = secret_key(settings)
    assert len(first) >= 32
    assert secret_key(settings) == first


def test_a_real_database_needs_a_secret_key(tmp_path: Path, session: Session) -> None:
    url = "postgresql+psycopg://db.example/pixelmill"
    with pytest.raises(SecretKeyError, match="PIXELMILL_REVIEW_SECRET_KEY is required"):
        secret_key(get_settings(data_dir=tmp_path, database_url=url))
    with pytest.raises(SecretKeyError, match="at least 32 characters"):
        secret_key(get_settings(data_dir=tmp_path, database_url=url, review_secret_key="short"))
    assert secret_key(get_settings(database_url=url, review_secret_key="k" * 32)) == "k" * 32


def test_review_refuses_to_start_without_a_secret_key_on_a_real_database(
    workdir: Path, fresh_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIXELMILL_DATABASE_URL", fresh_database_url)
    code, out = invoke("review", "--port", "1")
    assert code == 2 and "PIXELMILL_REVIEW_SECRET_KEY is required" in out
