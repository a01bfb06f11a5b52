"""Reading a rendered pod as the programs and the kubelet that run it would."""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Mapping
from typing import Any

import pytest


def sglang_parse(args: list[str]) -> Any:
    """``python3 -m sglang.launch_server ARGS`` as SGLang reads them: its own parser
    (``ServerArgs.add_cli_args``) and record (``ServerArgs.from_cli_args``), as its
    ``prepare_server_args`` does, without the root-logging set-up that also does. The
    installed SGLang (the version the stand-in follows), not the image's."""
    try:
        from sglang.srt.server_args import ServerArgs
    except ImportError as exc:
        pytest.skip(f"SGLang's parser (sglang.srt.server_args) does not import: {exc!r}")
    assert importlib.util.find_spec("sglang.launch_server"), "no module sglang.launch_server"
    parser = argparse.ArgumentParser(prog="sglang serve")
    ServerArgs.add_cli_args(parser)
    return ServerArgs.from_cli_args(parser.parse_args(args))


def kubelet_env(
    container: Mapping[str, Any],
    pod_metadata: Mapping[str, str],
    secrets: Mapping[str, Mapping[str, str]],
) -> dict[str, str]:
    """A container's environment as the kubelet builds it: literal values, the downward
    API's ``metadata.*`` fields, keys of Secrets. Anything else is an error, so a new
    kind of source cannot pass unresolved."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        source = var.get("valueFrom", {})
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "fieldRef" in source:
            env[var["name"]] = pod_metadata[source["fieldRef"]["fieldPath"].split(".", 1)[1]]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[var["name"]] = secrets[ref["name"]][ref["key"]]
        else:
            raise AssertionError(f"no kubelet stand-in for {var}")
    return env
