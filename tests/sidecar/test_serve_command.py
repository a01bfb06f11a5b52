"""`atlas serve` as the operator runs it: a real process, flags, SIGTERM drains and exits."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest

from atlas_sidecar import cli, models
from atlas_sidecar.client import AtlasClient
from atlas_sidecar.server.commands import server_config_from_args

from .conftest import chat


def test_backends_other_than_torch_fail_clearly(capsys):
    code = cli.main(["serve", "--backend", "sglang", "--sglang-url", "http://127.0.0.1:30000"])
    assert code == 2
    assert "backend 'sglang' is not available yet" in capsys.readouterr().err


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
