"""Serving statistics: Prometheus metrics (monotonic) and the GetStats counters (resettable).

Updated from two threads (the event loop records RPC outcomes, the scheduler's worker
records steps and tokens); prometheus-client is thread-safe and the GetStats counters
sit behind one lock. Each server owns its own registry, so several servers can live
in one process (tests) without clashing.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from atlas_sidecar.engine.core import StepStats

TOKENS_PER_S_WINDOW_S = 10.0
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# accepted + 1 per verify forward: 1 (nothing accepted) up to lookahead + 1.
ACCEPT_LEN_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 24, 32, 48, 65)
# Weight versions tracked at once (labels and GetStats): stable, canary, previous and a
# few just retired; the oldest is dropped past it, so labels stay bounded.
MAX_VERSIONS = 6


@dataclass
class SpeculatorTotals:
    steps: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def accept_len(self) -> float:
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0


@dataclass
class VersionTotals:
    """What one weight version's sequences did: the canary's verdict reads these."""

    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0
    seconds: float = 0.0  # draft + verify time of its steps

    @property
    def accept_len(self) -> float:
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class StatsSnapshot:
    requests_ok: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    speculators: dict[str, SpeculatorTotals] = field(default_factory=dict)
    versions: dict[str, VersionTotals] = field(default_factory=dict)

    @property
    def requests_total(self) -> int:
        return self.requests_ok + self.requests_failed + self.requests_cancelled


class ServingStats:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._lock = threading.Lock()
        self._totals = StatsSnapshot()
        self._recent_tokens: deque[tuple[float, int]] = deque()
        self._weight_labels: dict[str, str] = {}
        r = self.registry
        # process_resident_memory_bytes and the rest, on this server's own registry.
        with contextlib.suppress(ValueError):  # a registry that already has them
            ProcessCollector(registry=r)
        self.requests = Counter(
            "atlas_requests", "Generate RPCs by outcome", ["rpc", "code"], registry=r
        )
        self.latency = Histogram(
            "atlas_request_duration_seconds", "Generate RPC latency", ["rpc"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "atlas_time_to_first_token_seconds", "From arrival to the first token (prefill)",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter("atlas_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.completion_tokens = Counter("atlas_completion_tokens", "Tokens generated", registry=r)
        self.tokens_per_s = Gauge(
            "atlas_tokens_per_second",
            f"Tokens generated per second over the last {TOKENS_PER_S_WINDOW_S:.0f} s",
            registry=r,
        )
        self.tokens_per_s.set_function(self.recent_tokens_per_s)
        self.accept_len = Histogram(
            "atlas_accept_length", "Tokens gained per target verify forward", ["speculator"],
            buckets=ACCEPT_LEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.choices = Counter(
            "atlas_controller_choices",
            "Per-step choice of speculator and lookahead (drafted tokens)",
            ["speculator", "lookahead"],
            registry=r,
        )
        self.drafted = Counter(
            "atlas_draft_tokens", "Draft tokens proposed", ["speculator"], registry=r
        )
        self.accepted = Counter(
            "atlas_accepted_tokens", "Draft tokens accepted", ["speculator"], registry=r
        )
        self.queue_depth = Gauge("atlas_queue_depth", "Requests waiting for a slot", registry=r)
        self.active = Gauge("atlas_active_sequences", "Requests in the batch", registry=r)
        self.version_steps = Counter(
            "atlas_version_steps", "Verify steps by the weight version of their sequence",
            ["version"], registry=r,
        )  # fmt: skip
        self.version_accepted = Counter(
            "atlas_version_accepted_tokens", "Draft tokens accepted, by weight version",
            ["version"], registry=r,
        )  # fmt: skip
        self.rollout_refused = Counter(
            "atlas_rollout_refused",
            "Weight versions refused (corrupt, another target's, unloadable); the log says why",
            registry=r,
        )
        self.weight_version = Gauge(
            "atlas_weight_version_info", "Weight version (label) by role", ["role", "version"],
            registry=r,
        )  # fmt: skip

    # -- the event loop's side ------------------------------------------------------

    def rpc_finished(self, rpc: str, code: str, duration_s: float) -> None:
        self.requests.labels(rpc, code).inc()
        self.latency.labels(rpc).observe(duration_s)
        with self._lock:
            if code == "OK":
                self._totals.requests_ok += 1
            elif code == "CANCELLED":
                self._totals.requests_cancelled += 1
            else:
                self._totals.requests_failed += 1

    def set_weight_version(self, role: str, version: str) -> None:
        """Expose the version serving (role "serving") or last requested ("requested")."""
        with self._lock:
            old = self._weight_labels.get(role)
            self._weight_labels[role] = version
        if old is not None and old != version:
            self.weight_version.remove(role, old)
        if version:
            self.weight_version.labels(role, version).set(1)

    # -- the scheduler's side -------------------------------------------------------

    def first_token(self, ttft_s: float, prompt_tokens: int) -> None:
        self.ttft.observe(ttft_s)
        self.prompt_tokens.inc(prompt_tokens)
        self._add_tokens(1)
        with self._lock:
            self._totals.prompt_tokens += prompt_tokens

    def step(self, stats: StepStats, tokens_added: int, version: str = "") -> None:
        """One sequence's verify step; ``version``: the weights it was pinned to."""
        if version:
            self._version_step(stats, tokens_added, version)
        self.accept_len.labels(stats.speculator).observe(stats.accepted + 1)
        self.choices.labels(stats.speculator, str(stats.drafted)).inc()
        self.drafted.labels(stats.speculator).inc(stats.drafted)
        self.accepted.labels(stats.speculator).inc(stats.accepted)
        self._add_tokens(tokens_added)
        with self._lock:
            totals = self._totals.speculators.setdefault(stats.speculator, SpeculatorTotals())
            totals.steps += 1
            totals.drafted += stats.drafted
            totals.accepted += stats.accepted

    def _version_step(self, stats: StepStats, tokens_added: int, version: str) -> None:
        self.version_steps.labels(version).inc()
        self.version_accepted.labels(version).inc(stats.accepted)
        with self._lock:
            versions = self._totals.versions
            if version not in versions and len(versions) >= MAX_VERSIONS:
                oldest = next(iter(versions))  # insertion order: the longest tracked
                del versions[oldest]
                for metric in (self.version_steps, self.version_accepted):
                    with contextlib.suppress(KeyError):
                        metric.remove(oldest)
            totals = versions.setdefault(version, VersionTotals())
            totals.steps += 1
            totals.drafted += stats.drafted
            totals.accepted += stats.accepted
            totals.tokens += tokens_added
            totals.seconds += stats.draft_s + stats.verify_s

    def set_load(self, queued: int, active: int) -> None:
        self.queue_depth.set(queued)
        self.active.set(active)

    def _add_tokens(self, n: int) -> None:
        if n <= 0:
            return
        self.completion_tokens.inc(n)
        now = time.monotonic()
        with self._lock:
            self._totals.completion_tokens += n
            self._recent_tokens.append((now, n))
            self._trim(now)

    # -- readers ------------------------------------------------------------------

    def recent_tokens_per_s(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._recent_tokens) / TOKENS_PER_S_WINDOW_S

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            t = self._totals
            return StatsSnapshot(
                requests_ok=t.requests_ok,
                requests_failed=t.requests_failed,
                requests_cancelled=t.requests_cancelled,
                prompt_tokens=t.prompt_tokens,
                completion_tokens=t.completion_tokens,
                speculators={k: SpeculatorTotals(**vars(v)) for k, v in t.speculators.items()},
                versions={k: VersionTotals(**vars(v)) for k, v in t.versions.items()},
            )

    def reset(self) -> None:
        """Zero the GetStats counters; Prometheus counters stay monotonic, as they must."""
        with self._lock:
            self._totals = StatsSnapshot()
            self._recent_tokens.clear()

    def _trim(self, now: float) -> None:
        while self._recent_tokens and self._recent_tokens[0][0] < now - TOKENS_PER_S_WINDOW_S:
            self._recent_tokens.popleft()
