"""The soak load test against a real server: mixed, hostile traffic loses nothing."""

from __future__ import annotations

import asyncio

from atlas_sidecar.tooling import loadtest
from atlas_sidecar.tooling.workloads import Prompt

from .conftest import PROMPTS, serving


def test_soak_mix_ends_every_stream_with_a_status_and_none_internal(served):
    prompts = [Prompt("chat", str(i), (("user", text),)) for i, text in enumerate(PROMPTS)]
    config = loadtest.SoakConfig(
        duration_s=15,
        concurrency=4,
        max_tokens=12,
        long_chars=1500,
        random_tokens=64,
        vocab_size=served.target.vocab_size,
        sample_s=1.0,
        warmup_s=0.0,
    )
    with serving(served.engine, metrics_port=0, max_batch=4) as server:
        metrics = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
        report = asyncio.run(loadtest.run_soak(server.address, metrics, prompts, config, {}))
    assert report.lost == 0
    assert "INTERNAL" not in report.statuses
    # Every kind ran; each stream ended done or cancelled by us, nothing else.
    assert set(report.requests) == {"short", "long", "random_ids"}
    assert set(report.statuses) <= {"OK", "CANCELLED_BY_US"} and report.statuses["OK"] > 0
    assert report.rss and report.rss_max > 0
    assert report.gaps > 0 and report.gap_max_s >= report.gap_p99_s >= report.gap_p50_s > 0
    assert "lost streams" in loadtest.format_soak(report)
    assert served.idle()
