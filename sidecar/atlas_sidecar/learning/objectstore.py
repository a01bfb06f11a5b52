"""The weights store on an S3-compatible object store (AWS S3, MinIO, moto's server).

Same contract as ``DirectoryStore`` (see store.py): a version exists exactly when its
manifest object exists, and readers verify every file's size and sha256 before a
version is handed out. Layout under ``s3://bucket/prefix/``::

    v000042/.claim            who took this id and when (a conditional put: one winner)
    v000042/head.safetensors  the files, uploaded after the claim
    v000042/manifest.json     written last, also conditionally: from here on it exists
    latest                    "v000042": the newest published id (compare-and-swap)
    .serving/<holder>         "v000041": a version someone serves (kept by retention)

Id allocation: a publisher takes ``v(n)`` by writing its ``.claim`` with
``If-None-Match: *``; the server refuses (412) all but the first writer, and the loser
tries ``n + 1``. Files then go under the claimed id, so two publishers never write the
same key. AWS S3 supports conditional writes (``If-None-Match`` on PutObject since
Aug 2024, ``If-Match`` since Nov 2024), as do MinIO and moto; a server that silently
ignores them would let two publishers take one id, so the first publish of each store
probes for it and refuses to go on without (``conditional_writes=False`` opts out, for
a deployment with exactly one publisher).

A publisher killed mid-publish leaves a claimed id without a manifest (and maybe an
incomplete multipart upload): invisible to readers, removed by a later publisher once
every object and upload part under it is older than ``stale_after_s``. Ages are
measured against the server's clock (its ``Date`` header), not the pod's.

Credentials come only from boto3's standard chain (env, config files, IRSA, instance
roles); this module never reads, stores or logs them. ``endpoint_url`` (or env
``AWS_ENDPOINT_URL``) points it at an S3-compatible server.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from atlas_sidecar.learning.store import (
    _CHUNK,
    DEFAULT_STALE_AFTER_S,
    LATEST,
    MANIFEST,
    CorruptVersion,
    FileEntry,
    FileSource,
    Manifest,
    StoreError,
    StoreUnavailable,
    TargetIdentity,
    Version,
    VersionNotFound,
    _check_entry,
    _check_file_name,
    _check_holder,
    _latest_verified,
    _now_iso,
    _select_retained,
    _verify_manifest_target,
    version_id,
    version_number,
)

CLAIM = ".claim"
SERVING = ".serving/"
MAX_MANIFEST_BYTES = 1 << 20
MAX_POINTER_BYTES = 1024
DEFAULT_MAX_FILE_BYTES = 4 << 30
_MIN_PART = 5 << 20  # S3's smallest multipart part
_MISSING = {"NoSuchKey", "404", "NotFound"}
_CONFLICT = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_MAX_CLAIM_TRIES = 1000


def _code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


class _HashingReader:
    """A read-only stream over ``source`` that hashes exactly the bytes it hands out, so
    the manifest describes what was uploaded. No ``seek``: s3transfer then reads it
    sequentially, one part at a time (memory stays a few parts, not the file)."""

    def __init__(self, source: FileSource) -> None:
        self._digest = hashlib.sha256()
        self.size = 0
        self._file = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115

    def read(self, n: int = -1) -> bytes:
        chunk = self._file.read(n)
        self._digest.update(chunk)
        self.size += len(chunk)
        return chunk

    def close(self) -> None:
        self._file.close()

    def entry(self, name: str) -> FileEntry:
        return FileEntry(name, self.size, self._digest.hexdigest())


@dataclass
class _Listing:
    """One listing of the prefix: which ids have manifests, claims and files, their
    newest modification times, and the server's clock when it was taken."""

    now: datetime
    manifests: set[int] = field(default_factory=set)
    keys: dict[int, list[str]] = field(default_factory=dict)
    newest: dict[int, datetime] = field(default_factory=dict)

    def add(self, number: int, key: str, name: str, modified: datetime) -> None:
        self.keys.setdefault(number, []).append(key)
        self.newest[number] = max(modified, self.newest.get(number, modified))
        if name == MANIFEST:
            self.manifests.add(number)


class ObjectStore:
    """A ``WeightsStore`` in ``bucket`` under ``prefix`` (see the module docstring)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        client: Any = None,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        part_bytes: int = 8 << 20,
        conditional_writes: bool = True,
    ) -> None:
        if not bucket:
            raise StoreError("an object store needs a bucket")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.stale_after_s = stale_after_s
        self.max_file_bytes = max_file_bytes
        self.client = client if client is not None else _client(endpoint_url)
        self._transfer = TransferConfig(
            multipart_threshold=max(part_bytes, _MIN_PART),
            multipart_chunksize=max(part_bytes, _MIN_PART),
            max_concurrency=2,
            use_threads=True,
        )
        self._transfer.max_in_memory_upload_chunks = 4  # an upload holds <= 4 parts
        self._probe_needed = conditional_writes

    def __repr__(self) -> str:
        return f"ObjectStore(s3://{self.bucket}/{self.prefix})"

    # -- small objects -------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    def _get(self, key: str, cap: int) -> tuple[bytes, str] | None:
        """The object's bytes and ETag, None if absent; StoreError past ``cap`` bytes (a
        pointer or manifest that large is not one, and is never read into memory)."""
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=key)
        except BotoCoreError as err:
            raise StoreUnavailable(f"s3://{self.bucket}/{key}: {err}") from err
        except ClientError as err:
            if _code(err) in _MISSING:
                return None
            raise StoreUnavailable(f"s3://{self.bucket}/{key}: {_code(err)}") from err
        body = obj["Body"]
        try:
            if obj.get("ContentLength", 0) > cap:
                raise StoreError(f"s3://{self.bucket}/{key}: over {cap} bytes")
            return body.read(cap + 1), obj.get("ETag", "")
        finally:
            body.close()

    def _put_new(self, key: str, data: bytes) -> bool:
        """Create ``key`` only if absent (If-None-Match: *); False if it already exists."""
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as err:
            if _code(err) in _CONFLICT:
                return False
            raise StoreUnavailable(f"s3://{self.bucket}/{key}: {_code(err)}") from err
        return True

    def _delete(self, keys: list[str]) -> None:
        """Delete ``keys`` (1000 a request); StoreError naming the first that failed, so
        retention never reports a version deleted whose manifest is still there."""
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            done = self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
            )
            for error in done.get("Errors", [])[:1]:
                raise StoreUnavailable(
                    f"s3://{self.bucket}/{error.get('Key')}: {error.get('Code')}"
                )

    # -- listing -------------------------------------------------------------------------

    def _list(self) -> _Listing:
        """Every version-id key under the prefix, grouped by id (one paginated listing)."""
        listing: _Listing | None = None
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        )
        for page in pages:
            if listing is None:
                listing = _Listing(_server_now(page))
            for obj in page.get("Contents", []):
                head, _, name = obj["Key"][len(self.prefix) :].partition("/")
                number = version_number(head)
                if number is not None and name and "/" not in name:
                    listing.add(number, obj["Key"], name, obj["LastModified"])
        return listing if listing is not None else _Listing(datetime.now(UTC))

    def versions(self) -> list[str]:
        """Ids of versions whose manifest exists, oldest first (not yet file-verified)."""
        return [version_id(n) for n in sorted(self._list().manifests)]

    # -- publishing ----------------------------------------------------------------------

    def publish(
        self,
        files: Mapping[str, FileSource],
        *,
        target: TargetIdentity,
        parent: str | None = None,
        window: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> Manifest:
        """Publish ``files`` (name -> bytes or a path, streamed) as the next version.

        ``parent`` defaults to the newest complete version below the new id when the
        manifest is written (two publishers at once may both name the same parent:
        ids stay unique, the chain may fork). Returns the manifest written.
        """
        if not files:
            raise StoreError("a version needs at least one file")
        for name in files:
            _check_file_name(name)
        self._probe_conditional_writes()
        number, token = self._claim(self._clean(None)[0])
        try:
            entries = tuple(self._upload(number, name, src) for name, src in sorted(files.items()))
            self._check_claim(number, token)
            manifest = Manifest(
                version_id(number), parent if parent is not None else self._parent_of(number),
                target, entries, dict(window or {}),
                {str(k): float(v) for k, v in (metrics or {}).items()}, _now_iso(),
            )  # fmt: skip
            if not self._put_new(self._key(manifest.version, MANIFEST), manifest.to_json()):
                raise StoreError(f"{manifest.version} was published by someone else")
        except BaseException:
            self._abandon(number, token)
            raise
        self._advance_latest(number)
        return manifest

    def _probe_conditional_writes(self) -> None:
        """Once per store: refuse to publish on a server that ignores If-None-Match,
        where two publishers could both take one id and overwrite each other's files."""
        if not self._probe_needed:
            return
        key = self._key(f".probe-{uuid.uuid4().hex}")
        try:
            first, second = self._put_new(key, b"1"), self._put_new(key, b"2")
        finally:
            self._delete([key])
        if not (first and not second):
            raise StoreError(
                f"s3://{self.bucket}: the server ignores If-None-Match, so concurrent "
                "publishers are unsafe; pass conditional_writes=False only if one "
                "publisher ever writes this prefix"
            )
        self._probe_needed = False

    def _claim(self, listing: _Listing) -> tuple[int, str]:
        """Take the lowest free id above every id seen in objects, uploads and ``latest``:
        ids are never reused, since retention never deletes the newest."""
        seen = list(listing.newest)
        latest = self.latest()
        if latest is not None:
            seen.append(version_number(latest) or 0)
        number = max(seen, default=0) + 1
        token = uuid.uuid4().hex
        body = json.dumps({"token": token, "at": _now_iso()}).encode()
        for _ in range(_MAX_CLAIM_TRIES):
            if self._put_new(self._key(version_id(number), CLAIM), body):
                return number, token
            number += 1
        raise StoreError(f"no free version id after {_MAX_CLAIM_TRIES} tries")

    def _check_claim(self, number: int, token: str) -> None:
        """Our claim must still be there: a cleaner that judged us stale (an upload
        slower than ``stale_after_s``) may have removed files we wrote."""
        found = self._get(self._key(version_id(number), CLAIM), MAX_POINTER_BYTES)
        if found is None or json.loads(found[0]).get("token") != token:
            raise StoreError(
                f"{version_id(number)}: claim lost (upload slower than stale_after_s?)"
            )

    def _upload(self, number: int, name: str, source: FileSource) -> FileEntry:
        reader = _HashingReader(source)
        try:
            self.client.upload_fileobj(
                reader, self.bucket, self._key(version_id(number), name), Config=self._transfer
            )
        finally:
            reader.close()
        return reader.entry(name)

    def _abandon(self, number: int, token: str) -> None:
        """Best effort: remove a failed publish's objects now (else the cleaner will)."""
        try:
            found = self._get(self._key(version_id(number), CLAIM), MAX_POINTER_BYTES)
            if found is not None and json.loads(found[0]).get("token") == token:
                keys = self._list().keys.get(number, [])
                claim = self._key(version_id(number), CLAIM)
                self._delete([k for k in keys if k != claim] + [claim])  # claim last
        except Exception:  # noqa: BLE001 - the original error matters, not this one
            pass

    def _parent_of(self, number: int) -> str | None:
        below = [n for n in self._list().manifests if n < number]
        return version_id(max(below)) if below else None

    def _advance_latest(self, number: int) -> None:
        """Move ``latest`` to ``number`` unless it already names a newer id; a
        compare-and-swap on its ETag, so racing publishers never move it backwards."""
        key = self._key(LATEST)
        body = (version_id(number) + "\n").encode()
        for _ in range(100):
            found = self._get(key, MAX_POINTER_BYTES)
            if found is None:
                if self._put_new(key, body):
                    return
                continue
            current = version_number(found[0].decode(errors="replace").strip()) or 0
            if current >= number:
                return
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=body, IfMatch=found[1])
                return
            except ClientError as err:
                if _code(err) not in _CONFLICT:
                    raise StoreUnavailable(f"s3://{self.bucket}/{key}: {_code(err)}") from err

    # -- clean-up ------------------------------------------------------------------------

    def clean_stale(self, stale_after_s: float | None = None) -> list[str]:
        """Remove what crashed publishers left: ids without a manifest whose every object
        and upload part is older than the threshold, with their incomplete multipart
        uploads. Returns the ids cleaned."""
        return self._clean(stale_after_s)[1]

    def _clean(self, stale_after_s: float | None) -> tuple[_Listing, list[str]]:
        limit = self.stale_after_s if stale_after_s is None else stale_after_s
        listing, uploads = self._list(), self._uploads()
        for number, found in uploads.items():
            for _, _, newest in found:
                listing.newest[number] = max(newest, listing.newest.get(number, newest))
        cleaned = []
        for number, newest in sorted(listing.newest.items()):
            if number in listing.manifests or (listing.now - newest).total_seconds() < limit:
                continue
            for key, upload_id, _ in uploads.get(number, []):
                self._abort(key, upload_id)
            self._delete(listing.keys.get(number, []))
            cleaned.append(version_id(number))
        return listing, cleaned

    def _uploads(self) -> dict[int, list[tuple[str, str, datetime]]]:
        """Incomplete multipart uploads by id: (key, upload id, newest activity), where
        activity is the newest part's time (or the start): a slow upload stays young."""
        found: dict[int, list[tuple[str, str, datetime]]] = {}
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        )
        for page in pages:
            for upload in page.get("Uploads", []):
                head = upload["Key"][len(self.prefix) :].partition("/")[0]
                number = version_number(head)
                if number is None:
                    continue
                newest = self._newest_part(upload["Key"], upload["UploadId"])
                started = upload["Initiated"]
                entry = (upload["Key"], upload["UploadId"], max(started, newest or started))
                found.setdefault(number, []).append(entry)
        return found

    def _newest_part(self, key: str, upload_id: str) -> datetime | None:
        try:
            parts = self.client.list_parts(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except ClientError:
            return None  # completed or aborted meanwhile
        return max((p["LastModified"] for p in parts.get("Parts", [])), default=None)

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except ClientError as err:
            if _code(err) not in _MISSING | {"NoSuchUpload"}:
                raise

    # -- reading -------------------------------------------------------------------------

    def manifest(self, version: str) -> Manifest:
        if version_number(version) is None:
            raise VersionNotFound(f"{version!r} is not a version id")
        key = self._key(version, MANIFEST)
        try:
            found = self._get(key, MAX_MANIFEST_BYTES)
        except StoreUnavailable:
            raise
        except StoreError as err:  # over the cap: not a manifest
            raise CorruptVersion(str(err)) from err
        if found is None:
            raise VersionNotFound(f"no complete version {version} in s3://{self.bucket}")
        where = f"s3://{self.bucket}/{key}"
        manifest = Manifest.from_json(found[0], where)
        if manifest.version != version:
            raise CorruptVersion(f"{where}: manifest names version {manifest.version}")
        return manifest

    def open_version(self, version: str, target: TargetIdentity | None = None) -> Version:
        """The version's bytes after every file matched the manifest's size and sha256.

        CorruptVersion names the file that does not; WrongTarget if trained for another
        target; VersionNotFound if it is not (or no longer) there; StoreError if a file
        is over ``max_file_bytes`` (never read into memory).
        """
        manifest = self.manifest(version)
        _verify_manifest_target(manifest, target)
        blobs = {}
        for entry in manifest.files:
            if entry.size > self.max_file_bytes:
                raise StoreError(
                    f"version {version}: file {entry.name!r} is {entry.size} bytes, "
                    f"over max_file_bytes={self.max_file_bytes}"
                )
            blobs[entry.name] = self._read_verified(version, entry)
        return Version(manifest, blobs=blobs)

    def _read_verified(self, version: str, entry: FileEntry) -> bytes:
        """Stream one file, reading at most ``entry.size + 1`` bytes, and check it."""
        key = self._key(version, entry.name)
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=key)
            data, digest = self._read_body(obj["Body"], entry.size + 1)
        except BotoCoreError as err:  # connection lost mid-stream, timeouts
            raise StoreUnavailable(f"s3://{self.bucket}/{key}: {err}") from err
        except ClientError as err:
            if _code(err) not in _MISSING:
                raise StoreUnavailable(f"s3://{self.bucket}/{key}: {_code(err)}") from err
            if self._get(self._key(version, MANIFEST), MAX_MANIFEST_BYTES) is None:
                raise VersionNotFound(f"version {version} was deleted while read") from err
            raise CorruptVersion(f"version {version}: file {entry.name!r} is missing") from err
        size = obj.get("ContentLength", len(data)) if len(data) > entry.size else len(data)
        _check_entry(version, entry, size, digest)
        return bytes(data)

    @staticmethod
    def _read_body(body: Any, limit: int) -> tuple[bytearray, str]:
        """Up to ``limit`` bytes of a streaming body, in chunks, and their sha256."""
        digest, data = hashlib.sha256(), bytearray()
        try:
            while len(data) < limit and (chunk := body.read(min(_CHUNK, limit - len(data)))):
                data += chunk
                digest.update(chunk)
        finally:
            body.close()
        return data, digest.hexdigest()

    def latest(self) -> str | None:
        """What the ``latest`` object names (None if nothing was published yet)."""
        try:
            found = self._get(self._key(LATEST), MAX_POINTER_BYTES)
        except StoreUnavailable:
            raise
        except StoreError:  # over the cap: not a pointer
            return None
        if found is None:
            return None
        text = found[0].decode(errors="replace").strip()
        return text if version_number(text) is not None else None

    def latest_verified(
        self,
        target: TargetIdentity | None = None,
        on_skip: Callable[[str, StoreError], None] | None = None,
    ) -> Version | None:
        return _latest_verified(self, target, on_skip)

    # -- serving marks and retention -----------------------------------------------------

    def mark_serving(self, version: str | None, holder: str = "default") -> None:
        """Record that ``holder`` serves ``version`` (None clears it): retention keeps it."""
        key = self._key(SERVING + _check_holder(holder))
        if version is None:
            self._delete([key])
            return
        if version_number(version) is None:
            raise StoreError(f"{version!r} is not a version id")
        self.client.put_object(Bucket=self.bucket, Key=key, Body=(version + "\n").encode())

    def serving(self) -> set[str]:
        found = set()
        for key in self._keys(self._key(SERVING)):
            try:
                got = self._get(key, MAX_POINTER_BYTES)
            except StoreUnavailable:
                raise  # an unread mark must stop retention, not unprotect its version
            except StoreError:  # over the cap: not a mark
                continue
            text = got[0].decode(errors="replace").strip() if got else ""
            if version_number(text) is not None:
                found.add(text)
        return found

    def _keys(self, prefix: str) -> Iterator[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        for page in pages:
            yield from (obj["Key"] for obj in page.get("Contents", []))

    def retain(self, keep: int, max_bytes: int | None = None) -> list[str]:
        """Delete all but the newest ``keep`` versions and the serving ones, then the oldest
        unprotected ones until the rest fit ``max_bytes``; return the ids deleted.

        The manifest goes first (one delete: readers see the version whole or not at
        all), then its files; a kill in between leaves files the cleaner removes.
        """
        listing = self._list()
        manifests = []
        for number in sorted(listing.manifests):
            try:
                manifests.append(self.manifest(version_id(number)))
            except (CorruptVersion, VersionNotFound):
                continue  # never counted, never protected: left for an operator to look at
        protected = self.serving() | {v for v in [self.latest()] if v is not None}
        doomed = _select_retained(manifests, keep, max_bytes, protected)
        for version in doomed:
            manifest_key = self._key(version, MANIFEST)
            self._delete([manifest_key])
            number = version_number(version) or 0
            self._delete([k for k in listing.keys.get(number, []) if k != manifest_key])
        return doomed


def _server_now(page: Mapping[str, Any]) -> datetime:
    """The server's clock from a response's Date header (local time if it has none)."""
    date = page.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    try:
        return parsedate_to_datetime(date) if date else datetime.now(UTC)
    except (TypeError, ValueError):
        return datetime.now(UTC)


def _client(endpoint_url: str | None) -> Any:
    """An S3 client from boto3's standard credential chain; path-style addressing so
    S3-compatible servers on a bare host:port (MinIO, moto) work."""
    config = Config(s3={"addressing_style": "path"}, retries={"mode": "standard"})
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
