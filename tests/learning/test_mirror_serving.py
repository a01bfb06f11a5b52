"""The mirror inside the real sidecar (SmolLM2-135M): real Generate calls, mirrored to a
real ingest server on loopback; and `atlas serve`'s mirror flags."""

from __future__ import annotations

import re
import socket
import time

import pytest

from atlas_sidecar import cli
from atlas_sidecar.serving.commands import server_config_from_args
from atlas_sidecar.serving.mirror import MirrorConfig
from atlas_sidecar.tooling.workloads import Prompt, encode
from tests.sidecar import conftest as sidecar
from tests.sidecar.conftest import chat, serving

from .conftest import metric, wait_until

# The sidecar tests' fixtures: the model loaded once, torch seeded, clients closed.
served = sidecar.served
client_for = sidecar.client_for
_deterministic = sidecar._deterministic

MAX_TOKENS = 8


def mirrored(trainer, tmp_path, **config) -> MirrorConfig:
    return MirrorConfig(url=trainer.address, replica="pod-a", spill_dir=tmp_path / "spill",
                        **config)  # fmt: skip


def test_generate_calls_arrive_in_the_store_with_their_ids_and_tokens(
    served, store, trainer, tmp_path, client_for
):
    texts = ["Name a color.", "What is 2 + 2?", "Name a planet."]
    with serving(served.engine, mirror=mirrored(trainer, tmp_path)) as server:
        client = client_for(server, timeout=120)
        greedy = [client.generate(messages=chat(t), max_tokens=MAX_TOKENS) for t in texts]
        sampled = client.generate(messages=chat(texts[0]), max_tokens=MAX_TOKENS,
                                  temperature=0.8, seed=3)  # fmt: skip
        wait_until(lambda: store.count() == 4, "four records stored")
    records = {r.output_ids: r for _, r in store.read()}
    tok = served.target.tokenizer
    for text, response in zip([*texts, texts[0]], [*greedy, sampled], strict=True):
        record = records[tuple(response.token_ids)]
        assert re.fullmatch(r"pod-a/[0-9a-f]{32}", record.request_id)
        assert record.replica == "pod-a"
        assert list(record.prompt_ids) == encode(tok, Prompt("t", "t", (("user", text),)))
        assert len(record.step_drafted) == response.usage.target_forwards - 1
        assert sum(record.step_drafted) == response.usage.drafted
        assert sum(record.step_accepted) == response.usage.accepted
        assert set(record.step_speculators) <= {"static", "none"}
        assert record.weight_version == response.weight_version
        assert record.sampled == (response is sampled)
    assert len({r.request_id for r in records.values()}) == 4


def test_a_stalled_trainer_never_slows_generate(served, store, trainer, tmp_path, client_for):
    config = mirrored(trainer, tmp_path, ack_timeout_s=1.0, retry_max_s=0.5)
    texts = ["Name a fruit.", "Say hello in French.", "Name a month of the year."]
    with serving(served.engine, mirror=config) as server:
        client = client_for(server, timeout=60)
        started = time.monotonic()
        for text in texts:  # the trainer is healthy: the baseline
            client.generate(messages=chat(text), max_tokens=MAX_TOKENS)
        healthy_s = time.monotonic() - started
        wait_until(lambda: store.count() == 3, "the healthy trainer stored them")
        store.gate.clear()
        client.generate(messages=chat("Name a color."), max_tokens=MAX_TOKENS)
        wait_until(store.waiting.is_set, "the trainer's handler blocked on a record")
        started = time.monotonic()
        for text in texts:
            client.generate(messages=chat(text), max_tokens=MAX_TOKENS)
        stalled_s = time.monotonic() - started
        assert not store.gate.is_set() and store.count() == 3  # still blocked throughout
        assert stalled_s < 3 * healthy_s + 2.0, (healthy_s, stalled_s)
        store.gate.set()
        wait_until(lambda: store.count() == 7, "every record once the trainer resumed")
        registry = server.server.stats.registry
        assert metric(registry, "atlas_mirror_records_total") == 7
    assert len({r.request_id for _, r in store.read()}) == 7


def test_mirror_flags_become_the_mirror_config(tmp_path):
    def config(*flags: str):
        return server_config_from_args(cli.build_parser().parse_args(["serve", *flags]))

    assert config().mirror is None  # off unless --mirror-url
    given = config(
        "--mirror-url", "trainer:50061", "--mirror-fraction", "0.25",
        "--mirror-spill-dir", str(tmp_path), "--mirror-spill-bytes", "1000000",
        "--mirror-queue-bytes", "50000", "--replica-name", "pod-7",
    ).mirror  # fmt: skip
    assert (given.url, given.fraction, given.replica) == ("trainer:50061", 0.25, "pod-7")
    assert (given.spill_dir, given.spill_bytes, given.queue_bytes) == (tmp_path, 10**6, 50000)
    assert config("--mirror-url", "t:1").mirror.replica == socket.gethostname()
    assert config("--mirror-url", "t:1").mirror.spill_dir is None
    with pytest.raises(ValueError, match="--mirror-fraction"):
        config("--mirror-url", "t:1", "--mirror-fraction", "1.5")
    with pytest.raises(ValueError, match="--replica-name"):
        config("--mirror-url", "t:1", "--replica-name", "a/b")
