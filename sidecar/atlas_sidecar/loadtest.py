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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from atlas_sidecar.client import NO_RETRY, AsyncAtlasClient, AtlasError
from atlas_sidecar.workloads import Prompt


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
