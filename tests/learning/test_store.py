"""The weights stores' contract, run against both ``DirectoryStore`` and ``ObjectStore`` (the
``harness`` fixture, see conftest.py): round trips, refusal of bad versions, retention; and
the directory store's own kill -9 safety, staging clean-up and concurrent publishers."""

from __future__ import annotations

import json
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

from atlas_sidecar.learning.store import (
    MANIFEST,
    TMP_PREFIX,
    CorruptVersion,
    DirectoryStore,
    StoreError,
    TargetIdentity,
    VersionNotFound,
    WrongTarget,
)

TARGET = TargetIdentity("smollm2-135m-instruct", "main", 576, 49152, "ab12" * 16)
OTHER = TargetIdentity("qwen2.5-coder-1.5b-instruct", "main", 1536, 151936, "cd34" * 16)
REPO = Path(__file__).resolve().parents[2]


def files(seed: int, size: int = 4096) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {
        "head.safetensors": rng.randbytes(size),
        "suffix.bin": rng.randbytes(size // 2 + 1),
        "calibration.json": json.dumps({"seed": seed}).encode(),
    }


def test_publish_then_open_round_trips_bytes_and_manifest(harness: Any, tmp_path: Path) -> None:
    store = harness.make()
    payload = files(1)
    source = tmp_path / "from-path.bin"
    source.write_bytes(b"copied from a path" * 100)
    manifest = store.publish(
        {**payload, "extra.bin": source},
        target=TARGET,
        window={"first_request": "r-10", "last_request": "r-99"},
        metrics={"acceptance": 0.61, "loss": 1.25},
    )
    assert manifest.version == "v000001" and manifest.parent is None
    version = store.open_version(manifest.version, TARGET)
    for name, data in payload.items():
        assert version.read(name) == data
    assert version.read("extra.bin") == source.read_bytes()
    assert version.manifest == manifest == store.manifest("v000001")
    assert version.manifest.window == {"first_request": "r-10", "last_request": "r-99"}
    assert version.manifest.metrics == {"acceptance": 0.61, "loss": 1.25}
    assert {f.name: f.size for f in manifest.files}["head.safetensors"] == 4096
    assert manifest.created_at.endswith("Z")
    on_disk = json.loads(harness.read_raw("v000001", MANIFEST))
    assert on_disk["target"]["hidden_size"] == 576


def test_versions_list_in_publish_order_and_latest_and_parent_follow(harness: Any) -> None:
    store = harness.make()
    published = [store.publish(files(i), target=TARGET).version for i in range(3)]
    assert published == ["v000001", "v000002", "v000003"]
    assert store.versions() == published
    assert store.latest() == "v000003"
    assert store.manifest("v000003").parent == "v000002"
    assert store.latest_verified(TARGET).id == "v000003"  # type: ignore[union-attr]


def test_ids_order_by_number_beyond_six_digits(harness: Any) -> None:
    store = harness.make()
    store.publish(files(0), target=TARGET)
    harness.rename_version("v000001", "v999999")  # as if a million were published
    harness.set_latest("v999999")
    assert store.publish(files(1), target=TARGET).version == "v1000000"
    assert store.versions() == ["v999999", "v1000000"]


def test_flipped_byte_is_refused_naming_the_file_and_previous_version_served(
    harness: Any,
) -> None:
    store = harness.make()
    good = store.publish(files(1), target=TARGET).version
    bad = store.publish(files(2), target=TARGET).version
    data = bytearray(harness.read_raw(bad, "suffix.bin"))
    data[100] ^= 0x01
    harness.write_raw(bad, "suffix.bin", bytes(data))
    with pytest.raises(CorruptVersion, match=r"v000002: file 'suffix.bin' sha256"):
        store.open_version(bad)
    skipped: list[tuple[str, StoreError]] = []
    assert store.latest_verified(TARGET, lambda v, e: skipped.append((v, e))).id == good  # type: ignore[union-attr]
    assert [v for v, _ in skipped] == [bad]


def test_truncated_file_is_refused_with_its_sizes(harness: Any) -> None:
    store = harness.make()
    good = store.publish(files(1), target=TARGET).version
    bad = store.publish(files(2), target=TARGET).version
    harness.write_raw(bad, "head.safetensors", harness.read_raw(bad, "head.safetensors")[:1000])
    with pytest.raises(
        CorruptVersion, match=r"'head.safetensors' has 1000 bytes, manifest says 4096"
    ):
        store.open_version(bad)
    assert store.latest_verified(TARGET).id == good  # type: ignore[union-attr]


def test_missing_file_is_refused_naming_it(harness: Any) -> None:
    store = harness.make()
    good = store.publish(files(1), target=TARGET).version
    bad = store.publish(files(2), target=TARGET).version
    harness.remove_raw(bad, "calibration.json")
    with pytest.raises(CorruptVersion, match=r"'calibration.json' is missing"):
        store.open_version(bad)
    assert store.latest_verified(TARGET).id == good  # type: ignore[union-attr]


def test_version_for_another_target_is_refused_and_skipped(harness: Any) -> None:
    store = harness.make()
    good = store.publish(files(1), target=TARGET).version
    other = store.publish(files(2), target=OTHER).version
    with pytest.raises(WrongTarget, match=r"made for target 'qwen2.5-coder-1.5b-instruct'"):
        store.open_version(other, TARGET)
    assert store.latest_verified(TARGET).id == good  # type: ignore[union-attr]
    assert store.latest_verified(OTHER).id == other  # type: ignore[union-attr]
    same_name = TargetIdentity(TARGET.name, TARGET.revision, 576, 49152, "ef56" * 16)
    with pytest.raises(WrongTarget, match=r"fingerprint"):
        store.open_version(good, same_name)


def test_garbled_manifest_is_refused_and_skipped(harness: Any) -> None:
    store = harness.make()
    good = store.publish(files(1), target=TARGET).version
    bad = store.publish(files(2), target=TARGET).version
    harness.write_raw(bad, MANIFEST, b'{"format": "atlas-weights/1", "vers')
    with pytest.raises(CorruptVersion, match=r"v000002/manifest.json: unreadable manifest"):
        store.open_version(bad)
    assert store.latest_verified(TARGET).id == good  # type: ignore[union-attr]


def test_unsafe_file_names_are_refused_before_anything_is_written(harness: Any) -> None:
    store = harness.make()
    for name in ("../escape", "sub/dir", MANIFEST, ".hidden", ""):
        with pytest.raises(StoreError, match="file name"):
            store.publish({name: b"x"}, target=TARGET)
    assert store.versions() == [] and store.latest() is None
    with pytest.raises(VersionNotFound):
        store.open_version("v000001")


def test_fresh_staging_dir_is_kept_and_old_one_is_cleaned_by_next_publish(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path, stale_after_s=600)
    young = tmp_path / f"{TMP_PREFIX}pub-young"
    old = tmp_path / f"{TMP_PREFIX}pub-old"
    for stage in (young, old):
        stage.mkdir()
        (stage / "head.safetensors").write_bytes(b"partial")
    an_hour_ago = time.time() - 3600
    for path in (old / "head.safetensors", old):
        os.utime(path, (an_hour_ago, an_hour_ago))
    store.publish(files(1), target=TARGET)
    assert young.exists(), "a concurrent slow publisher's staging dir must survive"
    assert not old.exists()
    assert store.versions() == ["v000001"]


PUBLISHER = textwrap.dedent(
    """
    import os, sys
    from atlas_sidecar.learning.store import DirectoryStore, TargetIdentity
    store = DirectoryStore(sys.argv[1])
    target = TargetIdentity("smollm2-135m-instruct", "main", 576, 49152, "ab12" * 16)
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        store.publish(
            {"head.safetensors": os.urandom(3 << 20), "suffix.bin": os.urandom(2 << 20),
             "calibration.json": b'{"i": %d}' % i},
            target=target, metrics={"i": float(i)},
        )
        store.retain(keep=3)
    """
)


def test_publisher_killed_at_random_moments_never_leaves_a_torn_version(tmp_path: Path) -> None:
    root = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO / "sidecar"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    rng = random.Random(22)
    leftovers_seen = children = 0
    for _ in range(20):
        child = subprocess.Popen(
            [sys.executable, "-c", PUBLISHER, str(root)], env=env, stdout=subprocess.PIPE
        )
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.0, 0.4))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()

        reader = DirectoryStore(root)
        listed = reader.versions()
        for version in listed:  # every version a reader can see verifies completely
            opened = reader.open_version(version, TARGET)
            if "i" in opened.manifest.metrics:  # the child's, not the cleaner's
                assert len(opened.read("head.safetensors")) == 3 << 20
                children += 1
        latest = reader.latest()
        if latest is not None:
            assert latest in listed
        leftovers = [p.name for p in root.iterdir() if p.name.startswith(TMP_PREFIX)]
        leftovers_seen += bool(leftovers)

        cleaner = DirectoryStore(root, stale_after_s=0)
        before = set(listed)
        published = cleaner.publish(files(0), target=TARGET).version
        assert published not in before and cleaner.latest() == published
        assert cleaner.open_version(published, TARGET).read("suffix.bin") == files(0)["suffix.bin"]
        assert [p.name for p in root.iterdir() if p.name.startswith(TMP_PREFIX)] == []
    assert leftovers_seen > 0, "no kill landed mid-publish: the test proved nothing"
    assert children > 0, "the child never completed a version: the test proved nothing"


def test_retention_keeps_newest_n_and_serving_within_byte_bound(harness: Any) -> None:
    store = harness.make()
    ids = [store.publish(files(i, size=10_000), target=TARGET).version for i in range(6)]
    per_version = store.manifest(ids[0]).total_bytes
    store.mark_serving(ids[0], holder="pod-a")
    store.mark_serving(ids[1], holder="pod-b")
    store.mark_serving(None, holder="pod-b")  # pod-b moved on: no longer protected
    deleted = store.retain(keep=2)
    assert deleted == [ids[3], ids[2], ids[1]]
    assert store.versions() == [ids[0], ids[4], ids[5]]
    assert store.serving() == {ids[0]}

    deleted = store.retain(keep=2, max_bytes=2 * per_version)  # 3 kept would exceed it
    assert deleted == [ids[4]]
    assert store.versions() == [ids[0], ids[5]]
    deleted = store.retain(keep=2, max_bytes=1)  # newest and serving survive any bound
    assert deleted == [] and store.versions() == [ids[0], ids[5]]
    assert harness.leftovers() == []
    assert store.publish(files(9), target=TARGET).version == "v000007"  # ids never reused
    with pytest.raises(StoreError, match="keep must be at least 1"):
        store.retain(keep=0)


def test_retention_keeps_the_version_latest_names_when_the_pointer_lags(harness: Any) -> None:
    store = harness.make()
    ids = [store.publish(files(i), target=TARGET).version for i in range(4)]
    # a publisher killed after making v000004 visible, before moving the pointer
    harness.set_latest(ids[2])
    assert store.retain(keep=1) == [ids[1], ids[0]]
    assert store.versions() == [ids[2], ids[3]]
    assert store.latest() == ids[2] and store.latest_verified(TARGET).id == ids[3]  # type: ignore[union-attr]


def test_stale_serving_mark_temp_files_are_cleaned_and_never_read(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path, stale_after_s=600)
    store.publish(files(1), target=TARGET)
    store.mark_serving("v000001", holder="pod-a")
    torn = tmp_path / ".serving" / f"{TMP_PREFIX}pod-b-dead"
    torn.write_text("v0000")  # a mark_serving killed mid-write
    an_hour_ago = time.time() - 3600
    os.utime(torn, (an_hour_ago, an_hour_ago))
    assert store.serving() == {"v000001"}
    store.publish(files(2), target=TARGET)
    assert not torn.exists()
    assert store.serving() == {"v000001"}


CONCURRENT = textwrap.dedent(
    """
    import sys
    from atlas_sidecar.learning.store import DirectoryStore, TargetIdentity
    store = DirectoryStore(sys.argv[1])
    target = TargetIdentity("smollm2-135m-instruct", "main", 576, 49152, "ab12" * 16)
    sys.stdin.readline()  # start together
    for i in range(5):
        data = (sys.argv[2] * 1000 + str(i)).encode()
        store.publish({"head.safetensors": data}, target=target)
    """
)


def test_concurrent_publishers_get_distinct_ids_in_one_parent_chain(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "sidecar")}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT, str(tmp_path), name],
            env=env,
            stdin=subprocess.PIPE,
        )
        for name in ("a", "b")
    ]
    for child in children:
        assert child.stdin is not None
        child.stdin.write(b"go\n")
        child.stdin.close()
    assert [child.wait() for child in children] == [0, 0]
    store = DirectoryStore(tmp_path)
    ids = store.versions()
    assert ids == [f"v{n:06d}" for n in range(1, 11)]
    payloads = {store.open_version(v, TARGET).read("head.safetensors") for v in ids}
    assert len(payloads) == 10  # nothing overwritten
    parents = [store.manifest(v).parent for v in ids]
    assert parents == [None, *ids[:-1]]
    assert store.latest() == ids[-1]
