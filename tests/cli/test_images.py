"""The container images run what the operator renders: each Dockerfile's entrypoint and
the extras it installs, against the packages that command imports."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from atlas_sidecar import cli

REPO = Path(__file__).resolve().parents[2]
# What each image's command needs beyond torch, by distribution name: the trainer ingests
# over gRPC and reports to its endpoint's status; the sidecar serves gRPC, Triton, S3.
NEEDS = {
    "trainer": {"grpcio", "kubernetes"},
    "sidecar": {"grpcio", "grpcio-health-checking", "tritonclient[grpc]", "boto3"},
}


def _image(name: str) -> tuple[list[str], list[str], set[str]]:
    """(ENTRYPOINT, CMD, distributions the extras installed from /src bring)."""
    text = (REPO / "docker" / f"{name}.Dockerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (.+)$", text, re.M).group(1))
    extras = re.search(r'"/src\[([a-z0-9_,]+)\]"', text).group(1).split(",")
    optional = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    dists = {re.split(r"[=<>~ ]", req, maxsplit=1)[0] for e in extras for req in optional[e]}
    assert "-c /tmp/lock.txt" in text, "the image installs from the lock"
    return entry, cmd, dists


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_an_image_installs_what_its_command_imports(name):
    entry, _, dists = _image(name)
    assert entry == ["atlas"]
    assert NEEDS[name] <= dists, NEEDS[name] - dists


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_an_image_default_command_is_one_the_cli_takes(name, capsys):
    _, cmd, _ = _image(name)
    try:
        cli.build_parser().parse_args(cmd)
    except SystemExit as exc:  # --help
        assert exc.code == 0
    assert cmd[0] == {"trainer": "trainer", "sidecar": "serve"}[name]
