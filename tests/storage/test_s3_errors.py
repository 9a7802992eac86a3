"""S3 failures mapped onto the keystate error tree, over real HTTP against moto's threaded server.

Failures the server cannot produce on demand (403, 503 SlowDown, 500, a truncated body) are injected
with a botocore ``before-send`` hook: the hook answers the request itself, so the request never
reaches moto, and everything above the HTTP layer (botocore's retry mode, parsing, keystate's
mapping) runs as in production.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest
from botocore.awsrequest import AWSResponse

from keystate.storage import (
    AlreadyExistsError,
    BucketNotFoundError,
    CheckpointKind,
    CheckpointMetadata,
    CheckpointStorage,
    CommitFailedError,
    CommitOutcomeUnknownError,
    CredentialsError,
    KeystateError,
    NotFoundError,
    OperatorState,
    PutMode,
    S3ObjectStore,
    StorageAccessDeniedError,
    StorageError,
    StorageUnavailableError,
    make_s3_client,
    open_storage,
)
from keystate.storage.format import dump_metadata
from keystate.storage.s3faults import S3FaultInjector, S3FaultRule, injected_response, s3_error_response

MISSING_BUCKET = "ks-no-such-bucket"
JOB = "0123456789abcdef0123456789abcdef"
MIB = 1024 * 1024


def Injector(
    status: int, code: str, *, times: int | None = None, key_suffix: str = "", delay: float = 0.0
) -> S3FaultInjector:
    """The library's botocore hook answering matching requests with one S3 error (``keystate.storage.s3faults``).

    ``times``: only the first ``times`` matching attempts (later ones reach the server);
    ``key_suffix``: only requests whose URL path ends with it; ``delay``: seconds before answering.
    """
    return S3FaultInjector([S3FaultRule(status=status, code=code, times=times, key=f"*{key_suffix}", delay=delay)])


def header(request: Any, name: str) -> str | None:
    """A header of a prepared request (botocore keeps some as bytes)."""
    value = request.headers.get(name)
    return value.decode() if isinstance(value, bytes) else value


def server_store(endpoint: str, bucket: str, **client_options: Any) -> S3ObjectStore:
    return S3ObjectStore(bucket, "p", client=make_s3_client(endpoint_url=endpoint, **client_options))


@functools.cache
def raw_client(endpoint: str) -> Any:
    """A plain client, without keystate's configuration, to look at the bucket directly."""
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def small_metadata(checkpoint_id: int) -> CheckpointMetadata:
    return CheckpointMetadata(
        checkpoint_id, JOB, CheckpointKind.CHECKPOINT, 1_700_000_000_000, (OperatorState("src", 1, 128),)
    )


def write_with_writer(store: S3ObjectStore, size: int) -> None:
    writer = store.open_writer("k", PutMode.CREATE)
    writer.write(b"w" * size)
    writer.close()


# --- missing bucket ----------------------------------------------------------------------------------

MISSING_BUCKET_CALLS: dict[str, Callable[[S3ObjectStore], object]] = {
    "get": lambda s: s.get("k"),
    "get_range": lambda s: s.get_range("k", 0, 10),
    "open_reader": lambda s: s.open_reader("k"),
    "list_objects": lambda s: list(s.list_objects("dir")),
    "list_dirs": lambda s: s.list_dirs("dir"),
    "put": lambda s: s.put("k", b"data"),
    "put_create": lambda s: s.put("k", b"data", PutMode.CREATE),
    "writer": lambda s: write_with_writer(s, 10),
    "multipart_writer": lambda s: write_with_writer(s, 6 * MIB),
    "delete_many": lambda s: s.delete_many(["k"]),
    "check_bucket": lambda s: s.check_bucket(),
}


@pytest.mark.parametrize("call", MISSING_BUCKET_CALLS.values(), ids=MISSING_BUCKET_CALLS.keys())
def test_missing_bucket_is_bucket_not_found(moto_endpoint: str, call: Callable[[S3ObjectStore], object]) -> None:
    store = S3ObjectStore(MISSING_BUCKET, "p", endpoint_url=moto_endpoint, part_size=5 * MIB)
    with pytest.raises(BucketNotFoundError) as info:
        call(store)
    assert isinstance(info.value, NotFoundError)
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert f"bucket {MISSING_BUCKET!r} does not exist" in message
    assert "create it or fix the URI" in message
    assert f"s3://{MISSING_BUCKET}/p" in message
    assert "p/p/" not in message  # the store prefix appears once


def test_missing_bucket_through_checkpoint_storage(moto_endpoint: str) -> None:
    storage = open_storage(f"s3://{MISSING_BUCKET}/checkpoints", endpoint_url=moto_endpoint)
    with pytest.raises(BucketNotFoundError, match=MISSING_BUCKET):
        storage.discover()
    with pytest.raises(BucketNotFoundError, match=MISSING_BUCKET):
        storage.resolve()
    with pytest.raises(CommitFailedError, match=f"bucket '{MISSING_BUCKET}' does not exist") as info:
        storage.begin_checkpoint(JOB, 1).commit(small_metadata(1))
    assert isinstance(info.value.__cause__, BucketNotFoundError)


def test_check_bucket_passes_for_an_existing_bucket(moto_endpoint: str, server_bucket: str) -> None:
    S3ObjectStore(server_bucket, "p", endpoint_url=moto_endpoint).check_bucket()


# --- access denied -----------------------------------------------------------------------------------

DENIED_CALLS: list[tuple[str, Callable[[S3ObjectStore], object], str]] = [
    ("get", lambda s: s.get("k"), "s3:GetObject"),
    ("stat", lambda s: s.size("k"), "s3:GetObject"),
    ("list", lambda s: s.list_dirs("d"), "s3:ListBucket"),
    ("put", lambda s: s.put("k", b"x", PutMode.CREATE), "s3:PutObject"),
    ("delete", lambda s: s.delete("k"), "s3:DeleteObject"),
    ("check_bucket", lambda s: s.check_bucket(), "s3:ListBucket"),
]


@pytest.mark.parametrize(("call", "permission"), [c[1:] for c in DENIED_CALLS], ids=[c[0] for c in DENIED_CALLS])
def test_access_denied_is_storage_access_denied(
    moto_endpoint: str, server_bucket: str, call: Callable[[S3ObjectStore], object], permission: str
) -> None:
    store = server_store(moto_endpoint, server_bucket)
    deny = Injector(403, "AccessDenied")
    store.client.meta.events.register("before-send.s3.*", deny)
    with pytest.raises(StorageAccessDeniedError) as info:
        call(store)
    assert isinstance(info.value, PermissionError)
    message = str(info.value)
    assert "access denied" in message
    assert f"s3://{server_bucket}/p" in message
    assert f"bucket policy for {permission} permission" in message
    assert len(deny.attempts) == 1, "a 403 is final and must not be retried"


@pytest.mark.parametrize("code", ["InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"])
def test_rejected_credentials_are_storage_access_denied(moto_endpoint: str, server_bucket: str, code: str) -> None:
    store = server_store(moto_endpoint, server_bucket)
    store.client.meta.events.register("before-send.s3.*", Injector(403, code))
    with pytest.raises(StorageAccessDeniedError, match=f"access denied \\({code}\\); check the credentials"):
        store.get("k")


# --- credentials -------------------------------------------------------------------------------------


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No credentials anywhere boto3 looks: environment, shared files, profiles, containers, IMDS."""
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials-file"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config-file"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.mark.usefixtures("no_credentials")
def test_no_credentials_is_credentials_error(moto_endpoint: str, server_bucket: str) -> None:
    storage = open_storage(f"s3://{server_bucket}/checkpoints", endpoint_url=moto_endpoint)
    calls: list[Callable[[], object]] = [
        lambda: storage.store.get("checkpoints/k"),
        lambda: storage.store.put("checkpoints/k", b"x", PutMode.CREATE),
        storage.discover,
    ]
    for call in calls:
        with pytest.raises(CredentialsError) as info:
            call()
        assert "no AWS credentials found" in str(info.value)
        assert "AWS_ACCESS_KEY_ID" in str(info.value)
        assert isinstance(info.value.__cause__, botocore.exceptions.NoCredentialsError)


@pytest.mark.usefixtures("no_credentials")
@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [("AWS_ACCESS_KEY_ID", "AKIDONLY", "AWS_SECRET_ACCESS_KEY"), ("AWS_PROFILE", "no-such-profile", "no-such-profile")],
)
def test_unusable_credentials_at_client_creation_are_credentials_error(
    monkeypatch: pytest.MonkeyPatch, moto_endpoint: str, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(CredentialsError, match=expected):
        open_storage("s3://some-bucket/checkpoints", endpoint_url=moto_endpoint)


# --- unreachable endpoint, throttling and server errors ----------------------------------------------


@pytest.mark.parametrize(
    "call", [lambda s: s.get("k"), lambda s: s.put("k", b"x"), lambda s: s.list_dirs("")], ids=["get", "put", "list"]
)
def test_unreachable_endpoint_is_storage_unavailable(call: Callable[[S3ObjectStore], object]) -> None:
    store = S3ObjectStore(
        "some-bucket",
        "p",
        client=make_s3_client(endpoint_url="http://127.0.0.1:1", max_attempts=1, connect_timeout=0.5),
    )
    attempts: list[Any] = []
    store.client.meta.events.register("before-send.s3.*", lambda request, **_: attempts.append(request))
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError) as info:
        call(store)
    assert isinstance(info.value, ConnectionError)
    assert "unreachable" in str(info.value)
    assert "127.0.0.1:1" in str(info.value)
    assert len(attempts) == 1, "max_attempts counts every attempt, the first included"
    assert time.monotonic() - started < 5


THROTTLED_CALLS: dict[str, tuple[str, Callable[[S3ObjectStore], object]]] = {
    "put": ("PutObject", lambda s: s.put("k", b"v", PutMode.CREATE)),
    "get": ("GetObject", lambda s: s.get("existing")),
    "stat": ("HeadObject", lambda s: s.size("existing")),
    "list": ("ListObjectsV2", lambda s: s.list_dirs("")),
}


@pytest.mark.parametrize("name", THROTTLED_CALLS)
def test_throttling_is_retried_until_it_succeeds(
    moto_endpoint: str, server_bucket: str, s3_backoffs: list[float], name: str
) -> None:
    store = server_store(moto_endpoint, server_bucket)
    store.put("existing", b"there")
    operation, call = THROTTLED_CALLS[name]
    slow_down = Injector(503, "SlowDown", times=3)
    store.client.meta.events.register(f"before-send.s3.{operation}", slow_down)
    call(store)
    assert len(slow_down.attempts) == 4, "three throttled attempts, then the one that reached the server"
    assert len(s3_backoffs) == 3, "the client backed off before every retry"
    # Throttling: full jitter under 1 s, 2 s, 4 s (botocore's standard mode).
    assert all(0 <= d <= 2.0**i for i, d in enumerate(s3_backoffs)), s3_backoffs
    if name == "put":
        assert store.get("k") == b"v"


@pytest.mark.parametrize(
    ("status", "code", "name"),
    [
        (503, "SlowDown", "put"),
        (503, "SlowDown", "get"),
        (500, "InternalError", "put"),
        (503, "ServiceUnavailable", "get"),
    ],
)
def test_persistent_server_errors_are_storage_unavailable(
    moto_endpoint: str, server_bucket: str, s3_backoffs: list[float], status: int, code: str, name: str
) -> None:
    store = server_store(moto_endpoint, server_bucket, max_attempts=3)
    store.put("existing", b"there")
    operation, call = THROTTLED_CALLS[name]
    failing = Injector(status, code)
    store.client.meta.events.register(f"before-send.s3.{operation}", failing)
    with pytest.raises(StorageUnavailableError) as info:
        call(store)
    assert isinstance(info.value, ConnectionError)
    assert code in str(info.value)
    assert "try again later" in str(info.value)
    assert len(failing.attempts) == 3, "exactly max_attempts attempts in total"
    assert len(s3_backoffs) == 2
    if name == "put":
        assert not server_store(moto_endpoint, server_bucket).exists("k")


# --- create-only writes ------------------------------------------------------------------------------


def test_create_only_put_gets_a_real_412_from_the_server(moto_endpoint: str, server_bucket: str) -> None:
    store = server_store(moto_endpoint, server_bucket)
    store.put("k", b"first", PutMode.CREATE)
    with pytest.raises(AlreadyExistsError) as info:
        store.put("k", b"second", PutMode.CREATE)
    assert isinstance(info.value, FileExistsError)
    assert f"s3://{server_bucket}/p/k already exists" in str(info.value)
    assert store.get("k") == b"first"


def test_injected_412_on_conditional_put_is_already_exists(moto_endpoint: str, server_bucket: str) -> None:
    store = server_store(moto_endpoint, server_bucket)
    precondition = Injector(412, "PreconditionFailed")
    store.client.meta.events.register("before-send.s3.PutObject", precondition)
    with pytest.raises(AlreadyExistsError):
        store.put("k", b"x", PutMode.CREATE)
    assert [header(r, "If-None-Match") for r in precondition.attempts] == ["*"], "sent once, create-only"
    assert not store.exists("k")


def test_overwrite_put_is_unconditional(moto_endpoint: str, server_bucket: str) -> None:
    store = server_store(moto_endpoint, server_bucket)
    seen: list[Any] = []
    store.client.meta.events.register("before-send.s3.PutObject", lambda request, **_: seen.append(request))
    store.put("k", b"x", PutMode.OVERWRITE)
    store.put("k", b"y", PutMode.OVERWRITE)
    assert [header(r, "If-None-Match") for r in seen] == [None, None]
    assert store.get("k") == b"y"


def test_injected_412_on_multipart_completion_is_already_exists(moto_endpoint: str, server_bucket: str) -> None:
    store = S3ObjectStore(server_bucket, "p", endpoint_url=moto_endpoint, part_size=5 * MIB)
    precondition = Injector(412, "PreconditionFailed")
    store.client.meta.events.register("before-send.s3.CompleteMultipartUpload", precondition)
    with pytest.raises(AlreadyExistsError):
        write_with_writer(store, 6 * MIB)
    assert [header(r, "If-None-Match") for r in precondition.attempts] == ["*"]
    assert raw_client(moto_endpoint).list_multipart_uploads(Bucket=server_bucket).get("Uploads", []) == []


# --- failures in the middle of a stream --------------------------------------------------------------


def test_failing_part_upload_is_mapped_and_the_upload_aborted(moto_endpoint: str, server_bucket: str) -> None:
    store = S3ObjectStore(
        server_bucket,
        "p",
        client=make_s3_client(endpoint_url=moto_endpoint, max_attempts=1),
        part_size=5 * MIB,
        upload_concurrency=1,
    )
    # Each part fails after a while, so the failure surfaces while write() waits for a part in flight
    # (a write never waits longer than for one part: the next part is only 5 ms of copying away).
    failing = Injector(503, "SlowDown", delay=0.3)
    store.client.meta.events.register("before-send.s3.UploadPart", failing)
    writer = store.open_writer("big", PutMode.CREATE)

    def write_four_parts() -> None:
        for _ in range(4):
            writer.write(b"p" * (5 * MIB))

    with pytest.raises(StorageUnavailableError, match="SlowDown"):
        write_four_parts()
    assert failing.attempts, "the part upload was attempted"
    assert raw_client(moto_endpoint).list_multipart_uploads(Bucket=server_bucket).get("Uploads", []) == []
    assert not store.exists("big")


def test_truncated_response_body_is_a_storage_error(moto_endpoint: str, server_bucket: str) -> None:
    store = server_store(moto_endpoint, server_bucket)
    store.put("obj", b"o" * 100_000)

    def truncated(request: Any, **_: Any) -> AWSResponse:
        # The server promises 100000 bytes and the connection ends after 5000.
        return injected_response(request, 200, {"Content-Length": "100000", "ETag": '"e"'}, b"o" * 5000)

    store.client.meta.events.register("before-send.s3.GetObject", truncated)
    reader = store.open_reader("obj")
    try:
        with pytest.raises(StorageError, match=f"s3://{server_bucket}/p/obj") as info:
            reader.read()
    finally:
        reader.close()
    assert isinstance(info.value.__cause__, botocore.exceptions.IncompleteReadError)
    with pytest.raises(StorageError, match=f"s3://{server_bucket}/p/obj"):
        store.get("obj")


# --- the commit point under failures -----------------------------------------------------------------


def commit_storage(endpoint: str, bucket: str, **client_options: Any) -> CheckpointStorage:
    return CheckpointStorage(
        S3ObjectStore(bucket, "", client=make_s3_client(endpoint_url=endpoint, **client_options)), "ckpt"
    )


def test_retried_metadata_put_that_landed_is_a_successful_commit(
    moto_endpoint: str, server_bucket: str, s3_backoffs: list[float]
) -> None:
    storage = commit_storage(moto_endpoint, server_bucket)
    metadata = small_metadata(1)
    key = f"ckpt/{JOB}/chk-1/_metadata"
    attempts: list[Any] = []

    def lands_then_fails(request: Any, **_: Any) -> AWSResponse | None:
        attempts.append(request)
        if len(attempts) > 1:
            return None
        # The PUT reaches S3 and is applied, but the response is lost: botocore retries it.
        raw_client(moto_endpoint).put_object(Bucket=server_bucket, Key=key, Body=dump_metadata(metadata))
        return s3_error_response(request, 500, "InternalError")

    assert isinstance(storage.store, S3ObjectStore)
    storage.store.client.meta.events.register("before-send.s3.PutObject", lands_then_fails)
    completed = storage.begin_checkpoint(JOB, 1).commit(metadata)
    assert len(attempts) == 2, "the retry found its own metadata (412) and read it back"
    assert completed.metadata == metadata
    assert commit_storage(moto_endpoint, server_bucket).load(f"ckpt/{JOB}/chk-1").metadata == metadata


def test_metadata_put_that_failed_is_commit_failed(
    moto_endpoint: str, server_bucket: str, s3_backoffs: list[float]
) -> None:
    storage = commit_storage(moto_endpoint, server_bucket, max_attempts=2)
    assert isinstance(storage.store, S3ObjectStore)
    storage.store.client.meta.events.register("before-send.s3.PutObject", Injector(503, "SlowDown"))
    with pytest.raises(CommitFailedError, match="was not committed") as info:
        storage.begin_checkpoint(JOB, 1).commit(small_metadata(1))
    assert isinstance(info.value.__cause__, StorageUnavailableError)
    assert commit_storage(moto_endpoint, server_bucket).discover() == []


def test_commit_whose_outcome_cannot_be_read_back_is_unknown(
    moto_endpoint: str, server_bucket: str, s3_backoffs: list[float]
) -> None:
    storage = commit_storage(moto_endpoint, server_bucket, max_attempts=2)
    assert isinstance(storage.store, S3ObjectStore)
    storage.store.client.meta.events.register("before-send.s3.*", Injector(503, "SlowDown", key_suffix="/_metadata"))
    with pytest.raises(CommitOutcomeUnknownError, match="load the checkpoint") as info:
        storage.begin_checkpoint(JOB, 1).commit(small_metadata(1))
    assert not isinstance(info.value, CommitFailedError), "an unknown outcome is not a failed commit"
    assert isinstance(info.value, KeystateError)


# --- endpoint configuration --------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
def test_endpoint_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, moto_endpoint: str, server_bucket: str, variable: str
) -> None:
    monkeypatch.setenv(variable, moto_endpoint)
    storage = open_storage(f"s3://{server_bucket}/prefix")
    assert isinstance(storage.store, S3ObjectStore)
    assert storage.store.client.meta.endpoint_url == moto_endpoint
    storage.store.put("prefix/x", b"hello")
    assert raw_client(moto_endpoint).get_object(Bucket=server_bucket, Key="prefix/x")["Body"].read() == b"hello"


def test_service_specific_endpoint_wins_over_the_global_one(
    monkeypatch: pytest.MonkeyPatch, moto_endpoint: str, server_bucket: str
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    storage = open_storage(f"s3://{server_bucket}/prefix")
    storage.store.put("prefix/x", b"hello")
    assert storage.store.get("prefix/x") == b"hello"


def test_explicit_endpoint_overrides_the_environment(
    monkeypatch: pytest.MonkeyPatch, moto_endpoint: str, server_bucket: str, s3_backoffs: list[float]
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    storage = open_storage(f"s3://{server_bucket}/prefix", endpoint_url=moto_endpoint)
    storage.store.put("prefix/x", b"hello")
    assert raw_client(moto_endpoint).get_object(Bucket=server_bucket, Key="prefix/x")["Body"].read() == b"hello"

    # Without the override the environment's (unreachable) endpoint is used, with the default retries.
    from_env = open_storage(f"s3://{server_bucket}/prefix")
    assert isinstance(from_env.store, S3ObjectStore)
    attempts: list[Any] = []
    from_env.store.client.meta.events.register("before-send.s3.*", lambda request, **_: attempts.append(request))
    with pytest.raises(StorageUnavailableError, match=r"127\.0\.0\.1:1"):
        from_env.store.get("prefix/x")
    assert len(attempts) == 10
    assert len(s3_backoffs) == 9
