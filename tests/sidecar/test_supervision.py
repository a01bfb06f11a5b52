"""A supervised worker: if the scheduler's loop dies, nothing hangs and the server says so.

The worker is killed by an exception outside any step's own error handling (in the
loop's bookkeeping, ``_publish_load``). Every request in flight or waiting must then
fail with UNAVAILABLE (each wait here is bounded, so a hang fails the test), new
requests are refused with UNAVAILABLE, gRPC health turns NOT_SERVING (on the main port
and on the loopback health port that the operator's exec probe asks), and ``atlas
serve`` exits non-zero so that Kubernetes restarts it.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from atlas_operator import render
from atlas_operator.spec import validate_spec
from atlas_sidecar import cli, models
from atlas_sidecar.serving import healthcheck
from atlas_sidecar.serving.app import ServerThread, TlsConfig
from atlas_sidecar.serving.client import NO_RETRY, AtlasClient, AtlasError
from atlas_sidecar.serving.commands import server_config_from_args
from atlas_sidecar.serving.scheduler import Scheduler

from .conftest import PROMPTS, chat, serving, wait_until

WAIT_S = 60.0  # only guards against a hang
LONG = {"max_tokens": 2000, "ignore_eos": True}


def test_a_dead_worker_fails_every_request_unavailable_and_health_turns_not_serving(
    served, client_for, monkeypatch
):
    kill = threading.Event()
    publish_load = Scheduler._publish_load

    def dying_publish_load(self):
        # Only on the worker's own thread: callers publish load from submit() too.
        if kill.is_set() and threading.current_thread() is self._thread:
            raise RuntimeError("injected: the worker's bookkeeping failed")
        publish_load(self)

    monkeypatch.setattr(Scheduler, "_publish_load", dying_publish_load)
    with serving(served.engine, max_batch=1, max_queue=4, health_port=0) as server:
        client = client_for(server, retry=NO_RETRY, timeout=WAIT_S)
        assert client.health() == "SERVING"
        assert healthcheck.check(server.server.health_port) == "SERVING"
        in_flight = client.generate_stream(messages=chat(PROMPTS[0]), **LONG)
        first = next(in_flight)
        assert first.finish_reason is None
        with ThreadPoolExecutor(1) as pool:
            # The batch holds one sequence: this one waits in the queue.
            waiting = pool.submit(client.generate, messages=chat(PROMPTS[1]), max_tokens=4)
            wait_until(lambda: server.server.scheduler.queued == 1, "the request to queue")
            kill.set()
            with pytest.raises(AtlasError) as streamed:
                for _ in in_flight:
                    pass
            with pytest.raises(AtlasError) as queued:
                waiting.result(timeout=WAIT_S)
        assert streamed.value.code == grpc.StatusCode.UNAVAILABLE
        assert queued.value.code == grpc.StatusCode.UNAVAILABLE
        assert "serving worker failed" in queued.value.details
        wait_until(lambda: client.health() == "NOT_SERVING", "health to turn NOT_SERVING")
        assert client.health("atlas.v1.Atlas") == "NOT_SERVING"
        assert healthcheck.check(server.server.health_port) == "NOT_SERVING"
        assert healthcheck.main(["--port", str(server.server.health_port)]) == 1
        with pytest.raises(AtlasError) as refused:
            client.generate(messages=chat(PROMPTS[2]), max_tokens=4)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        assert isinstance(server.server.worker_error, RuntimeError)
    assert served.idle()


# ``atlas serve`` as a process whose worker dies on its first admission.
DYING_SERVE = textwrap.dedent("""
    import sys
    from atlas_sidecar import cli
    from atlas_sidecar.serving.scheduler import Scheduler

    def _admit(self, job):
        raise RuntimeError("injected: admission failed outside its own error handling")

    Scheduler._admit = _admit
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_atlas_serve_exits_non_zero_when_its_worker_dies():
    process = subprocess.Popen(
        [sys.executable, "-c", DYING_SERVE, "serve", "--port", "0", "--metrics-port", "0",
         "--health-port", "0", "--target", models.TEST_MODEL, "--dtype", "fp32",
         "--speculator", "none"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    log: list[str] = []
    try:
        port = None
        for line in process.stderr:  # type: ignore[union-attr]
            log.append(line)
            if match := re.search(r"serving atlas\.v1\.Atlas on [\d.]+:(\d+)", line):
                port = int(match.group(1))
                break
        assert port, "the server never reported its port:\n" + "".join(log)
        with AtlasClient(f"127.0.0.1:{port}", timeout=WAIT_S, retry=NO_RETRY) as client:
            with pytest.raises(AtlasError) as failed:
                client.generate(messages=chat("Name a color."), max_tokens=4)
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE
        _, rest = process.communicate(timeout=WAIT_S)
        assert process.returncode == 1
        log.append(rest)
        assert "worker died" in "".join(log)
        assert "injected: admission failed" in "".join(log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_rendered_tls_probe_asks_the_health_port_the_sidecar_serves(served, certs):
    """Both ends: the operator's exec probe, run as kubelet would, against a sidecar
    configured from the operator's own rendered args (with TLS on the main port)."""
    spec = validate_spec({"model": {"source": "m"}, "sidecar": {"tls": {"secretName": "t"}}})
    owner = render.Owner(name="coder", namespace="serving", uid="u-1")
    container = render.sidecar_container(owner, spec)
    args = cli.build_parser().parse_args(container["args"])
    args.backend = "torch"  # the rendered SGLang backend is not what this test is about
    config = dataclasses.replace(
        server_config_from_args(args), host="127.0.0.1", port=0, metrics_port=None,
        tls=TlsConfig(certs.server_cert, certs.server_key), weight_version_file=None,
    )  # fmt: skip
    command = container["readinessProbe"]["exec"]["command"]
    assert command[0] == "python"
    probe = [sys.executable, *command[1:]]
    with ServerThread(served.engine, config) as server:
        assert server.server.health_port == config.health_port
        answer = subprocess.run(probe, capture_output=True, text=True, timeout=WAIT_S)
        assert (answer.returncode, answer.stdout.strip()) == (0, "SERVING")
    # Stopped: the probe fails (the kubelet restarts or unreadies the container).
    answer = subprocess.run(probe, capture_output=True, text=True, timeout=WAIT_S)
    assert answer.returncode == 1
