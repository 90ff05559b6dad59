"""Which errors are outages (a service unreachable) and which are not, from the real clients;
and the backoff's pauses."""

from __future__ import annotations

import random

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from kombu import Connection
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError

from pixelmill.errors import BadInputError, InfrastructureError
from pixelmill.outages import (
    BROKER,
    DATABASE,
    STORAGE,
    OutageBackoff,
    RetryBackoff,
    ServiceUnavailableError,
    infrastructure_error,
    service_of,
)


def _raised(action: object) -> BaseException:
    try:
        action()  # type: ignore[operator]
    except Exception as exc:
        return exc
    raise AssertionError("did not raise")


def test_an_unreachable_database_is_a_database_outage() -> None:
    engine = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    try:
        error = _raised(lambda: engine.connect())
    finally:
        engine.dispose()
    outage = infrastructure_error(error)
    assert isinstance(outage, ServiceUnavailableError)
    assert outage.service == DATABASE and outage.__cause__ is error
    assert str(outage).startswith("database unreachable: OperationalError: ")


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0", "amqp://guest:guest@127.0.0.1:1//"])
def test_an_unreachable_broker_is_a_broker_outage(url: str) -> None:
    with Connection(url, connect_timeout=2) as connection:
        error = _raised(lambda: connection.ensure_connection(max_retries=1, interval_start=0))
    assert service_of(error) == BROKER


def test_an_unreachable_store_is_a_storage_outage() -> None:
    client = boto3.session.Session().client(
        "s3",
        endpoint_url="http://127.0.0.1:1",
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1),
    )
    error = _raised(lambda: client.put_object(Bucket="b", Key="k", Body=b"x"))
    assert service_of(error) == STORAGE


@pytest.mark.parametrize(
    ("status", "code", "outage"),
    [(503, "ServiceUnavailable", True), (500, "InternalError", True), (503, "SlowDown", True),
     (404, "NoSuchKey", False), (403, "AccessDenied", False)],
)  # fmt: skip
def test_a_store_answering_5xx_is_out_but_4xx_is_our_request(
    status: int, code: str, outage: bool
) -> None:
    error = ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )
    assert (service_of(error) == STORAGE) is outage


def test_errors_of_the_job_or_the_code_are_not_outages(fresh_database_url: str) -> None:
    engine = create_engine(fresh_database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (id int PRIMARY KEY)"))
            conn.execute(text("INSERT INTO t VALUES (1)"))
        with engine.connect() as conn:
            duplicate = _raised(lambda: conn.execute(text("INSERT INTO t VALUES (1)")))
    finally:
        engine.dispose()
    assert isinstance(duplicate, IntegrityError)
    for error in (duplicate, ValueError("bad"), BadInputError("bad"), KeyError("x")):
        assert infrastructure_error(error) is None


def test_an_outage_wrapped_by_our_code_is_still_one() -> None:
    already = InfrastructureError("S3 down")
    assert infrastructure_error(already) is already
    wrapped = RuntimeError("upload failed")
    wrapped.__cause__ = ConnectionRefusedError(111, "Connection refused")
    assert infrastructure_error(wrapped) is not None


def test_the_loop_backoff_grows_while_rounds_fail_and_resets() -> None:
    loop = OutageBackoff(RetryBackoff(base=1.0, cap=8.0))
    pauses = [loop.failed() for _ in range(6)]
    assert 0.5 <= pauses[0] <= 1 and 4 <= pauses[-1] <= 8
    assert loop.succeeded() == 6
    assert loop.failed() <= 1


def test_a_zero_base_means_no_pause() -> None:
    assert RetryBackoff(base=0, cap=10).seconds(5, random.Random(1)) == 0
