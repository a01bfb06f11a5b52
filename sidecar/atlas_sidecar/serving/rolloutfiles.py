"""The operator's rollout ConfigMap as the sidecar reads it, and how it is followed.

The operator (operator/atlas_operator/rollout.py) writes three keys into a ConfigMap
mounted as a directory (``ROLLOUT_KEYS``; tests/operator/test_contract.py checks that
they are the operator's, since the sidecar does not import the operator):

    weight-version    the version every sidecar serves ("" = nothing published yet)
    canary-version    a candidate for canary-fraction of new requests ("" = none)
    canary-fraction   "0".."1"

Kubelet updates such a volume by writing a new timestamped directory and swapping the
``..data`` symlink to it; each key file is a symlink through ``..data``. Opening the
three files by name could read two updates at once, so a read resolves ``..data`` once
and reads all three from that directory, and counts only when two reads in a row agree
(a plain directory written by hand has no ``..data``: the second read catches a write
in between). A half-updated view is never acted on. Bad content (a malformed version, a
fraction that is not a number in [0, 1]) is logged once and ignored: serving goes on as
it was.

``RolloutFollower`` turns what the files say into ``Rollout`` actions, one at a time and
each only once the worker has run the one before, so every decision is made on the
roles really in service: a new canary is requested at its fraction, a cleared canary
whose version became the weight-version is promoted, a cleared one otherwise rolled
back, a new weight-version with no canary installed stable, a new fraction applied to
the same canary. It acts when the files change (an admin RPC in between is not undone
by the next poll), and a version that is refused is not asked for again until the files
stop naming it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from atlas_sidecar.errors import RequestError
from atlas_sidecar.learning.rollout import Rollout
from atlas_sidecar.learning.versioned import BASE_VERSION
from atlas_sidecar.serving.weights import (
    CANARY_FRACTION_KEY,
    CANARY_VERSION_KEY,
    WEIGHT_VERSION_KEY,
    check_version,
)

log = logging.getLogger(__name__)

ROLLOUT_KEYS = (WEIGHT_VERSION_KEY, CANARY_VERSION_KEY, CANARY_FRACTION_KEY)
DATA_LINK = "..data"  # kubelet's atomically swapped symlink in a ConfigMap volume
READ_TRIES = 5
MAX_FILE_BYTES = 4096
SETTLE_TIMEOUT_S = 30.0  # how long a step waits for the worker before the next poll


@dataclass(frozen=True)
class RolloutFiles:
    """What the rollout directory asks for."""

    stable: str = ""  # "": nothing published yet, the replica serves what it has
    canary: str = ""  # "": no canary
    canary_fraction: float = 0.0

    @property
    def names_a_version(self) -> bool:
        return bool(self.stable or self.canary)


Raw = tuple[str | None, ...]  # each key's content, None where its file is absent


def parse_rollout(raw: Mapping[str, str | None]) -> RolloutFiles:
    """The state the keys' contents ask for; ValueError (saying which) when bad. An
    absent key counts as empty: an older ConfigMap held only the weight-version."""

    def version(key: str) -> str:
        text = (raw.get(key) or "").strip()
        if not text:
            return ""
        try:
            return check_version(text)
        except RequestError as exc:
            raise ValueError(f"{key} {text[:64]!r}: {exc}") from exc

    stable, canary = version(WEIGHT_VERSION_KEY), version(CANARY_VERSION_KEY)
    text = (raw.get(CANARY_FRACTION_KEY) or "").strip() or "0"
    try:
        fraction = float(text)
    except ValueError:
        raise ValueError(f"{CANARY_FRACTION_KEY} {text[:64]!r} is not a number") from None
    if not (math.isfinite(fraction) and 0.0 <= fraction <= 1.0):
        raise ValueError(f"{CANARY_FRACTION_KEY} {text[:64]!r} is not within [0, 1]")
    if canary and canary == stable:
        raise ValueError(f"{CANARY_VERSION_KEY} {canary} is the {WEIGHT_VERSION_KEY} too")
    return RolloutFiles(stable, canary, fraction if canary else 0.0)


class RolloutDir:
    """Reads the rollout directory one consistent snapshot at a time."""

    def __init__(self, directory: Path, weight_key: str = WEIGHT_VERSION_KEY) -> None:
        """``weight_key``: the weight-version file's name (``--weight-version-file``'s)."""
        self.directory = directory
        self.keys = (weight_key, CANARY_VERSION_KEY, CANARY_FRACTION_KEY)
        self._bad: Raw | None = None  # the bad content last logged

    def read(self) -> RolloutFiles | None:
        """The files' state; None when there is no directory, the files keep changing
        under the reads, or their content is bad (logged once per content)."""
        raw = self._settled()
        if raw is None:
            return None
        try:
            files = parse_rollout(dict(zip(ROLLOUT_KEYS, raw, strict=True)))
        except ValueError as exc:
            if raw != self._bad:
                log.error("rollout files in %s ignored, serving goes on as it was: %s",
                          self.directory, exc)  # fmt: skip
                self._bad = raw
            return None
        self._bad = None
        return files

    def _settled(self) -> Raw | None:
        """Two reads in a row that agree (the same ``..data`` target, the same bytes)."""
        last: tuple[str, Raw] | None = None
        for _ in range(READ_TRIES):
            now = self._read_once()
            if now is None:
                return None
            if now == last:
                return now[1]
            last = now
        log.warning("rollout files in %s kept changing while read: tried again next poll",
                    self.directory)  # fmt: skip
        return None

    def _read_once(self) -> tuple[str, Raw] | None:
        if not self.directory.is_dir():
            return None
        link = self.directory / DATA_LINK
        base = Path(os.path.realpath(link)) if link.is_symlink() else self.directory
        values: list[str | None] = []
        for key in self.keys:
            try:
                with open(base / key, "rb") as f:
                    data = f.read(MAX_FILE_BYTES + 1)
            except FileNotFoundError:  # absent, or an old ..data target just removed
                values.append(None)
                continue
            except OSError as exc:
                log.warning("rollout file %s unreadable: %s", base / key, exc)
                return None
            values.append(data.decode("utf-8", "replace")[: MAX_FILE_BYTES + 1])
        return str(base), tuple(values)


@dataclass(frozen=True)
class Step:
    action: str  # "stable", "canary", "fraction", "promote", "roll_back"
    version: str = ""
    fraction: float = 1.0


def plan_step(
    want: RolloutFiles, roles: Mapping[str, str], fraction: float | None, tried: set[str]
) -> Step | None:
    """The next action toward ``want`` from the roles in service (``Rollout.roles()``)
    and the canary's fraction; None once there is nothing (more) to do. ``tried``: the
    versions already asked for while the files name them (refused, or holding nothing a
    drafter shows): never asked for again."""
    stable = roles.get("stable", BASE_VERSION)
    canary = roles.get("canary", "")
    if want.stable and want.stable != stable:
        if want.stable == canary:  # the operator promoted the canary
            return Step("promote", canary)
        if want.stable not in tried:
            return Step("stable", want.stable)
    if canary and canary != want.canary:
        if want.canary and want.canary not in tried:  # a new candidate replaces it
            return Step("canary", want.canary, want.canary_fraction)
        return Step("roll_back", canary)  # the operator dropped it (or names one refused)
    if want.canary and not canary and want.canary not in tried:
        return Step("canary", want.canary, want.canary_fraction)
    if want.canary and want.canary == canary and fraction != want.canary_fraction:
        return Step("fraction", canary, want.canary_fraction)
    return None


# Queues an install: (version, canary fraction or None, stable) -> True queued, False
# refused, None failed for a passing reason (tried again next poll).
Install = Callable[[str, float | None, bool], Awaitable[bool | None]]


class RolloutFollower:
    """Brings the rollout to what the files say, on the event loop (the worker only runs
    the queued installs and verdicts)."""

    MAX_STEPS = 8  # a pass never needs more than promote, stable, canary, fraction

    def __init__(self, rollout: Rollout, install: Install) -> None:
        self.rollout = rollout
        self.install = install
        self.tried: set[str] = set()
        self.done: RolloutFiles | None = None  # the state last reached

    async def follow(self, want: RolloutFiles) -> bool:
        """Act toward ``want`` unless it was reached already; True once reached."""
        if want == self.done:
            return True
        self.tried &= {want.stable, want.canary}  # forget what the files no longer name
        for _ in range(self.MAX_STEPS):
            if not await self._settle():
                return False  # the worker is slow: go on at the next poll
            step = plan_step(want, self.rollout.roles(),
                             self.rollout.canary_fraction_in_service(), self.tried)  # fmt: skip
            if step is None:
                self.done = want
                return True
            if not await self._apply(step):
                return False
        log.warning("rollout files: %s not reached in %d steps", want, self.MAX_STEPS)
        return False

    async def _apply(self, step: Step) -> bool:
        log.info("rollout files: %s %s", step.action.replace("_", " "), step.version)
        if step.action in ("stable", "canary"):
            stable = step.action == "stable"
            queued = await self.install(step.version, None if stable else step.fraction,
                                        stable)  # fmt: skip
            if queued is None:
                return False
            self.tried.add(step.version)
        elif step.action == "promote":
            self.rollout.promote()
        elif step.action == "roll_back":
            self.rollout.roll_back(canary_only=True)
        else:
            self.rollout.set_canary_fraction(step.fraction)
        return True

    async def _settle(self) -> bool:
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while not self.rollout.settled():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True
