"""Hot rollout: a published version goes into service with no restart and no dropped
request, as a canary first when a fraction is configured.

A rollout (``Rollout.request``) opens the version from the weights store, which checks
every file's sha256 and the target identity, builds each adaptive drafter's new
instance from its files (``Loader``), all off the worker thread, and only then queues
one task between decoding steps that installs them all together: the sequences started
after it are pinned to the new version (or, as a canary, the fraction of them the
canary takes), the ones in flight finish on theirs. A corrupt, wrong-target or
unloadable version is refused with one log line and a metric, and serving goes on with
what it had. ``promote`` and ``roll_back`` are the verdicts (the operator's, from the
per-version acceptance it reads, or an admin RPC).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from atlas_sidecar.engine.speculators.base import Drafter
from atlas_sidecar.learning.store import (
    StoreError,
    TargetIdentity,
    Version,
    WeightsStore,
    version_number,
)
from atlas_sidecar.learning.versioned import VersionedDrafter

log = logging.getLogger(__name__)

# Builds a drafter from a verified version, or None when the version holds nothing for
# it (that drafter keeps its current version). Raises on files it cannot use.
Loader = Callable[[Version], Drafter | None]
# Reads a version's file for something that is not a drafter (the controller's priors)
# and returns what applies it on the worker, or None when the version has no such file.
Applier = Callable[[Version], Callable[[], None] | None]


class RolloutRefused(Exception):
    """A version that will not be served; the message says why."""


@dataclass(frozen=True)
class RolloutResult:
    version: str
    installed: tuple[str, ...]  # the drafters that took it
    canary_fraction: float  # 1.0 when stable
    stable: bool


class Rollout:
    def __init__(
        self,
        store: WeightsStore,
        identity: TargetIdentity | None,
        drafters: Mapping[str, VersionedDrafter],
        loaders: Mapping[str, Loader],
        between_steps: Callable[[Callable[[], None]], None] | None = None,
        canary_fraction: float = 0.0,
        on_refused: Callable[[str, str], None] | None = None,
        on_change: Callable[[], None] | None = None,
        appliers: Mapping[str, Applier] | None = None,
    ) -> None:
        """``identity``: the target the sidecar serves (None: not checked, tests only).
        ``between_steps`` queues a task for the worker's next step boundary (the server
        sets its scheduler's). ``on_refused(version, reason)`` counts refusals (a
        metric); ``on_change()`` runs on the worker after each install or verdict."""
        if not 0.0 <= canary_fraction <= 1.0:
            raise ValueError(f"canary fraction {canary_fraction} is not in [0, 1]")
        self.store = store
        self.identity = identity
        self.drafters = dict(drafters)
        self.loaders = dict(loaders)
        self.between_steps = between_steps
        self.canary_fraction = canary_fraction
        self.on_refused = on_refused
        self.on_change = on_change
        self.appliers = dict(appliers or {})
        self._lock = threading.Lock()  # one rollout prepared at a time
        self.pending: str | None = None  # prepared, waiting for the worker
        self._queued = 0  # tasks queued for the worker and not yet run
        self._queued_lock = threading.Lock()

    def request(
        self, version: str, canary_fraction: float | None = None, stable: bool = False
    ) -> RolloutResult:
        """Verify and load ``version``, then queue its install between steps; return
        once queued. ``RolloutRefused`` (logged, counted) when it cannot be served.

        ``stable``: it serves every new sequence at once. Else ``canary_fraction``: a
        canary for that share of new sequences, even 1.0 (it stays a canary until a
        verdict); None: the configured fraction, where 0 means stable at once."""
        if canary_fraction is not None and not 0.0 <= canary_fraction <= 1.0:
            raise ValueError(f"canary fraction {canary_fraction} is not in [0, 1]")
        if stable:
            fraction, canary = 1.0, False
        elif canary_fraction is not None:
            fraction, canary = canary_fraction, True
        else:
            fraction, canary = self.canary_fraction or 1.0, self.canary_fraction > 0
        with self._lock:
            try:
                thunks, drafters = self._build(version)
            except RolloutRefused as exc:
                log.error("rollout of weight version %s refused: %s; serving goes on "
                          "unchanged", version, exc)  # fmt: skip
                if self.on_refused is not None:
                    self.on_refused(version, str(exc))
                raise
            self.pending = version
            self._queue(lambda: self._install(version, drafters, thunks, fraction, canary))
            return RolloutResult(version, (*drafters, *thunks),
                                 fraction if canary else 1.0, not canary)  # fmt: skip

    def settled(self) -> bool:
        """No install or verdict waits for the worker: ``roles()`` is what was asked."""
        with self._queued_lock:
            return self._queued == 0

    def _queue(self, task: Callable[[], None]) -> None:
        if self.between_steps is None:
            raise RuntimeError("the rollout is not attached to a server's worker")

        def run() -> None:
            try:
                task()
                if self.on_change is not None:
                    self.on_change()
            finally:
                with self._queued_lock:
                    self._queued -= 1

        with self._queued_lock:
            self._queued += 1
        try:
            self.between_steps(run)
        except BaseException:
            with self._queued_lock:
                self._queued -= 1
            raise

    def _build(self, version: str) -> tuple[dict[str, Callable[[], None]], dict[str, Drafter]]:
        """(appliers' install thunks, drafters) for ``version``, all validated."""
        try:
            opened = self.store.open_version(version, self._identity(version))
        except StoreError as exc:  # not found, corrupt, another target's
            raise RolloutRefused(str(exc)) from exc
        built: dict[str, Drafter] = {}
        thunks: dict[str, Callable[[], None]] = {}
        try:
            for name, loader in self.loaders.items():
                if name in self.drafters and (drafter := loader(opened)) is not None:
                    built[name] = drafter
            for name, applier in self.appliers.items():
                if (thunk := applier(opened)) is not None:
                    thunks[name] = thunk
        except Exception as exc:  # noqa: BLE001 - a loader's failure refuses the version
            raise RolloutRefused(f"{type(exc).__name__}: {exc}") from exc
        if not built and not thunks:
            raise RolloutRefused("it holds nothing any running drafter can load")
        return thunks, built

    def _identity(self, version: str) -> TargetIdentity | None:
        """The identity a version must match. A sidecar over a server (SGLang) has no LM
        head to fingerprint: it checks name, revision and sizes, not the fingerprint."""
        if self.identity is None or self.identity.fingerprint:
            return self.identity
        try:
            theirs = self.store.manifest(version).target.fingerprint
        except StoreError as exc:
            raise RolloutRefused(str(exc)) from exc
        return replace(self.identity, fingerprint=theirs)

    def _install(
        self,
        version: str,
        built: dict[str, Drafter],
        thunks: dict[str, Callable[[], None]],
        fraction: float,
        canary: bool,
    ) -> None:
        for name, drafter in built.items():
            self.drafters[name].install(version, drafter, fraction, canary)
        for thunk in thunks.values():
            thunk()
        if self.pending == version:
            self.pending = None
        role = f"canary for {fraction:.0%} of new requests" if canary else "stable"
        log.info("weight version %s in service (%s): %s", version, role,
                 ", ".join([*built, *thunks]))  # fmt: skip

    # -- verdicts (queued between steps too) ----------------------------------------------

    def promote(self) -> None:
        self._queue(lambda: self._each("promote"))

    def roll_back(self, canary_only: bool = False) -> None:
        """Drop the canary, or, with none, go back to the previous version.
        ``canary_only``: a drafter with no canary keeps its stable version (the
        operator's rollback drops a candidate, never what serves)."""
        self._queue(lambda: self._each("roll_back", canary_only))

    def set_canary_fraction(self, fraction: float) -> None:
        """The canary's share of new sequences from now on (sequences keep their pin)."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"canary fraction {fraction} is not in [0, 1]")

        def apply() -> None:
            for drafter in self.drafters.values():
                if drafter.canary is not None:
                    drafter.set_canary_fraction(fraction)
            log.info("canary now drafts for %.0f%% of new requests", fraction * 100)

        self._queue(apply)

    def canary_fraction_in_service(self) -> float | None:
        """The share of new sequences the canary takes; None with no canary."""
        shares = [d.canary_fraction for d in self.drafters.values() if d.canary is not None]
        return max(shares, default=None)

    def _each(self, verdict: str, canary_only: bool = False) -> None:
        done = {}
        for name, drafter in self.drafters.items():
            if canary_only and drafter.canary is None:
                continue
            action = drafter.promote if verdict == "promote" else drafter.roll_back
            try:
                done[name] = action()
            except ValueError as exc:  # nothing to promote or roll back for this one
                log.info("%s: %s", verdict, exc)
        log.info("%s: now serving %s", verdict, done or "unchanged")

    def pin(self, seq_id: str) -> str:
        """On the worker, as a sequence starts: pin it in every drafter; the newest
        version among them names it (a drafter a version had no files for keeps an
        older one)."""
        pinned = [d.version_of(seq_id) for d in self.drafters.values()]
        return max(pinned, key=_number, default="")

    def serving(self) -> dict[str, dict[str, str]]:
        """Per drafter: role -> version."""
        return {name: d.versions() for name, d in self.drafters.items()}

    def roles(self) -> dict[str, str]:
        """Role -> the newest version any drafter holds in it ("stable", "canary",
        "previous"): what the server reports as serving."""
        found: dict[str, str] = {}
        for versions in self.serving().values():
            for role, version in versions.items():
                old = found.get(role)
                if old is None or _number(version) >= _number(old):
                    found[role] = version
        return found


def _number(version: str) -> int:
    """A published version's counter; 0 for the version a sidecar started with."""
    return version_number(version) or 0
