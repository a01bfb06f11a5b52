"""The sidecar follows the operator's rollout ConfigMap: its three files read from one
kubelet snapshot, bad content ignored, and each change turned into the right rollout
action (canary at its fraction, new fraction, promote, roll back, stable); then the same
through a real server on the small model, whose output stays the target's."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from atlas_sidecar.engine.build import build_engine
from atlas_sidecar.engine.core import Engine
from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.engine.speculators.suffix import SuffixSpeculator
from atlas_sidecar.learning import replica
from atlas_sidecar.learning.published import SUFFIX_FILE, target_identity
from atlas_sidecar.learning.rollout import Rollout
from atlas_sidecar.learning.store import DirectoryStore
from atlas_sidecar.learning.versioned import VersionedDrafter
from atlas_sidecar.serving.rolloutfiles import (
    CANARY_FRACTION_KEY,
    CANARY_VERSION_KEY,
    WEIGHT_VERSION_KEY,
    RolloutDir,
    RolloutFiles,
    RolloutFollower,
    Step,
    parse_rollout,
    plan_step,
)
from tests.learning.test_rollout import DOC_A, DOC_B, TARGET, load_docs, suffix_knowing


def kubelet_write(directory: Path, stable: str, canary: str = "", fraction: str = "0") -> None:
    """Update ``directory`` as kubelet's AtomicWriter does a ConfigMap volume: the data in
    a new timestamped directory, the ``..data`` symlink swapped to it by one rename, the
    key names symlinks through ``..data``, the old directory removed."""
    data = {WEIGHT_VERSION_KEY: stable, CANARY_VERSION_KEY: canary, CANARY_FRACTION_KEY: fraction}
    directory.mkdir(parents=True, exist_ok=True)
    stamp = directory / f"..{time.time_ns()}"
    stamp.mkdir()
    for key, value in data.items():
        (stamp / key).write_text(value)
    link = directory / "..data"
    old = os.readlink(link) if link.is_symlink() else None
    tmp = directory / "..data_tmp"
    tmp.symlink_to(stamp.name)
    os.replace(tmp, link)
    for key in data:
        if not (directory / key).is_symlink():
            (directory / key).symlink_to(f"..data/{key}")
    if old is not None:
        shutil.rmtree(directory / old)


# -- reading ------------------------------------------------------------------------------


def test_the_operators_three_keys_are_parsed():
    raw = {WEIGHT_VERSION_KEY: "v000001\n", CANARY_VERSION_KEY: "v000002",
           CANARY_FRACTION_KEY: "0.25"}  # fmt: skip
    assert parse_rollout(raw) == RolloutFiles("v000001", "v000002", 0.25)
    assert parse_rollout({WEIGHT_VERSION_KEY: "v000001"}) == RolloutFiles("v000001")
    assert parse_rollout({}) == RolloutFiles()
    for bad in ({CANARY_FRACTION_KEY: "abc"}, {CANARY_FRACTION_KEY: "1.5"},
                {CANARY_FRACTION_KEY: "nan"}, {CANARY_FRACTION_KEY: "-0.1"},
                {WEIGHT_VERSION_KEY: "no spaces allowed"}, {CANARY_VERSION_KEY: "../etc"},
                {WEIGHT_VERSION_KEY: "v1", CANARY_VERSION_KEY: "v1"}):  # fmt: skip
        with pytest.raises(ValueError):
            parse_rollout(bad)


def test_bad_content_is_logged_once_and_ignored(tmp_path, caplog):
    kubelet_write(tmp_path, "v000001", "v000002", "0.5")
    files = RolloutDir(tmp_path)
    assert files.read() == RolloutFiles("v000001", "v000002", 0.5)
    kubelet_write(tmp_path, "v000001", "v000002", "lots")
    with caplog.at_level(logging.ERROR):
        assert [files.read() for _ in range(3)] == [None] * 3
    assert len([r for r in caplog.records if "lots" in r.getMessage()]) == 1
    assert RolloutDir(tmp_path / "absent").read() is None


def test_a_read_never_mixes_two_kubelet_updates(tmp_path):
    """A writer swaps between two states as fast as it can; every read is one of them."""
    states = [("v000001", "v000002", "0.5"), ("v000002", "", "0")]
    kubelet_write(tmp_path, *states[0])
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            kubelet_write(tmp_path, *states[i % 2])

    thread = threading.Thread(target=writer)
    thread.start()
    seen = []
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            seen.append(RolloutDir(tmp_path).read())
    finally:
        stop.set()
        thread.join()
    wanted = {None, *(parse_rollout(dict(zip((WEIGHT_VERSION_KEY, CANARY_VERSION_KEY,
              CANARY_FRACTION_KEY), s, strict=True))) for s in states)}  # fmt: skip
    assert set(seen) <= wanted and len(set(seen) - {None}) >= 1


# -- deciding -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("want", "roles", "fraction", "tried", "step"),
    [
        (RolloutFiles("v1"), {"stable": "base"}, None, set(), Step("stable", "v1")),
        (RolloutFiles("v1", "v2", 0.1), {"stable": "base"}, None, set(), Step("stable", "v1")),
        (RolloutFiles("v1", "v2", 0.1), {"stable": "v1"}, None, set(), Step("canary", "v2", 0.1)),
        (RolloutFiles("v1", "v2", 0.3), {"stable": "v1", "canary": "v2"}, 0.1, set(),
         Step("fraction", "v2", 0.3)),
        (RolloutFiles("v2"), {"stable": "v1", "canary": "v2"}, 0.1, set(), Step("promote", "v2")),
        (RolloutFiles("v1"), {"stable": "v1", "canary": "v2"}, 0.1, set(),
         Step("roll_back", "v2")),
        (RolloutFiles("v1", "v3", 0.1), {"stable": "v1", "canary": "v2"}, 0.1, set(),
         Step("canary", "v3", 0.1)),
        (RolloutFiles("v1", "v3", 0.1), {"stable": "v1", "canary": "v2"}, 0.1, {"v3"},
         Step("roll_back", "v2")),
        (RolloutFiles("v3"), {"stable": "v1", "previous": "base"}, None, set(),
         Step("stable", "v3")),
        (RolloutFiles("v3"), {"stable": "v1"}, None, {"v3"}, None),  # refused: not again
        (RolloutFiles("v1", "v2", 0.1), {"stable": "v1", "canary": "v2"}, 0.1, set(), None),
        (RolloutFiles(), {"stable": "v1", "canary": "v2"}, 0.1, set(), Step("roll_back", "v2")),
    ],
)  # fmt: skip
def test_each_change_maps_to_one_rollout_action(want, roles, fraction, tried, step):
    assert plan_step(want, roles, fraction, tried) == step


class Immediate:
    """A worker that runs a task between steps at once (no decoding in these tests)."""

    def __call__(self, task) -> None:
        task()


def follower_over(tmp_path):
    store = DirectoryStore(tmp_path / "weights")
    drafter = VersionedDrafter("base", suffix_knowing(DOC_A))
    rollout = Rollout(store, TARGET, {"suffix": drafter}, {"suffix": load_docs}, Immediate())
    calls: list[tuple[str, float | None, bool]] = []

    async def install(version: str, fraction: float | None, stable: bool) -> bool:
        calls.append((version, fraction, stable))
        try:
            rollout.request(version, fraction, stable)
        except Exception:  # noqa: BLE001 - refused
            return False
        return True

    versions = [store.publish({"suffix.json": json.dumps([DOC_B]).encode()},
                              target=TARGET).version for _ in range(2)]  # fmt: skip
    return RolloutFollower(rollout, install), rollout, calls, versions


def test_the_follower_walks_the_operators_rollout(tmp_path):
    follower, rollout, calls, (v1, v2) = follower_over(tmp_path)

    def follow(*args) -> dict[str, str]:
        assert asyncio.run(follower.follow(RolloutFiles(*args)))
        return rollout.roles()

    assert follow(v1, v2, 0.5) == {"stable": v1, "canary": v2, "previous": "base"}
    assert calls == [(v1, None, True), (v2, 0.5, False)]  # stable, then canary
    assert rollout.canary_fraction_in_service() == 0.5
    assert follow(v1, v2, 0.5) and len(calls) == 2  # idempotent
    follow(v1, v2, 1.0)
    assert rollout.canary_fraction_in_service() == 1.0 and rollout.roles()["canary"] == v2
    assert follow(v1) == {"stable": v1, "previous": "base"}  # rolled back
    assert follow(v1, v2, 0.2) == {"stable": v1, "canary": v2, "previous": "base"}
    assert follow(v2) == {"stable": v2, "previous": v1}  # promoted, not reloaded
    assert len(calls) == 3


def test_a_refused_version_is_not_asked_for_again_until_renamed(tmp_path):
    follower, rollout, calls, (v1, v2) = follower_over(tmp_path)
    missing = "v000099"
    for _ in range(3):
        asyncio.run(follower.follow(RolloutFiles(v1, missing, 0.5)))
    assert rollout.roles() == {"stable": v1, "previous": "base"}
    assert [c[0] for c in calls] == [v1, missing]
    asyncio.run(follower.follow(RolloutFiles(v1, v2, 0.5)))
    follower.done = None  # the same state seen again after another: asked once more
    asyncio.run(follower.follow(RolloutFiles(v1, missing, 0.5)))
    assert [c[0] for c in calls] == [v1, missing, v2, missing]
    assert rollout.roles() == {"stable": v1, "previous": "base"}  # v2 dropped: not named


# -- through a real server ---------------------------------------------------------------

TOKENS = 12
POLL_S = 0.05


def wait_until(check, what: str, limit_s: float = 30.0):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.02)
    raise AssertionError(f"not reached in {limit_s:.0f} s: {what}")


def test_a_server_follows_the_operators_canary_promote_and_rollback(target, tmp_path, caplog):
    from atlas_sidecar.serving.app import ServerConfig, ServerThread
    from atlas_sidecar.serving.client import AtlasClient
    from atlas_sidecar.tooling.workloads import Prompt, encode

    tok = target.tokenizer
    ids = encode(tok, Prompt("t", "t", (("user", "Name three colours."),)))
    want = Engine(target, tok).generate(ids, SamplingParams(max_tokens=TOKENS)).token_ids
    identity = target_identity(target)
    store = DirectoryStore(tmp_path / "weights")
    versions = []
    for doc in ([*ids, *want], [*ids, *want[:4]]):  # both know (part of) the answer
        index = SuffixSpeculator()
        index.add_document(doc)
        files = {SUFFIX_FILE: index.snapshot_bytes(target.vocab_size)}
        versions.append(store.publish(files, target=identity).version)
    v1, v2 = versions
    rollout_dir = tmp_path / "rollout"
    kubelet_write(rollout_dir, v1, v2, "0.5")  # at start: stable, then the canary

    engine = build_engine("suffix", target, versioned=True)
    rollout = replica.build_rollout(store, identity, engine, target.vocab_size, 0.0)
    config = ServerConfig(port=0, metrics_port=None, admin_token="admin-secret",
                          weight_version_file=rollout_dir / WEIGHT_VERSION_KEY,
                          rollout_poll_s=POLL_S)  # fmt: skip
    server = ServerThread(engine, config)
    server.server.use_rollout(rollout)

    def roles(expected: dict[str, str]) -> bool:
        return rollout.settled() and rollout.roles() == expected

    def generate(client: AtlasClient) -> str:
        reply = client.generate(token_ids=ids, max_tokens=TOKENS)
        assert list(reply.token_ids) == want  # the target's greedy output, any version
        return reply.weight_version

    with server, AtlasClient(server.address, timeout=120) as client, \
            AtlasClient(server.address, timeout=120, token="admin-secret") as admin:  # fmt: skip
        wait_until(lambda: roles({"stable": v1, "canary": v2, "previous": "base"}), "canary")
        assert rollout.canary_fraction_in_service() == 0.5
        generate(client)
        stats = admin.stats()
        assert stats.weight_version == v1 and stats.requested_weight_version == v1

        kubelet_write(rollout_dir, v1, v2, "1")  # every new request on the canary
        wait_until(lambda: rollout.canary_fraction_in_service() == 1.0, "fraction 1")
        assert generate(client) == v2
        assert {v.version: v.role for v in admin.stats().versions}[v2] == "canary"

        with caplog.at_level(logging.ERROR):
            kubelet_write(rollout_dir, v1, v2, "1.5")  # bad: ignored, state kept
            time.sleep(10 * POLL_S)
        assert sum("1.5" in r.getMessage() for r in caplog.records) == 1
        assert roles({"stable": v1, "canary": v2, "previous": "base"})
        assert rollout.canary_fraction_in_service() == 1.0

        kubelet_write(rollout_dir, v1)  # the operator's rollback
        wait_until(lambda: roles({"stable": v1, "previous": "base"}), "rolled back")
        assert generate(client) == v1

        kubelet_write(rollout_dir, v1, v2, "0.5")  # a canary again, then promoted
        wait_until(lambda: roles({"stable": v1, "canary": v2, "previous": "base"}), "canary")
        kubelet_write(rollout_dir, v2)
        wait_until(lambda: roles({"stable": v2, "previous": v1}), "promoted")
        assert generate(client) == v2
        stats = admin.stats()
        assert stats.weight_version == v2 and stats.requested_weight_version == v2
