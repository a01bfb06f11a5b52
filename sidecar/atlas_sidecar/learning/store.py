"""The versioned weights store: the trainer publishes versions, sidecars and the operator read them.

A version is a set of files plus a ``manifest.json`` naming each file's size and sha256,
the target identity it was trained for, its parent, the training window, eval metrics
and when it was made. The manifest is always the last thing written, so a version
exists exactly when its manifest exists; readers verify every file against it before
handing a version out, so a torn, truncated or bit-flipped version is refused, never
served.

Version ids are ``v`` + a zero-padded counter (``v000042``): one more than the highest
id in the store. A counter, not a timestamp, because trainer pods on different nodes
disagree about the time and publish order must not depend on clocks; zero padding keeps
the lexicographic order of directory listings and object keys equal to publish order
(ids are still compared by their number, so the millionth version sorts right too).

Only the standard library is needed here. ``ObjectStore`` (objectstore.py) implements
the same interface on an S3-compatible object store with boto3; ``open_store(uri)``
picks one from a URI, importing boto3 only for ``s3://``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

FORMAT = "atlas-weights/1"
MANIFEST = "manifest.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
DEFAULT_STALE_AFTER_S = 3600.0
_CHUNK = 1 << 20
_VERSION_RE = re.compile(r"^v(\d{6,})$")
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HOLDER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

FileSource = bytes | str | os.PathLike[str]


class StoreError(Exception):
    """Anything the store refuses."""


class StoreUnavailable(StoreError):
    """The store could not be read or written (network, throttling, permissions): no
    verdict on any version, so readers must not fall back to an older one past it, and
    retention must not act on what it could not read."""


class VersionNotFound(StoreError):
    """No complete version by that id (never published, still being written, or deleted)."""


class CorruptVersion(StoreError):
    """A version whose manifest or files do not verify; the message names what is wrong."""


class WrongTarget(StoreError):
    """A version trained for another target model: loading it would draft garbage."""


def version_id(number: int) -> str:
    return f"v{number:06d}"


def version_number(version: str) -> int | None:
    """The counter of a version id, or None if ``version`` is not one."""
    match = _VERSION_RE.match(version)
    return int(match.group(1)) if match else None


def _check_holder(holder: str) -> str:
    if not _HOLDER_RE.match(holder):
        raise StoreError(f"holder {holder!r} must be letters, digits and ._-")
    return holder


def _check_file_name(name: str) -> str:
    if not _FILE_RE.match(name) or name == MANIFEST or name.startswith(TMP_PREFIX):
        raise StoreError(
            f"file name {name!r} must be 1..128 letters, digits and ._- starting with a "
            f"letter or digit, and not {MANIFEST!r}"
        )
    return name


@dataclass(frozen=True)
class TargetIdentity:
    """The target a version was trained for; a version for another target is refused.

    ``name``/``revision`` say which model; ``hidden_size``, ``vocab_size`` and
    ``fingerprint`` (e.g. the neural head's ``lm_head_sha256``) catch a model swapped
    under the same name. All fields must match.
    """

    name: str
    revision: str
    hidden_size: int
    vocab_size: int
    fingerprint: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TargetIdentity:
        try:
            return cls(
                str(data["name"]), str(data["revision"]), int(data["hidden_size"]),
                int(data["vocab_size"]), str(data.get("fingerprint", "")),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as err:
            raise StoreError(f"malformed target identity {dict(data)!r}: {err}") from err

    def mismatch(self, other: TargetIdentity) -> str | None:
        """None when ``other`` is this target, else a sentence naming the first difference."""
        for key in ("name", "revision", "hidden_size", "vocab_size", "fingerprint"):
            mine, theirs = getattr(self, key), getattr(other, key)
            if mine != theirs:
                return f"made for target {other.name!r} ({key} {theirs!r}), this is {mine!r}"
        return None


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What a version holds and where it came from; written last, read first."""

    version: str
    parent: str | None
    target: TargetIdentity
    files: tuple[FileEntry, ...]
    window: dict[str, Any] = field(default_factory=dict)  # e.g. first/last request ids, times
    metrics: dict[str, float] = field(default_factory=dict)
    created_at: str = ""  # ISO 8601 UTC
    format: str = FORMAT

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        data = asdict(self)
        data["files"] = [asdict(f) for f in self.files]
        return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> Manifest:
        """Parse and check a manifest; CorruptVersion naming ``where`` if it is not one."""
        try:
            data = json.loads(raw)
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT!r}")
            files = tuple(
                FileEntry(_check_file_name(str(f["name"])), int(f["size"]), str(f["sha256"]))
                for f in data["files"]
            )
            if len({f.name for f in files}) != len(files):
                raise ValueError("a file is listed twice")
            metrics = {str(k): float(v) for k, v in dict(data.get("metrics") or {}).items()}
            version = str(data["version"])
            if version_number(version) is None:
                raise ValueError(f"version {version!r} is not an id like v000042")
            return cls(
                version=version,
                parent=None if data.get("parent") is None else str(data["parent"]),
                target=TargetIdentity.from_dict(data["target"]),
                files=files,
                window=dict(data.get("window") or {}),
                metrics=metrics,
                created_at=str(data.get("created_at", "")),
            )
        except (ValueError, KeyError, TypeError, AttributeError, StoreError) as err:
            raise CorruptVersion(f"{where}: unreadable manifest: {err}") from err


@dataclass(frozen=True)
class Version:
    """A verified version: every file matched the manifest's size and sha256 when opened.

    ``paths`` is set by ``DirectoryStore`` (files are immutable once published, and
    retention never deletes the newest or a serving version); ``blobs`` holds the
    verified bytes when the store is remote.
    """

    manifest: Manifest
    paths: dict[str, Path] | None = None
    blobs: dict[str, bytes] | None = None

    @property
    def id(self) -> str:
        return self.manifest.version

    def read(self, name: str) -> bytes:
        if self.blobs is not None:
            return self.blobs[name]
        assert self.paths is not None
        return self.paths[name].read_bytes()


def _verify_manifest_target(manifest: Manifest, target: TargetIdentity | None) -> None:
    if target is not None:
        problem = target.mismatch(manifest.target)
        if problem:
            raise WrongTarget(f"version {manifest.version}: {problem}")


def _check_entry(version: str, entry: FileEntry, size: int, digest: str) -> None:
    if size != entry.size:
        raise CorruptVersion(
            f"version {version}: file {entry.name!r} has {size} bytes, manifest says {entry.size}"
        )
    if digest != entry.sha256:
        raise CorruptVersion(
            f"version {version}: file {entry.name!r} sha256 {digest[:16]}..., "
            f"manifest says {entry.sha256[:16]}..."
        )


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _select_retained(
    manifests: list[Manifest], keep: int, max_bytes: int | None, serving: set[str]
) -> list[str]:
    """Ids to delete: keep the newest ``keep`` and every protected one (``serving``: the
    serving marks and what ``latest`` names), then drop the oldest unprotected kept ones
    until the total fits ``max_bytes``. The newest is never dropped: a watcher may be
    loading it right now. So the bound can be exceeded by the protected versions."""
    if keep < 1:
        raise StoreError("keep must be at least 1: the newest version is never deleted")
    newest_first = sorted(manifests, key=lambda m: version_number(m.version) or 0, reverse=True)
    kept = [m for i, m in enumerate(newest_first) if i < keep or m.version in serving]
    if max_bytes is not None:
        total = sum(m.total_bytes for m in kept)
        for m in reversed(kept[1:]):  # oldest first, never the newest
            if total <= max_bytes:
                break
            if m.version not in serving:
                kept.remove(m)
                total -= m.total_bytes
    keep_ids = {m.version for m in kept}
    return [m.version for m in newest_first if m.version not in keep_ids]


class WeightsStore(Protocol):
    """What the trainer, the sidecar's watcher and the operator use."""

    def publish(
        self,
        files: Mapping[str, FileSource],
        *,
        target: TargetIdentity,
        parent: str | None = None,
        window: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> Manifest: ...

    def versions(self) -> list[str]: ...

    def manifest(self, version: str) -> Manifest: ...

    def open_version(self, version: str, target: TargetIdentity | None = None) -> Version: ...

    def latest(self) -> str | None: ...

    def latest_verified(
        self,
        target: TargetIdentity | None = None,
        on_skip: Callable[[str, StoreError], None] | None = None,
    ) -> Version | None: ...

    def mark_serving(self, version: str | None, holder: str = "default") -> None: ...

    def serving(self) -> set[str]: ...

    def retain(self, keep: int, max_bytes: int | None = None) -> list[str]: ...


def _latest_verified(
    store: WeightsStore,
    target: TargetIdentity | None,
    on_skip: Callable[[str, StoreError], None] | None,
) -> Version | None:
    """The newest version that verifies (and fits ``target``); bad ones are reported and
    skipped, so one corrupt publish falls back to the previous good version."""
    for version in reversed(store.versions()):
        try:
            return store.open_version(version, target)
        except VersionNotFound:
            continue  # deleted by retention while we looked
        except StoreUnavailable:
            raise  # says nothing about the version: falling back would downgrade on a blip
        except StoreError as err:
            if on_skip is not None:
                on_skip(version, err)
    return None


# ---------------------------------------------------------------------------------------
# Directory store


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    """Write ``path`` through a temp file + fsync + rename: readers see old or new, whole."""
    tmp = path.parent / f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def _copy_hashing(source: FileSource, dest: Path) -> FileEntry:
    """Write ``source`` to ``dest``, fsynced, and return its size and sha256."""
    digest, size = hashlib.sha256(), 0
    with open(dest, "wb") as out:
        if isinstance(source, bytes):
            digest.update(source)
            out.write(source)
            size = len(source)
        else:
            with open(source, "rb") as src:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(dest, 0o644)
    return FileEntry(dest.name, size, digest.hexdigest())


def _hash_file(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as src:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _newest_mtime(path: Path) -> float:
    """The newest mtime of a directory and its entries: a slow publisher still writing a
    large file keeps its staging directory young."""
    newest = path.lstat().st_mtime
    with contextlib.suppress(OSError):
        for entry in os.scandir(path):
            with contextlib.suppress(OSError):
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    return newest


class DirectoryStore:
    """A store in a local directory or a mounted volume (PVC).

    Layout::

        root/
          v000041/  manifest.json  head.safetensors  suffix.bin ...
          v000042/  ...
          latest                 "v000042": the newest complete version
          .serving/<holder>      "v000041": a version someone serves (kept by retention)
          .publish.lock          serialises id allocation and the rename into place
          .tmp-*                 staging (and doomed) directories; readers never look

    Publishing stages every file in a ``.tmp-*`` directory inside ``root`` (same
    filesystem, so the final rename is atomic), fsyncs each, writes the manifest last
    (temp + fsync + rename), fsyncs the staging directory, renames it to its version id
    and fsyncs ``root``, then updates ``latest`` (temp + fsync + rename). A publisher killed
    at any point leaves either a ``.tmp-*`` directory (invisible, cleaned by a later
    publisher once older than ``stale_after_s``) or a complete version.
    """

    def __init__(self, root: str | os.PathLike[str],
                 stale_after_s: float = DEFAULT_STALE_AFTER_S) -> None:  # fmt: skip
        self.root = Path(root)
        self.stale_after_s = stale_after_s
        self.root.mkdir(parents=True, exist_ok=True)

    # -- publishing ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """An exclusive flock, released by the kernel if the holder is killed."""
        with open(self.root / ".publish.lock", "a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def publish(
        self,
        files: Mapping[str, FileSource],
        *,
        target: TargetIdentity,
        parent: str | None = None,
        window: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> Manifest:
        """Publish ``files`` (name -> bytes or a path to copy) as the next version.

        ``parent`` defaults to the current latest version. Returns the manifest written.
        """
        if not files:
            raise StoreError("a version needs at least one file")
        for name in files:
            _check_file_name(name)
        self.clean_stale()
        stage = self.root / f"{TMP_PREFIX}pub-{os.getpid()}-{uuid.uuid4().hex}"
        stage.mkdir()
        try:
            entries = tuple(_copy_hashing(src, stage / name) for name, src in sorted(files.items()))
            with self._lock():
                number = self._next_number()
                manifest = Manifest(
                    version=version_id(number),
                    parent=parent if parent is not None else self.latest(),
                    target=target,
                    files=entries,
                    window=dict(window or {}),
                    metrics={str(k): float(v) for k, v in (metrics or {}).items()},
                    created_at=_now_iso(),
                )
                _write_durable(stage / MANIFEST, manifest.to_json())
                final = self.root / manifest.version
                os.rename(stage, final)  # fails if the id exists: ids are never reused
                _fsync_dir(self.root)
                _write_durable(self.root / LATEST, (manifest.version + "\n").encode())
            return manifest
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)

    def _next_number(self) -> int:
        """One more than any id present, or named by ``latest`` (retention never deletes
        the newest, so the highest id never goes away and ids are never reused)."""
        numbers = [version_number(v) or 0 for v in self._listed()]
        latest = self.latest()
        if latest is not None:
            numbers.append(version_number(latest) or 0)
        return max(numbers, default=0) + 1

    def clean_stale(self, stale_after_s: float | None = None) -> list[str]:
        """Remove ``.tmp-*`` leftovers older than the threshold; return their names."""
        limit = self.stale_after_s if stale_after_s is None else stale_after_s
        now, removed = time.time(), []
        marks = self.root / ".serving"
        entries = [*os.scandir(self.root), *(os.scandir(marks) if marks.is_dir() else [])]
        for entry in entries:
            if not entry.name.startswith(TMP_PREFIX):
                continue
            path = Path(entry.path)
            try:
                if now - _newest_mtime(path) < limit:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed.append(entry.name)
            except FileNotFoundError:
                continue  # its publisher finished or another cleaner got there first
        return removed

    # -- reading -------------------------------------------------------------------------

    def _listed(self) -> list[str]:
        names = []
        for entry in os.scandir(self.root):
            if version_number(entry.name) is not None and entry.is_dir(follow_symlinks=False):
                names.append(entry.name)
        return names

    def versions(self) -> list[str]:
        """Ids of versions whose manifest exists, oldest first (not yet file-verified)."""
        present = [v for v in self._listed() if (self.root / v / MANIFEST).is_file()]
        return sorted(present, key=lambda v: version_number(v) or 0)

    def manifest(self, version: str) -> Manifest:
        if version_number(version) is None:
            raise VersionNotFound(f"{version!r} is not a version id")
        path = self.root / version / MANIFEST
        try:
            raw = path.read_bytes()
        except FileNotFoundError as err:
            raise VersionNotFound(f"no complete version {version} in {self.root}") from err
        manifest = Manifest.from_json(raw, str(path))
        if manifest.version != version:
            raise CorruptVersion(f"{path}: manifest names version {manifest.version}")
        return manifest

    def open_version(self, version: str, target: TargetIdentity | None = None) -> Version:
        """The version's file paths after every file matched the manifest's size and sha256.

        CorruptVersion names the file that does not; WrongTarget if trained for another
        target; VersionNotFound if it is not (or no longer) there.
        """
        manifest = self.manifest(version)
        _verify_manifest_target(manifest, target)
        paths = {}
        for entry in manifest.files:
            path = self.root / version / entry.name
            try:
                size, digest = _hash_file(path)
            except FileNotFoundError as err:
                if not (self.root / version / MANIFEST).exists():
                    raise VersionNotFound(f"version {version} was deleted while read") from err
                raise CorruptVersion(f"version {version}: file {entry.name!r} is missing") from err
            _check_entry(version, entry, size, digest)
            paths[entry.name] = path
        return Version(manifest, paths=paths)

    def latest(self) -> str | None:
        """What the ``latest`` pointer names (None if nothing was published yet)."""
        try:
            text = (self.root / LATEST).read_text(encoding="utf-8").strip()
        except (FileNotFoundError, UnicodeDecodeError):
            return None
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
        _check_holder(holder)
        marks = self.root / ".serving"
        marks.mkdir(exist_ok=True)
        if version is None:
            with contextlib.suppress(FileNotFoundError):
                (marks / holder).unlink()
            return
        if version_number(version) is None:
            raise StoreError(f"{version!r} is not a version id")
        _write_durable(marks / holder, (version + "\n").encode())

    def serving(self) -> set[str]:
        marks = self.root / ".serving"
        if not marks.is_dir():
            return set()
        found = set()
        for entry in os.scandir(marks):
            if entry.name.startswith(TMP_PREFIX):
                continue
            with contextlib.suppress(OSError, UnicodeDecodeError):
                text = Path(entry.path).read_text(encoding="utf-8").strip()
                if version_number(text) is not None:
                    found.add(text)
        return found

    def retain(self, keep: int, max_bytes: int | None = None) -> list[str]:
        """Delete all but the newest ``keep`` versions and the serving ones, then the oldest
        unprotected ones until the rest fit ``max_bytes``; return the ids deleted.

        A version is first renamed to a ``.tmp-*`` name (one atomic step: readers see it
        whole or not at all), then removed; a kill in between leaves only a leftover.
        """
        with self._lock():
            manifests = []
            for version in self.versions():
                try:
                    manifests.append(self.manifest(version))
                except CorruptVersion:
                    continue  # never counted, never protected: left for an operator to look at
            protected = self.serving() | {v for v in [self.latest()] if v is not None}
            doomed = _select_retained(manifests, keep, max_bytes, protected)
            for version in doomed:
                grave = self.root / f"{TMP_PREFIX}del-{version}-{uuid.uuid4().hex}"
                os.rename(self.root / version, grave)
                _fsync_dir(self.root)
                shutil.rmtree(grave, ignore_errors=True)
        return doomed


# ---------------------------------------------------------------------------------------
# Choosing a store


def open_store(
    uri: str | os.PathLike[str], *, endpoint_url: str | None = None, **options: Any
) -> WeightsStore:
    """The store a URI names: ``s3://bucket/prefix`` -> ``ObjectStore`` (endpoint from
    ``endpoint_url`` or env ``AWS_ENDPOINT_URL``, credentials from boto3's standard
    chain), ``file:///path`` or a plain path -> ``DirectoryStore``. ``options`` go to the
    store's constructor (e.g. ``stale_after_s``). One entry point, so every component
    (trainer, sidecar, operator) takes the same configuration string."""
    text = os.fspath(uri)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return DirectoryStore(text, **options)
    if scheme == "file":
        if not rest.startswith("/"):
            raise StoreError(f"{text!r}: a file URI needs an absolute path (file:///...)")
        return DirectoryStore(rest, **options)
    if scheme == "s3":
        from atlas_sidecar.learning.objectstore import ObjectStore

        bucket, _, prefix = rest.partition("/")
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        return ObjectStore(bucket, prefix, endpoint_url=endpoint, **options)
    raise StoreError(f"{text!r}: unknown store scheme {scheme!r} (s3://, file:// or a path)")
