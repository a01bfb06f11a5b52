"""Pod-local end to end: the sidecar command the operator renders for
``examples/atlasendpoint-minimal.yaml``, run exactly as rendered (a real ``atlas``
process, its command, args and environment unchanged) beside the SGLang stand-in on the
port the render names, answers gRPC health SERVING on the port its probe asks and a
greedy Generate equal to the target's own output.

What differs from a pod goes through documented settings, never a hand-written command:
- the CR's model names are mapped to the cached small test model by
  ``ATLAS_MODEL_OVERRIDES`` (README, "Kubernetes"), and the registry cache is this
  machine's (``ATLAS_HOME``: the rendered ``HOME`` is the pod's ``/tmp``);
- ports the render names that are taken here are moved by rendering a CR that names free
  ones (the command is still rendered, never written by hand);
- the pod's volume mounts are empty directories under the test's tmp, as the kubelet
  gives a pod's first start: an argument naming a path under a container mountPath
  names the same path under its directory there (nothing else in the command changes).
So there is no rollout file yet and the sidecar serves the ``base`` weight version; the
weights store is empty, and the trainer the mirror names is not there, so finished
requests wait in the spill directory. The stand-in runs the
target in float32 (the SGLang args say bfloat16) so that its answers and the reference,
computed on the same weights, agree to the token.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from rendered import kubelet_env, sglang_parse

import atlas_sidecar
from atlas_operator import render
from atlas_operator.spec import validate_endpoint
from atlas_sidecar import models
from atlas_sidecar.engine.backends.torch_backend import CausalLMRunner
from atlas_sidecar.engine.core import Engine
from atlas_sidecar.engine.sampling import SamplingParams
from atlas_sidecar.serving import healthcheck
from atlas_sidecar.serving.client import AtlasClient
from atlas_sidecar.tooling.workloads import Prompt, encode
from tests.standins.sglang_server import SGLangStandin

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "atlasendpoint-minimal.yaml"
PROMPT = "Name three colors."
MAX_TOKENS = 12
START_LIMIT_S = 90.0


def taken(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def free_ports(count: int) -> list[int]:
    """Distinct ports free now (held together while picked, so never the same one)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def minimal_endpoint() -> tuple[dict[str, Any], dict[str, Any]]:
    """The example as the operator sees it (uid set by the apiserver, defaults applied
    as the operator applies them), its ports moved only if this machine has them taken."""
    body = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"]["uid"] = "pod-local"
    spec = validate_endpoint(body)
    ports = [spec["sidecar"]["port"], spec["sidecar"]["metricsPort"], spec["serving"]["port"]]
    if any(taken(port) for port in ports):
        grpc_port, metrics_port, sglang_port = free_ports(3)
        body["spec"].setdefault("sidecar", {}).update(port=grpc_port, metricsPort=metrics_port)
        body["spec"].setdefault("serving", {})["port"] = sglang_port
        spec = validate_endpoint(body)
    return body, spec


def model_overrides(spec: dict[str, Any]) -> str:
    """Every model the CR names, mapped to the small test model."""
    named = [spec["model"]["source"], spec["speculators"]["static"].get("model")]
    return ",".join(f"{name}={models.TEST_MODEL}" for name in named if name)


def process_env(
    container: dict[str, Any], body: dict[str, Any], spec: dict[str, Any]
) -> dict[str, str]:
    """The container's rendered environment, resolved as the kubelet would, plus what
    the image and this machine supply: PATH to ``atlas``, this checkout's code, and
    the two documented settings of the module docstring."""
    pod_metadata = {"name": f"{body['metadata']['name']}-0", **body["metadata"]}
    source = str(Path(atlas_sidecar.__file__).resolve().parents[1])
    pythonpath = os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))
    return {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        "PYTHONPATH": pythonpath,
        **kubelet_env(container, pod_metadata, secrets={}),
        models.ATLAS_HOME_ENV: str(models.atlas_home()),
        models.MODEL_OVERRIDES_ENV: model_overrides(spec),
    }


def target_reference(runner: CausalLMRunner) -> list[int]:
    """The target's own greedy output, on its own caches, before any server runs."""
    own = CausalLMRunner(runner.model, runner.tokenizer)
    ids = encode(own.tokenizer, Prompt("chat", "pod-local", (("user", PROMPT),)))
    return Engine(own, own.tokenizer).generate(ids, SamplingParams(max_tokens=MAX_TOKENS)).token_ids


def mounted(container: dict[str, Any], root: Path) -> list[str]:
    """The container's args with each path under one of its mountPaths moved under
    ``root`` (the volumes a kubelet would mount there, empty)."""
    mounts = sorted((m["mountPath"] for m in container["volumeMounts"]), key=len, reverse=True)
    args = []
    for arg in container["args"]:
        base = next((m for m in mounts if arg == m or arg.startswith(m + "/")), None)
        if base is not None:
            (root / base.lstrip("/")).mkdir(parents=True, exist_ok=True)
            arg = str(root / arg.lstrip("/"))
        args.append(arg)
    return args


def wait_serving(process: subprocess.Popen[str], port: int, log: list[str]) -> None:
    """Poll the gRPC health service as the readiness probe does, until SERVING."""
    deadline = time.monotonic() + START_LIMIT_S
    while (status := healthcheck.check(port, timeout_s=2.0)) != "SERVING":
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"sidecar not SERVING ({status}, exit {process.poll()}):\n"
                        + "".join(log[-30:]))  # fmt: skip
        time.sleep(0.5)


def test_the_rendered_sidecar_command_serves_the_targets_greedy_output(tmp_path: Path) -> None:
    body, spec = minimal_endpoint()
    pod = render.render_deployment(render.owner_from_body(body), spec)["spec"]["template"]
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    sidecar, sglang = containers["sidecar"], sglang_parse(containers["sglang"]["args"])
    assert sglang.host == "127.0.0.1" and sglang.port == spec["serving"]["port"]
    models.pull(models.TEST_MODEL)  # a no-op when cached
    runner = CausalLMRunner.load(models.TEST_MODEL, dtype="fp32")
    reference = target_reference(runner)
    standin = SGLangStandin(runner, sglang.model_path, port=sglang.port).start()
    env = process_env(sidecar, body, spec)
    command = [*sidecar["command"], *mounted(sidecar, tmp_path / "mounts")]
    process = subprocess.Popen(command, env=env, cwd=tmp_path, text=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(process.stderr or ()), daemon=True).start()
    try:
        wait_serving(process, sidecar["readinessProbe"]["grpc"]["port"], log)
        grpc_port = next(p["containerPort"] for p in sidecar["ports"] if p["name"] == "grpc")
        with AtlasClient(f"127.0.0.1:{grpc_port}", timeout=60) as client:
            result = client.generate(messages=[{"role": "user", "content": PROMPT}],
                                     max_tokens=MAX_TOKENS)  # fmt: skip
        assert list(result.token_ids) == reference
        assert result.weight_version == "base"  # no rollout file mounted here
        spill = Path(mounted(sidecar, tmp_path / "mounts")[
            sidecar["args"].index("--mirror-spill-dir") + 1])
        assert standin.rejected == [], "the sidecar sent requests SGLang would refuse"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, "".join(log[-30:])
        # The trainer was never there: the request waits in the spill for the next one.
        assert sum(f.stat().st_size for f in spill.iterdir() if f.is_file()) > 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        standin.stop()
