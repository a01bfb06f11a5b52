"""The weights-store fixtures: moto's S3 server (a real HTTP server in a subprocess on a
loopback port, not the in-process mock) and one harness per store kind, so the shared
contract tests run against ``DirectoryStore`` and ``ObjectStore`` alike."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from atlas_sidecar.learning.store import LATEST, MANIFEST, DirectoryStore, version_number

# Fake credentials for moto only; set before any client is made, never real ones.
MOTO_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"moto server exited: {log.read_text()[-2000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"moto server did not listen in 30 s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a moto S3 server for the whole session.

    Its working directory is a fresh empty one: ``python -m`` puts the cwd first on
    sys.path, and a stray module there (a ``cmd.py``) would shadow the stdlib.
    """
    workdir = tmp_path_factory.mktemp("moto")
    log = workdir / "server.log"
    port = _free_port()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in MOTO_ENV.items():
            patch.setenv(key, value)
        patch.delenv("AWS_PROFILE", raising=False)
        with open(log, "wb") as out:
            server = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                cwd=workdir, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ),
            )  # fmt: skip
        try:
            _wait_listening(port, server, log)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.terminate()
            server.wait(timeout=10)


@pytest.fixture
def s3_bucket(moto_endpoint: str) -> tuple[Any, str]:
    """A fresh bucket per test and a client on it."""
    from atlas_sidecar.learning.objectstore import _client

    client = _client(moto_endpoint)
    bucket = f"atlas-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


class DirHarness:
    """Reach under a ``DirectoryStore`` to damage it the way a disk or a person could."""

    kind = "dir"

    def __init__(self, root: Path) -> None:
        self.root = root

    def make(self, **options: Any) -> DirectoryStore:
        return DirectoryStore(self.root, **options)

    def read_raw(self, version: str, name: str) -> bytes:
        return (self.root / version / name).read_bytes()

    def write_raw(self, version: str, name: str, data: bytes) -> None:
        (self.root / version / name).write_bytes(data)

    def remove_raw(self, version: str, name: str) -> None:
        (self.root / version / name).unlink()

    def set_latest(self, version: str) -> None:
        (self.root / LATEST).write_text(version + "\n")

    def rename_version(self, old: str, new: str) -> None:
        os.rename(self.root / old, self.root / new)
        path = self.root / new / MANIFEST
        path.write_text(path.read_text().replace(old, new))

    def leftovers(self) -> list[str]:
        return [p.name for p in self.root.iterdir() if p.name.startswith(".tmp-")]


class S3Harness:
    """The same for an ``ObjectStore``: objects under ``bucket/prefix``."""

    kind = "s3"

    def __init__(self, client: Any, bucket: str, endpoint: str) -> None:
        self.client, self.bucket, self.endpoint = client, bucket, endpoint
        self.prefix = "weights/target-a"

    def make(self, **options: Any) -> Any:
        from atlas_sidecar.learning.objectstore import ObjectStore

        options.setdefault("client", self.client)
        return ObjectStore(self.bucket, self.prefix, **options)

    def key(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts])

    def read_raw(self, version: str, name: str) -> bytes:
        obj = self.client.get_object(Bucket=self.bucket, Key=self.key(version, name))
        return bytes(obj["Body"].read())

    def write_raw(self, version: str, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.key(version, name), Body=data)

    def remove_raw(self, version: str, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(version, name))

    def set_latest(self, version: str) -> None:
        self.client.put_object(
            Bucket=self.bucket, Key=self.key(LATEST), Body=(version + "\n").encode()
        )

    def rename_version(self, old: str, new: str) -> None:
        names = [k.rsplit("/", 1)[1] for k in self.keys() if k.startswith(self.key(old) + "/")]
        for name in names:
            data = self.read_raw(old, name)
            if name == MANIFEST:
                data = data.replace(old.encode(), new.encode())
            self.write_raw(new, name, data)
            self.remove_raw(old, name)

    def keys(self) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + "/"
        )
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    def leftovers(self) -> list[str]:
        """Keys of ids without a manifest, and incomplete multipart uploads."""
        keys = self.keys()
        done = {k.rsplit("/", 1)[0] for k in keys if k.endswith("/" + MANIFEST)}
        orphans = [
            k
            for k in keys
            if version_number(k.split("/")[2]) is not None and k.rsplit("/", 1)[0] not in done
        ]
        uploads = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=self.prefix)
        return orphans + [u["Key"] for u in uploads.get("Uploads", [])]


@pytest.fixture(params=["dir", "s3"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> DirHarness | S3Harness:
    """Each contract test once per store kind."""
    if request.param == "dir":
        return DirHarness(tmp_path / "store")
    client, bucket = request.getfixturevalue("s3_bucket")
    return S3Harness(client, bucket, request.getfixturevalue("moto_endpoint"))
