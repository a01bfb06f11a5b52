"""Load test: closed-loop clients against one or more sidecars, per concurrency level.

For each endpoint and each concurrency C, C clients stream requests back to back for
``duration_s`` (then let the last ones finish). Prints throughput and latency
percentiles per row; compare a speculative sidecar with a plain one by giving both
endpoints (``--endpoint spec=host:50051 --endpoint plain=host:50052``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from collections.abc import AsyncGenerator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from atlas_sidecar.serving.client import NO_RETRY, AsyncAtlasClient, AtlasError
from atlas_sidecar.tooling.workloads import Prompt


@dataclass
class Sample:
    latency_s: float
    ttft_s: float
    tokens: int
    accept_len: float


@dataclass
class Row:
    endpoint: str
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    tokens: int
    tokens_per_s: float
    requests_per_s: float
    latency_p50_s: float
    latency_p99_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    accept_len: float
    error_codes: dict[str, int] = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summarize(
    endpoint: str, concurrency: int, samples: list[Sample], errors: dict[str, int], wall_s: float
) -> Row:
    tokens = sum(s.tokens for s in samples)
    latencies = [s.latency_s for s in samples]
    ttfts = [s.ttft_s for s in samples]
    return Row(
        endpoint=endpoint,
        concurrency=concurrency,
        requests=len(samples),
        errors=sum(errors.values()),
        wall_s=wall_s,
        tokens=tokens,
        tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        requests_per_s=len(samples) / wall_s if wall_s > 0 else 0.0,
        latency_p50_s=percentile(latencies, 50),
        latency_p99_s=percentile(latencies, 99),
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p99_s=percentile(ttfts, 99),
        accept_len=statistics.fmean(s.accept_len for s in samples) if samples else 0.0,
        error_codes=dict(errors),
    )


async def _one_request(client: AsyncAtlasClient, prompt: Prompt, max_tokens: int) -> Sample:
    started = time.perf_counter()
    ttft = 0.0
    tokens = 0
    accept_len = 0.0
    async for chunk in client.generate_stream(messages=prompt.messages, max_tokens=max_tokens):
        if tokens == 0 and chunk.token_ids:
            ttft = time.perf_counter() - started
        tokens += len(chunk.token_ids)
        if chunk.usage is not None:
            accept_len = chunk.usage.accept_len
    return Sample(time.perf_counter() - started, ttft, tokens, accept_len)


async def run_level(
    client: AsyncAtlasClient,
    endpoint: str,
    prompts: list[Prompt],
    concurrency: int,
    duration_s: float,
    max_tokens: int,
) -> Row:
    samples: list[Sample] = []
    errors: dict[str, int] = {}
    next_prompt = itertools.cycle(prompts)
    started = time.perf_counter()
    stop_at = started + duration_s

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            try:
                samples.append(await _one_request(client, next(next_prompt), max_tokens))
            except AtlasError as exc:
                errors[exc.code.name] = errors.get(exc.code.name, 0) + 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summarize(endpoint, concurrency, samples, errors, time.perf_counter() - started)


async def run(
    endpoints: list[tuple[str, str]],
    prompts: list[Prompt],
    concurrency: list[int],
    duration_s: float,
    max_tokens: int,
    client_settings: dict[str, Any],
    warmup: int = 1,
) -> list[Row]:
    rows: list[Row] = []
    for name, address in endpoints:
        async with AsyncAtlasClient(address, retry=NO_RETRY, **client_settings) as client:
            for prompt in prompts[:warmup]:  # first-call costs (allocations) out of the figures
                await _one_request(client, prompt, max_tokens=4)
            for level in concurrency:
                row = await run_level(client, name, prompts, level, duration_s, max_tokens)
                print(format_row(row), flush=True)
                rows.append(row)
    return rows


HEADER = (
    f"{'endpoint':<12} {'conc':>4} {'reqs':>5} {'errs':>4} {'tok/s':>8} {'req/s':>6} "
    f"{'p50 lat':>8} {'p99 lat':>8} {'p50 ttft':>8} {'p99 ttft':>8} {'accept':>6}"
)


def format_row(row: Row) -> str:
    return (
        f"{row.endpoint:<12} {row.concurrency:>4} {row.requests:>5} {row.errors:>4} "
        f"{row.tokens_per_s:>8.2f} {row.requests_per_s:>6.2f} "
        f"{row.latency_p50_s:>7.2f}s {row.latency_p99_s:>7.2f}s "
        f"{row.ttft_p50_s:>7.2f}s {row.ttft_p99_s:>7.2f}s {row.accept_len:>6.2f}"
    )


def write_json(rows: list[Row], path: Path, config: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": config, "rows": [asdict(r) for r in rows]}, indent=2))


def parse_endpoints(values: list[str]) -> list[tuple[str, str]]:
    """``name=host:port`` or ``host:port`` (named by its position)."""
    endpoints = []
    for i, value in enumerate(values):
        name, sep, address = value.partition("=")
        endpoints.append((name, address) if sep else (f"ep{i}", value))
    return endpoints


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--concurrency must be comma-separated integers, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise ValueError("--concurrency levels must be positive")
    return levels


# -- soak: a bounded time of mixed, hostile traffic; nothing may be lost or leak ---------


RSS_WINDOW = 5  # samples whose median is the soak's start / end RSS


@dataclass
class SoakConfig:
    duration_s: float = 180.0
    concurrency: int = 8
    max_tokens: int = 64
    long_share: float = 0.2  # of requests: long prompts (a prefill that stalls the batch)
    long_chars: int = 6000  # about 1,500 tokens of text
    random_share: float = 0.2  # random prompt_token_ids within [0, vocab_size)
    random_tokens: int = 256
    vocab_size: int = 32000  # ids below it are valid for any common vocabulary
    cancel_share: float = 0.2  # streams we cancel after a few chunks
    sample_s: float = 3.0  # RSS sampling period
    warmup_s: float = 20.0  # RSS before this is start-up, not the soak's
    seed: int = 0


@dataclass
class _Outcome:
    kind: str
    status: str  # a gRPC status name, "CANCELLED_BY_US" or "LOST"
    tokens: int
    gaps: list[tuple[float, float]]  # (previous chunk, this chunk), perf_counter times
    prefill: tuple[float, float] | None  # a long prompt: (sent, first chunk)


@dataclass
class SoakReport:
    config: dict[str, Any]
    wall_s: float
    requests: dict[str, int]  # by kind
    statuses: dict[str, int]  # final status of every stream
    lost: int
    tokens: int
    rss: list[tuple[float, float]]  # (seconds since start, bytes)
    rss_start: float  # median of the first RSS_WINDOW samples after warm-up
    rss_end: float  # median of the last RSS_WINDOW samples
    rss_max: float
    rss_growth: float  # (end - start) / start
    gap_p50_s: float
    gap_p99_s: float
    gap_max_s: float
    gaps: int
    # Gaps of running streams that overlapped a long prompt's prefill.
    long_gap_p50_s: float
    long_gap_p99_s: float
    long_gap_max_s: float
    long_gaps: int


def read_rss(metrics_url: str, timeout: float = 5.0) -> float | None:
    """process_resident_memory_bytes from a Prometheus endpoint (None: unreadable)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout) as response:
            text = response.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "process_resident_memory_bytes":
                return float(sample.value)
    return None


def _long_text(prompts: list[Prompt], chars: int, offset: int) -> str:
    corpus = "\n\n".join(content for p in prompts for _, content in p.messages) or "x "
    while len(corpus) < chars + len(corpus) // 2:
        corpus += "\n\n" + corpus
    start = offset % (len(corpus) - chars)
    return "Summarize the following.\n\n" + corpus[start : start + chars]


async def _soak_stream(
    client: AsyncAtlasClient,
    kind: str,
    request: dict[str, Any],
    cancel_after: int | None,
    timeout: float,
) -> _Outcome:
    sent = time.perf_counter()
    last: float | None = None
    gaps: list[tuple[float, float]] = []
    prefill: tuple[float, float] | None = None
    tokens = 0
    finished = False
    chunks = 0
    stream = client.generate_stream(timeout=timeout, **request)
    try:
        async for chunk in stream:
            now = time.perf_counter()
            if last is None:
                if kind == "long":
                    prefill = (sent, now)
            else:
                gaps.append((last, now))
            last = now
            chunks += 1
            tokens += len(chunk.token_ids)
            if chunk.finish_reason is not None:
                finished = True
            if cancel_after is not None and chunks >= cancel_after and not finished:
                return _Outcome(kind, "CANCELLED_BY_US", tokens, gaps, prefill)
    except AtlasError as exc:
        return _Outcome(kind, exc.code.name, tokens, gaps, prefill)
    finally:
        await cast(AsyncGenerator[Any, None], stream).aclose()  # cancels a running RPC
    return _Outcome(kind, "OK" if finished else "LOST", tokens, gaps, prefill)


def _overlaps(gap: tuple[float, float], spans: list[tuple[float, float]]) -> bool:
    return any(gap[0] < end and start < gap[1] for start, end in spans)


async def run_soak(
    address: str,
    metrics_url: str | None,
    prompts: list[Prompt],
    config: SoakConfig,
    client_settings: dict[str, Any],
) -> SoakReport:
    """Closed-loop clients send a random mix (short chat, long text, random ids), cancel
    some streams after a few chunks, and record every stream's end, the gaps between its
    chunks, and the server's RSS every ``sample_s``."""
    import random

    rng = random.Random(config.seed)
    outcomes: list[_Outcome] = []
    rss: list[tuple[float, float]] = []
    started = time.perf_counter()
    stop_at = started + config.duration_s
    timeout = max(120.0, config.duration_s)  # a hung stream ends as DEADLINE_EXCEEDED

    async def sampler() -> None:
        while metrics_url and time.perf_counter() < stop_at:
            value = await asyncio.to_thread(read_rss, metrics_url)
            if value is not None:
                rss.append((time.perf_counter() - started, value))
            await asyncio.sleep(config.sample_s)

    # The kinds in their shares, in a seeded order, repeated: a short soak still gets
    # each kind in its share (independent draws can miss the rarer kinds for a while).
    longs, randoms = round(10 * config.long_share), round(10 * config.random_share)
    mix = ["long"] * longs + ["random_ids"] * randoms + ["short"] * max(0, 10 - longs - randoms)
    rng.shuffle(mix)
    order = itertools.count()

    async def worker(client: AsyncAtlasClient) -> None:
        while time.perf_counter() < stop_at:
            kind = mix[next(order) % len(mix)]
            request: dict[str, Any] = {"max_tokens": config.max_tokens}
            if kind == "long":
                request["prompt"] = _long_text(prompts, config.long_chars, rng.randrange(1 << 30))
            elif kind == "random_ids":
                request["token_ids"] = [
                    rng.randrange(config.vocab_size) for _ in range(config.random_tokens)
                ]
                request["ignore_eos"] = True
            else:
                request["messages"] = rng.choice(prompts).chat
            cancel = rng.randint(1, 4) if rng.random() < config.cancel_share else None
            outcomes.append(await _soak_stream(client, kind, request, cancel, timeout))

    async with AsyncAtlasClient(address, retry=NO_RETRY, **client_settings) as client:
        await asyncio.gather(sampler(), *(worker(client) for _ in range(config.concurrency)))
    wall = time.perf_counter() - started
    return soak_report(config, outcomes, rss, wall)


def soak_report(
    config: SoakConfig, outcomes: list[_Outcome], rss: list[tuple[float, float]], wall_s: float
) -> SoakReport:
    requests: dict[str, int] = {}
    statuses: dict[str, int] = {}
    for o in outcomes:
        requests[o.kind] = requests.get(o.kind, 0) + 1
        statuses[o.status] = statuses.get(o.status, 0) + 1
    spans = [o.prefill for o in outcomes if o.prefill is not None]
    all_gaps = [g for o in outcomes for g in o.gaps]
    gaps = [end - start for start, end in all_gaps]
    long_gaps = [end - start for start, end in all_gaps if _overlaps((start, end), spans)]
    steady = [value for t, value in rss if t >= config.warmup_s] or [v for _, v in rss]
    # Medians of a few samples: one sample can land on a long prompt's transient peak.
    start = statistics.median(steady[:RSS_WINDOW]) if steady else 0.0
    end = statistics.median(steady[-RSS_WINDOW:]) if steady else 0.0
    return SoakReport(
        config=asdict(config),
        wall_s=wall_s,
        requests=requests,
        statuses=statuses,
        lost=statuses.get("LOST", 0),
        tokens=sum(o.tokens for o in outcomes),
        rss=rss,
        rss_start=start,
        rss_end=end,
        rss_max=max((v for _, v in rss), default=0.0),
        rss_growth=(end - start) / start if start else 0.0,
        gap_p50_s=percentile(gaps, 50),
        gap_p99_s=percentile(gaps, 99),
        gap_max_s=max(gaps, default=0.0),
        gaps=len(gaps),
        long_gap_p50_s=percentile(long_gaps, 50),
        long_gap_p99_s=percentile(long_gaps, 99),
        long_gap_max_s=max(long_gaps, default=0.0),
        long_gaps=len(long_gaps),
    )


def format_soak(report: SoakReport) -> str:
    mib = 1 << 20
    lines = [
        f"soak: {report.wall_s:.0f} s, {sum(report.requests.values())} streams "
        + ", ".join(f"{k} {v}" for k, v in sorted(report.requests.items()))
        + f", {report.tokens} tokens",
        f"{'final status':<18} {'streams':>7}",
        *(f"{k:<18} {v:>7}" for k, v in sorted(report.statuses.items())),
        f"{'lost streams':<18} {report.lost:>7}",
        f"RSS after warm-up: start {report.rss_start / mib:.0f} MiB, end "
        f"{report.rss_end / mib:.0f} MiB ({report.rss_growth:+.1%}), max "
        f"{report.rss_max / mib:.0f} MiB, {len(report.rss)} samples",
        f"{'inter-chunk gap':<26} {'n':>6} {'p50':>8} {'p99':>8} {'max':>8}",
        f"{'all running streams':<26} {report.gaps:>6} {report.gap_p50_s:>7.3f}s "
        f"{report.gap_p99_s:>7.3f}s {report.gap_max_s:>7.3f}s",
        f"{'while a long prompt lands':<26} {report.long_gaps:>6} "
        f"{report.long_gap_p50_s:>7.3f}s {report.long_gap_p99_s:>7.3f}s "
        f"{report.long_gap_max_s:>7.3f}s",
    ]
    return "\n".join(lines)


def write_soak_json(report: SoakReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(report), indent=2))
