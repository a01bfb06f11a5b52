"""`atlas serve` as the operator runs it: a real process, flags, SIGTERM drains and exits."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from atlas_sidecar import cli, models
from atlas_sidecar.serving.client import AtlasClient
from atlas_sidecar.serving.commands import server_config_from_args

from .conftest import chat


def test_backends_other_than_torch_sglang_and_triton_fail_clearly(capsys):
    code = cli.main(["serve", "--backend", "vllm"])
    assert code == 2
    assert "backend 'vllm' is not available yet" in capsys.readouterr().err


def test_sglang_backend_needs_its_url(capsys):
    assert cli.main(["serve", "--backend", "sglang"]) == 2
    assert "--backend sglang needs --sglang-url" in capsys.readouterr().err


def test_triton_backend_needs_its_url(capsys):
    assert cli.main(["serve", "--backend", "triton"]) == 2
    assert "--backend triton needs --triton-url" in capsys.readouterr().err


def test_sglang_serve_waits_for_sglang_before_reading_the_targets_files(tmp_path):
    # In a pod SGLang downloads the target into the shared cache and is healthy only
    # after: the sidecar must wait for it before looking for the files, not exit on
    # their absence (a revision nobody has downloaded stands for that here).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there
    env = {**os.environ, "ATLAS_MODEL_REVISION": "0" * 40, "HF_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "atlas_sidecar.cli", "serve", "--backend", "sglang",
         "--sglang-url", f"http://127.0.0.1:{port}", "--sglang-wait", "2",
         "--target", "HuggingFaceTB/SmolLM2-135M-Instruct", "--speculator", "suffix"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "not healthy after 2 s" in done.stderr, done.stderr[-2000:]
    assert "is not in the Hugging Face cache" not in done.stderr


def test_serve_flags_become_the_server_config(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_AUTH_TOKEN", "from-env")
    admin = tmp_path / "admin"
    admin.write_text("from-file\n")
    args = cli.build_parser().parse_args([
        "serve", "--host", "0.0.0.0", "--port", "6000", "--metrics-port", "0",
        "--max-batch", "3", "--max-queue", "5", "--max-prompt-tokens", "99",
        "--admin-token-file", str(admin), "--prefill-budget", "64",
    ])  # fmt: skip
    config = server_config_from_args(args)
    assert config.prefill_budget == 64
    assert (config.host, config.port, config.metrics_port) == ("0.0.0.0", 6000, None)
    assert (config.max_batch, config.max_queue) == (3, 5)
    assert config.limits.max_prompt_tokens == 99
    assert config.limits.max_prompt_chars == 100_000  # the server's default
    assert (config.auth_token, config.admin_token) == ("from-env", "from-file")


def test_hardening_and_metrics_flags_become_the_server_config():
    def config(*flags: str):
        return server_config_from_args(cli.build_parser().parse_args(["serve", *flags]))

    default = config()
    assert default.metrics_host == "127.0.0.1"  # /metrics has no auth: loopback unless asked
    assert default.queue_timeout_s == 60.0 and default.max_concurrent_rpcs == 1024
    given = config(
        "--metrics-host", "0.0.0.0", "--max-concurrent-rpcs", "100", "--queue-timeout", "5",
        "--keepalive-time", "30", "--keepalive-timeout", "4", "--min-ping-interval", "20",
        "--max-connection-idle", "0", "--max-connection-age", "900",
        "--max-connection-age-grace", "60",
    )  # fmt: skip
    assert given.metrics_host == "0.0.0.0"
    assert (given.max_concurrent_rpcs, given.queue_timeout_s) == (100, 5.0)
    assert (given.keepalive_time_s, given.keepalive_timeout_s) == (30.0, 4.0)
    assert given.min_client_ping_interval_s == 20.0
    assert given.max_connection_idle_s is None  # 0: no bound
    assert (given.max_connection_age_s, given.max_connection_age_grace_s) == (900.0, 60.0)
    with pytest.raises(ValueError, match="keepalive-time"):
        config("--keepalive-time", "0")


def test_tls_flags_must_come_in_pairs(capsys):
    assert cli.main(["serve", "--tls-cert", "server.pem"]) == 2
    assert "--tls-cert and --tls-key" in capsys.readouterr().err


def test_serve_process_answers_then_drains_on_sigterm(tmp_path):
    version_file = tmp_path / "weight-version"
    version_file.write_text("drafter-v7\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "atlas_sidecar.cli", "serve", "--port", "0",
         "--metrics-port", "0", "--target", models.TEST_MODEL, "--dtype", "fp32",
         "--draft-num-layers", "2", "--weight-version-file", str(version_file)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        port = None
        for line in process.stderr:  # type: ignore[union-attr]
            if match := re.search(r"serving atlas\.v1\.Atlas on [\d.]+:(\d+)", line):
                port = int(match.group(1))
                break
        assert port, "the server never reported its port"
        with AtlasClient(f"127.0.0.1:{port}", timeout=120) as client:
            result = client.generate(messages=chat("Name a color."), max_tokens=4)
            stats = client.stats()
        assert len(result.token_ids) == 4
        assert result.weight_version == "drafter-v7"
        assert stats.weight_version == "drafter-v7"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            pytest.fail("the server did not exit on SIGTERM")
