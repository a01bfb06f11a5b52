"""ObjectStore against moto's S3 server (a subprocess on loopback): what the shared contract
tests in test_store.py cannot show, namely the URI factory, multipart streaming, crashed
and killed publishers, concurrent publishers, conditional-write probing and size caps."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from atlas_sidecar.learning.objectstore import CLAIM, ObjectStore
from atlas_sidecar.learning.store import (
    MANIFEST,
    CorruptVersion,
    DirectoryStore,
    StoreError,
    StoreUnavailable,
    open_store,
)

from .conftest import MOTO_ENV, S3Harness
from .test_store import REPO, TARGET, files

PART = 5 << 20  # S3's smallest multipart part


@pytest.fixture
def s3(s3_bucket: tuple[Any, str], moto_endpoint: str) -> S3Harness:
    client, bucket = s3_bucket
    return S3Harness(client, bucket, moto_endpoint)


def child_env(endpoint: str) -> dict[str, str]:
    return {
        **os.environ,
        **MOTO_ENV,
        "AWS_ENDPOINT_URL": endpoint,
        "PYTHONPATH": str(REPO / "sidecar"),
    }


def test_open_store_picks_the_store_by_uri(
    s3: S3Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert isinstance(open_store(tmp_path / "a"), DirectoryStore)
    by_uri = open_store(f"file://{tmp_path}/b", stale_after_s=5)
    assert isinstance(by_uri, DirectoryStore) and by_uri.root == tmp_path / "b"
    assert by_uri.stale_after_s == 5
    for bad in ("file://relative/path", "gs://bucket/x"):
        with pytest.raises(StoreError, match="file URI|unknown store scheme"):
            open_store(bad)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    store = open_store(f"s3://{s3.bucket}/{s3.prefix}/")
    assert isinstance(store, ObjectStore) and store.prefix == s3.prefix + "/"
    version = store.publish(files(1), target=TARGET).version
    # another client, explicit endpoint: sees the same version under the same prefix
    other = open_store(f"s3://{s3.bucket}/{s3.prefix}", endpoint_url=s3.endpoint)
    assert other.open_version(version, TARGET).read("suffix.bin") == files(1)["suffix.bin"]
    assert s3.key(version, MANIFEST) in s3.keys() and s3.key(version, CLAIM) in s3.keys()


def test_large_file_streams_in_parts_and_round_trips(s3: S3Harness, tmp_path: Path) -> None:
    source = tmp_path / "head.safetensors"
    payload = random.Random(3).randbytes(2 * PART + 12345)  # three parts
    source.write_bytes(payload)
    store = s3.make(part_bytes=PART)
    manifest = store.publish({"head.safetensors": source}, target=TARGET)
    assert manifest.files[0].size == len(payload)
    head = s3.client.head_object(Bucket=s3.bucket, Key=s3.key(manifest.version, source.name))
    assert head["ETag"].strip('"').endswith("-3"), "uploaded as one object, not in parts"
    assert store.open_version(manifest.version, TARGET).read(source.name) == payload
    with pytest.raises(StoreError, match="over max_file_bytes"):
        s3.make(max_file_bytes=PART).open_version(manifest.version)


def test_files_without_manifest_are_invisible_and_cleaned_only_once_stale(
    s3: S3Harness,
) -> None:
    store = s3.make(stale_after_s=600)
    good = store.publish(files(1), target=TARGET).version
    # a publisher that died after its claim and files, before the manifest
    s3.write_raw("v000002", CLAIM, b'{"token": "dead"}')
    s3.write_raw("v000002", "head.safetensors", b"partial")
    # and one that died inside a multipart upload
    upload = s3.client.create_multipart_upload(Bucket=s3.bucket, Key=s3.key("v000003", "big"))
    s3.client.upload_part(
        Bucket=s3.bucket, Key=s3.key("v000003", "big"), UploadId=upload["UploadId"],
        PartNumber=1, Body=b"x" * 1024,
    )  # fmt: skip
    assert store.versions() == [good] and store.latest() == good
    assert store.latest_verified(TARGET).id == good  # type: ignore[union-attr]
    assert store.publish(files(2), target=TARGET).version == "v000004"  # skips taken ids
    assert len(s3.leftovers()) == 3, "young leftovers of a live publisher must survive"
    assert store.clean_stale(stale_after_s=0) == ["v000002", "v000003"]
    assert s3.leftovers() == []
    assert store.versions() == [good, "v000004"]


def test_failed_publish_removes_what_it_uploaded(s3: S3Harness, tmp_path: Path) -> None:
    store = s3.make()
    sources = {"a.bin": b"first", "b.bin": tmp_path / "does-not-exist"}
    with pytest.raises(FileNotFoundError):
        store.publish(sources, target=TARGET)
    assert s3.keys() == [] and s3.leftovers() == []
    assert store.publish(files(1), target=TARGET).version == "v000001"


KILLED = textwrap.dedent(
    """
    import os, sys
    from atlas_sidecar.learning.objectstore import ObjectStore
    from atlas_sidecar.learning.store import TargetIdentity
    store = ObjectStore(sys.argv[1], sys.argv[2], part_bytes=5 << 20)
    target = TargetIdentity("smollm2-135m-instruct", "main", 576, 49152, "ab12" * 16)
    with open(sys.argv[3], "wb") as out:
        out.write(os.urandom((10 << 20) + 1))  # three parts
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        store.publish({"head.safetensors": sys.argv[3], "calibration.json": b'{"i": %d}' % i},
                      target=target, metrics={"i": float(i)})
        store.retain(keep=2)
    """
)


def _kill_publisher(s3: S3Harness, tmp_path: Path, wait: Any) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED, s3.bucket, s3.prefix, str(tmp_path / "big.bin")],
        env=child_env(s3.endpoint), stdout=subprocess.PIPE, cwd=tmp_path,
    )  # fmt: skip
    assert child.stdout is not None
    assert child.stdout.readline() == b"ready\n"
    wait()
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()


def _uploading(s3: S3Harness) -> None:
    """Until a multipart upload is under way (at most 20 s)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = s3.client.list_multipart_uploads(Bucket=s3.bucket, Prefix=s3.prefix)
        if found.get("Uploads"):
            return
        time.sleep(0.01)
    raise AssertionError("the publisher never started a multipart upload")


def test_publisher_sigkilled_mid_upload_never_leaves_a_visible_torn_version(
    s3: S3Harness, tmp_path: Path
) -> None:
    rng = random.Random(22)
    waits = [lambda: _uploading(s3)] + [lambda: time.sleep(rng.uniform(0.1, 1.2))] * 3
    mid_upload = 0
    for wait in waits:
        _kill_publisher(s3, tmp_path, wait)
        reader = s3.make()
        listed = reader.versions()
        for version in listed:  # every version a reader can see verifies completely
            opened = reader.open_version(version, TARGET)
            if "i" in opened.manifest.metrics:
                assert len(opened.read("head.safetensors")) == (10 << 20) + 1
        assert reader.latest() is None or reader.latest() in listed
        mid_upload += bool(s3.leftovers())
        cleaner = s3.make(stale_after_s=0)
        published = cleaner.publish(files(0), target=TARGET).version
        assert published not in listed and cleaner.latest() == published
        assert s3.leftovers() == [], "the cleaner left a crashed upload behind"
    assert mid_upload > 0, "no kill landed mid-publish: the test proved nothing"


CONCURRENT = textwrap.dedent(
    """
    import sys
    from atlas_sidecar.learning.objectstore import ObjectStore
    from atlas_sidecar.learning.store import TargetIdentity
    store = ObjectStore(sys.argv[1], sys.argv[2])
    target = TargetIdentity("smollm2-135m-instruct", "main", 576, 49152, "ab12" * 16)
    sys.stdin.readline()  # start together
    for i in range(5):
        data = (sys.argv[3] * 1000 + str(i)).encode()
        store.publish({"head.safetensors": data}, target=target)
    """
)


def test_concurrent_publishers_get_distinct_versions(s3: S3Harness, tmp_path: Path) -> None:
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT, s3.bucket, s3.prefix, name],
            env=child_env(s3.endpoint),
            stdin=subprocess.PIPE,
            cwd=tmp_path,
        )  # fmt: skip
        for name in ("a", "b")
    ]
    for child in children:
        assert child.stdin is not None
        child.stdin.write(b"go\n")
        child.stdin.close()
    assert [child.wait(timeout=60) for child in children] == [0, 0]
    store = s3.make()
    ids = store.versions()
    assert ids == [f"v{n:06d}" for n in range(1, 11)]
    payloads = [store.open_version(v, TARGET).read("head.safetensors") for v in ids]
    assert len(set(payloads)) == 10  # nothing overwritten
    assert sorted(p[:1] for p in payloads) == [b"a"] * 5 + [b"b"] * 5
    for version in ids:  # a parent is an older, complete version (the chain may fork)
        parent = store.manifest(version).parent
        assert parent is None or (parent in ids and parent < version)
    assert store.latest() == ids[-1], "latest moved backwards under a race"


class IgnoresConditions:
    """A client for a server that ignores If-None-Match (as some S3 clones do)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def put_object(self, **kwargs: Any) -> Any:
        kwargs.pop("IfNoneMatch", None)
        return self._client.put_object(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def test_server_that_ignores_conditional_writes_is_refused(s3: S3Harness) -> None:
    with pytest.raises(ClientError, match="PreconditionFailed"):  # moto does honour them
        for _ in range(2):
            s3.client.put_object(Bucket=s3.bucket, Key="probe", Body=b"", IfNoneMatch="*")
    store = s3.make(client=IgnoresConditions(s3.client))
    with pytest.raises(StoreError, match="ignores If-None-Match"):
        store.publish(files(1), target=TARGET)
    assert s3.keys() == []
    single = s3.make(client=IgnoresConditions(s3.client), conditional_writes=False)
    assert single.publish(files(1), target=TARGET).version == "v000001"


def test_oversized_manifest_is_refused_without_reading_it_whole(s3: S3Harness) -> None:
    store = s3.make()
    good = store.publish(files(1), target=TARGET).version
    s3.write_raw("v000002", MANIFEST, b" " * ((1 << 20) + 1))
    assert store.versions() == [good, "v000002"]
    with pytest.raises(CorruptVersion, match="over 1048576 bytes"):
        store.open_version("v000002")
    skipped: list[str] = []
    assert store.latest_verified(TARGET, lambda v, e: skipped.append(v)).id == good  # type: ignore[union-attr]
    assert skipped == ["v000002"]


def test_retention_deletes_every_object_of_a_version_but_never_a_serving_one(
    s3: S3Harness,
) -> None:
    store = s3.make()
    ids = [store.publish(files(i), target=TARGET).version for i in range(4)]
    store.mark_serving(ids[0], holder="pod-a")
    assert store.retain(keep=1) == [ids[2], ids[1]]
    remaining = {k.split("/")[2] for k in s3.keys() if "/v0" in k}
    assert remaining == {ids[0], ids[3]}
    assert store.open_version(ids[0], TARGET).read("suffix.bin") == files(0)["suffix.bin"]
    store.mark_serving(None, holder="pod-a")
    assert store.serving() == set() and store.retain(keep=1) == [ids[0]]


class RefusesDeletes(IgnoresConditions):
    """A client whose bucket policy denies deletes: DeleteObjects answers per-key errors."""

    def put_object(self, **kwargs: Any) -> Any:
        return self._client.put_object(**kwargs)

    def delete_objects(self, **kwargs: Any) -> Any:
        keys = [o["Key"] for o in kwargs["Delete"]["Objects"]]
        return {"Errors": [{"Key": k, "Code": "AccessDenied"} for k in keys]}


def test_retention_reports_a_refused_delete_instead_of_claiming_success(s3: S3Harness) -> None:
    ids = [s3.make().publish(files(i), target=TARGET).version for i in range(2)]
    store = s3.make(client=RefusesDeletes(s3.client), conditional_writes=False)
    with pytest.raises(StoreError, match=r"v000001/manifest.json: AccessDenied"):
        store.retain(keep=1)
    assert store.versions() == ids


MEMORY = textwrap.dedent(
    """
    import resource, sys
    from atlas_sidecar.learning.objectstore import ObjectStore
    from atlas_sidecar.learning.store import TargetIdentity
    store = ObjectStore(sys.argv[1], sys.argv[2], part_bytes=5 << 20)
    target = TargetIdentity("smollm2-135m-instruct", "main", 576, 49152, "ab12" * 16)
    store.publish({"warm.bin": b"w" * 4096}, target=target)  # load botocore's models first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    store.publish({"head.safetensors": sys.argv[3]}, target=target)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) >> 10)
    """
)


def test_upload_of_a_large_file_holds_a_few_parts_not_the_file(
    s3: S3Harness, tmp_path: Path
) -> None:
    source = tmp_path / "big.bin"
    with open(source, "wb") as out:
        for _ in range(48):
            out.write(os.urandom(1 << 20))
    grown_mib = subprocess.run(
        [sys.executable, "-c", MEMORY, s3.bucket, s3.prefix, str(source)],
        env=child_env(s3.endpoint), cwd=tmp_path, capture_output=True, check=True,
    ).stdout  # fmt: skip
    # measured here: 5-22 MiB (a few 5 MiB parts in flight); a publisher that reads the
    # whole file into memory first grows by ~53 MiB. Noise rules out a tighter bound.
    assert int(grown_mib) < 40, f"a 48 MiB upload grew the publisher by {int(grown_mib)} MiB"


class SlowsDown(IgnoresConditions):
    """A client whose reads of keys containing ``part`` fail as a throttled S3 does."""

    def __init__(self, client: Any, part: str) -> None:
        super().__init__(client)
        self._part = part

    def put_object(self, **kwargs: Any) -> Any:
        return self._client.put_object(**kwargs)

    def get_object(self, **kwargs: Any) -> Any:
        if self._part in kwargs["Key"]:
            error = {"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}
            raise ClientError(error, "GetObject")  # type: ignore[arg-type]
        return self._client.get_object(**kwargs)


def test_unreadable_store_is_no_verdict_no_fallback_and_no_deletion(s3: S3Harness) -> None:
    store = s3.make()
    ids = [store.publish(files(i), target=TARGET).version for i in range(3)]
    store.mark_serving(ids[0], holder="pod-a")
    throttled = s3.make(client=SlowsDown(s3.client, f"{ids[2]}/suffix.bin"))
    with pytest.raises(StoreUnavailable, match="SlowDown"):  # not a fallback to ids[1]
        throttled.latest_verified(TARGET)
    blind = s3.make(client=SlowsDown(s3.client, ".serving/pod-a"))
    with pytest.raises(StoreUnavailable, match="SlowDown"):
        blind.retain(keep=1)
    assert store.versions() == ids, "retention acted without reading the serving marks"
