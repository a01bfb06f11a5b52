"""The operator-sidecar contract, from both ends: every command line the Deployment
renders is parsed by the real parser of the program it runs (SGLang's own, the
sidecar's own), the parsed values reach that program's configuration, and every
environment variable rendered for the sidecar is one it reads (``SERVE_ENV``) and has an
effect there. A flag or variable the sidecar does not take fails here, not in a pod.

The rollout ConfigMap the operator writes (its three keys, as kubelet mounts them) is
read by the sidecar into the state the operator meant: the canary at its fraction, the
promotion, the rollback.

The trainer Job's command (``atlas trainer``) is parsed by the trainer's own parser the
same way, and its ingest port is the one the trainer Service and the sidecars' mirror
URL name.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from rendered import kubelet_env, sglang_parse

import atlas_operator
from atlas_operator import ROLLOUT_MOUNT_PATH, WEIGHT_VERSION_KEY, crd, render
from atlas_operator import rollout as rollouts
from atlas_operator.spec import validate_spec
from atlas_sidecar import cli, models
from atlas_sidecar.engine.backends.torch_backend import parse_dtype
from atlas_sidecar.serving import commands, healthcheck, rolloutfiles, weights
from tests.learning.test_rollout_files import kubelet_write

OWNER = render.Owner(name="coder", namespace="serving", uid="u-1")
TARGET = "Qwen/Qwen2.5-Coder-1.5B-Instruct"
DRAFT = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
STATIC = {"static": {"model": DRAFT, "revision": "d-rev"}}
TLS = {"tls": {"secretName": "tls"}}
AUTH = {"auth": {"secretName": "tok", "key": "token"}}
ADMIN = {"adminAuth": {"secretName": "admin", "key": "admin-token"}}
# Every switch of the render: static speculator on/off, TLS, auth, GPU or CPU drafters,
# quantization, extra SGLang arguments, a pinned revision, ports off their defaults.
VARIANTS: dict[str, dict[str, Any]] = {
    "minimal": {},
    "static": {"speculators": STATIC},
    "tls": {"sidecar": TLS},
    "auth": {"sidecar": AUTH},
    "admin": {"sidecar": {**AUTH, **ADMIN}},
    "admin-only": {"sidecar": ADMIN},
    "gpu": {"sidecar": {"gpuCount": 1}, "placement": {"gpuCount": 2},
            "serving": {"tensorParallelSize": 2}},
    "everything": {
        "model": {"source": TARGET, "revision": "abc123", "dtype": "float16",
                  "quantization": "fp8"},
        "serving": {"port": 31000, "tensorParallelSize": 4,
                    "extraArgs": ["--context-length", "4096"]},
        "placement": {"gpuCount": 4}, "speculators": STATIC,
        "sidecar": {"port": 50061, "metricsPort": 50052, "gpuCount": 1, **TLS, **AUTH}},
}  # fmt: skip


def spec(**overrides: Any) -> dict[str, Any]:
    return validate_spec({"model": {"source": TARGET}, **overrides})


def containers(endpoint_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    pod = render.render_deployment(OWNER, endpoint_spec)["spec"]["template"]["spec"]
    return {c["name"]: c for c in pod["containers"]}


# -- SGLang ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_sglang_command_line_parses_with_sglangs_parser_to_the_spec(variant: str) -> None:
    endpoint_spec = spec(**VARIANTS[variant])
    container = containers(endpoint_spec)["sglang"]
    assert container["command"] == ["python3", "-m", "sglang.launch_server"]
    parsed = sglang_parse(container["args"])
    model, serving = endpoint_spec["model"], endpoint_spec["serving"]
    assert (parsed.model_path, parsed.revision) == (model["source"], model["revision"])
    assert parsed.dtype == model["dtype"]
    quantization = None if model["quantization"] == "none" else model["quantization"]
    assert parsed.quantization == quantization
    assert parsed.tp_size == serving["tensorParallelSize"]
    assert (parsed.host, parsed.port) == ("127.0.0.1", serving["port"])  # loopback only
    if variant == "everything":
        assert parsed.context_length == 4096  # extraArgs reach SGLang verbatim
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[kind]["exec"]["command"]
        assert command[:2] == ["python3", "-c"]
        compile(command[2], kind, "exec")  # Python that parses...
        assert f"'http://{parsed.host}:{parsed.port}/health'" in command[2]  # ...asks SGLang


@pytest.mark.parametrize("field", ["dtype", "quantization"])
def test_every_model_setting_the_crd_allows_is_one_sglang_takes(field: str) -> None:
    allowed = crd.spec_schema()["properties"]["model"]["properties"][field]["enum"]
    for value in allowed:
        endpoint_spec = spec(model={"source": TARGET, field: value})
        parsed = sglang_parse(containers(endpoint_spec)["sglang"]["args"])
        assert getattr(parsed, field) == (None if value == "none" else value)


# -- the sidecar's command line ------------------------------------------------------


def clear_atlas_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset the ATLAS_* variables the sidecar reads (HOME and HF_HOME stay)."""
    for name in commands.SERVE_ENV:
        if name.startswith("ATLAS_"):
            monkeypatch.delenv(name, raising=False)


def serve_args(container: dict[str, Any]) -> argparse.Namespace:
    """The sidecar's rendered command as ``atlas`` parses it: the console script is
    ``atlas_sidecar.cli:main``, which parses with ``build_parser()``."""
    assert container["command"] == ["atlas"]
    parsed = cli.build_parser().parse_args(container["args"])
    assert parsed.func is commands.cmd_serve
    return parsed


@pytest.mark.parametrize("variant", VARIANTS)
def test_sidecar_command_line_reaches_the_serve_configuration(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clear_atlas_env(monkeypatch)  # the flags alone; the environment is checked below
    endpoint_spec = spec(**VARIANTS[variant])
    pod = containers(endpoint_spec)
    container, sidecar = pod["sidecar"], endpoint_spec["sidecar"]
    args = serve_args(container)
    config = commands.server_config_from_args(args)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert config.host == "0.0.0.0"
    assert config.port == sidecar["port"] == ports["grpc"]
    assert (config.metrics_host, config.metrics_port) == ("0.0.0.0", ports["metrics"])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert config.weight_version_file == Path(mounts["rollout"]) / WEIGHT_VERSION_KEY
    assert mounts["rollout"] == ROLLOUT_MOUNT_PATH
    assert WEIGHT_VERSION_KEY in render.initial_rollout_data()
    check_tls(config, container, mounts, tls="tls" in sidecar)
    check_engine_args(args, endpoint_spec, pod)


def check_tls(config: Any, container: dict[str, Any], mounts: dict[str, str], tls: bool) -> None:
    """TLS files come from the mounted Secret; the exec probes ask the health port."""
    if not tls:
        assert config.tls is None and config.health_port is None
        assert container["readinessProbe"]["grpc"]["port"] == config.port
        return
    assert config.tls.cert_file.parent == config.tls.key_file.parent == Path(mounts["tls"])
    assert (config.tls.cert_file.name, config.tls.key_file.name) == ("tls.crt", "tls.key")
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        command = probe["exec"]["command"]
        assert command[:3] == ["python", "-m", healthcheck.__name__]
        parsed = healthcheck.build_parser().parse_args(command[3:])
        assert parsed.port == config.health_port and parsed.service == ""
        assert parsed.timeout < probe["timeoutSeconds"]  # it answers before kubelet gives up


def check_engine_args(
    args: argparse.Namespace, endpoint_spec: dict[str, Any], pod: dict[str, dict[str, Any]]
) -> None:
    """What `atlas serve` builds its engine from: SGLang where the SGLang container
    listens, the CR's target and draft, the SGLang dtype, GPUs where the limits give
    them, the controller's bound."""
    sglang = sglang_parse(pod["sglang"]["args"])
    assert args.backend == "sglang"
    assert args.sglang_url == f"http://{sglang.host}:{sglang.port}"
    refs = commands.model_refs(args)
    assert refs.target == endpoint_spec["model"]["source"] == sglang.model_path
    assert refs.draft == (endpoint_spec["speculators"]["static"].get("model") or None)
    gpu = endpoint_spec["placement"]["gpuResourceName"]
    gpus = pod["sidecar"]["resources"].get("limits", {}).get(gpu, 0)
    assert args.device == ("cuda" if gpus else "cpu")
    if sglang.dtype != "auto":
        assert parse_dtype(args.dtype, args.device) == getattr(torch, sglang.dtype)
    assert args.lookahead == endpoint_spec["controller"]["maxLookahead"]


# -- the sidecar's environment --------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_env_var_rendered_for_the_sidecar_is_one_it_reads(variant: str) -> None:
    env = containers(spec(**VARIANTS[variant]))["sidecar"]["env"]
    unread = [e["name"] for e in env if e["name"] not in commands.SERVE_ENV]
    assert unread == [], f"rendered for the sidecar, read by nothing: {unread}"


def rendered_env(**overrides: Any) -> dict[str, str]:
    """The sidecar's rendered env with its literal values (secrets left out)."""
    env = containers(spec(**overrides))["sidecar"]["env"]
    return {e["name"]: e["value"] for e in env if "value" in e}


# What the kubelet would find in the Secrets the rendered env names.
SECRETS = {"tok": {"token": "data-token"}, "admin": {"admin-token": "admin-token"}}


@pytest.mark.parametrize("variant", ["minimal", "auth", "admin", "admin-only"])
def test_rendered_token_refs_reach_the_sidecars_auth_configuration(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each token Secret reaches the field of the serve configuration it is for: the
    data token never becomes the admin token, and no admin token is rendered unless
    sidecar.adminAuth names one (the sidecar then refuses admin RPCs)."""
    clear_atlas_env(monkeypatch)
    container = containers(spec(**VARIANTS[variant]))["sidecar"]
    for name, value in kubelet_env(container, {}, SECRETS).items():
        if name.startswith("ATLAS_"):
            monkeypatch.setenv(name, value)
    config = commands.server_config_from_args(serve_args(container))
    sidecar = VARIANTS[variant].get("sidecar", {})
    assert config.auth_token == ("data-token" if "auth" in sidecar else None)
    assert config.admin_token == ("admin-token" if "adminAuth" in sidecar else None)
    assert (render.AUTH_TOKEN_ENV, render.ADMIN_TOKEN_ENV) == (
        commands.AUTH_TOKEN_ENV, commands.ADMIN_TOKEN_ENV)


def fake_hub_cache(home: Path, repo: str, revisions: dict[str, str]) -> dict[str, Path]:
    """A Hugging Face cache under ``home`` (an HF_HOME) holding ``repo`` at each revision
    (name -> commit), laid out as the hub client writes it; the snapshot folders."""
    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    snapshots = {}
    for name, commit in revisions.items():
        (root / "refs" / name).write_text(commit)
        snapshots[name] = root / "snapshots" / commit
        snapshots[name].mkdir(parents=True)
        (snapshots[name] / "config.json").write_text("{}")
    return snapshots


def pinned_and_unpinned_refs(args: list[str], env: dict[str, str]) -> list[dict[str, Any]]:
    """``model_refs`` of a rendered command in a fresh process under ``env`` (the hub
    client reads HF_HOME once, when imported), then with the revisions unset."""
    program = """if True:
        import json, os, sys
        from atlas_sidecar import cli
        from atlas_sidecar.serving.commands import model_refs
        args = cli.build_parser().parse_args(sys.argv[1:])
        pinned = vars(model_refs(args))
        del os.environ["ATLAS_MODEL_REVISION"], os.environ["ATLAS_DRAFT_REVISION"]
        print(json.dumps([pinned, vars(model_refs(args))]))"""
    source = str(Path(cli.__file__).resolve().parents[1])  # this checkout's sidecar
    path = os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", program, *args],
                          env={**os.environ, **env, "PYTHONPATH": path},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    refs: list[dict[str, Any]] = json.loads(done.stdout)
    return refs


def revisions_are_read_from_hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rendered revisions pin target and draft to those snapshots of HF_HOME."""
    overrides = {"model": {"source": TARGET, "revision": "t-rev"}, "speculators": STATIC}
    env = rendered_env(**overrides) | {"HF_HOME": str(tmp_path / "hf")}
    assert (env["ATLAS_MODEL_REVISION"], env["ATLAS_DRAFT_REVISION"]) == ("t-rev", "d-rev")
    target = fake_hub_cache(tmp_path / "hf", TARGET, {"main": "a" * 40, "t-rev": "b" * 40})
    draft = fake_hub_cache(tmp_path / "hf", DRAFT, {"d-rev": "c" * 40})
    args = containers(spec(**overrides))["sidecar"]["args"]
    pinned, unpinned = pinned_and_unpinned_refs(args, env)
    assert pinned == {"target": str(target["t-rev"]), "draft": str(draft["d-rev"])}
    assert unpinned == {"target": TARGET, "draft": DRAFT}


def draft_architecture_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = serve_args(containers(spec(speculators={"static": {"model": DRAFT}}))["sidecar"])
    monkeypatch.setenv("ATLAS_DRAFT_ARCHITECTURE", "draft-lm")
    assert commands.model_refs(args).draft == DRAFT
    monkeypatch.setenv("ATLAS_DRAFT_ARCHITECTURE", "eagle3")
    with pytest.raises(ValueError, match="ATLAS_DRAFT_ARCHITECTURE='eagle3'"):
        commands.model_refs(args)


def tokens_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = serve_args(containers(spec(sidecar=AUTH))["sidecar"])
    monkeypatch.setenv("ATLAS_AUTH_TOKEN", "data-token")
    monkeypatch.setenv("ATLAS_ADMIN_TOKEN", "admin-token")
    config = commands.server_config_from_args(args)
    assert (config.auth_token, config.admin_token) == ("data-token", "admin-token")
    monkeypatch.delenv("ATLAS_AUTH_TOKEN")
    monkeypatch.delenv("ATLAS_ADMIN_TOKEN")
    config = commands.server_config_from_args(args)
    assert (config.auth_token, config.admin_token) == (None, None)


def overrides_replace_references(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATLAS_MODEL_OVERRIDES", f"{TARGET}={tmp_path}, {DRAFT}={tmp_path}")
    assert models.resolve(TARGET) == (str(tmp_path), None)
    monkeypatch.setenv("ATLAS_MODEL_REVISION", "pinned")  # a folder has no revision
    refs = commands.model_refs(serve_args(containers(spec())["sidecar"]))
    assert refs.target == TARGET and models.resolve(refs.target) == (str(tmp_path), None)
    monkeypatch.setenv("ATLAS_MODEL_OVERRIDES", f"{TARGET}")
    with pytest.raises(models.ModelError, match="not ref=replacement"):
        models.resolve(TARGET)


def homes_locate_the_model_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATLAS_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models.cached_model_dir("m") == tmp_path / ".cache" / "atlas" / "models" / "m"
    monkeypatch.setenv("ATLAS_HOME", str(tmp_path / "atlas"))
    assert models.cached_model_dir("m") == tmp_path / "atlas" / "models" / "m"


# Each variable the sidecar reads, and a check that setting it changes what it builds.
HONOURED: dict[str, Callable[[Path, pytest.MonkeyPatch], None]] = {
    "ATLAS_AUTH_TOKEN": tokens_are_read,
    "ATLAS_ADMIN_TOKEN": tokens_are_read,
    "ATLAS_MODEL_REVISION": revisions_are_read_from_hf_home,
    "ATLAS_DRAFT_REVISION": revisions_are_read_from_hf_home,
    "HF_HOME": revisions_are_read_from_hf_home,
    "ATLAS_DRAFT_ARCHITECTURE": draft_architecture_is_checked,
    "ATLAS_MODEL_OVERRIDES": overrides_replace_references,
    "ATLAS_HOME": homes_locate_the_model_cache,
    "HOME": homes_locate_the_model_cache,
}


@pytest.mark.parametrize("name", sorted(commands.SERVE_ENV))
def test_each_env_var_the_sidecar_reads_has_an_effect(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert name in HONOURED, f"{name} is in SERVE_ENV but nothing shows it has an effect"
    clear_atlas_env(monkeypatch)
    HONOURED[name](tmp_path, monkeypatch)


# -- the trainer ----------------------------------------------------------------------

LEARNING = {
    "trainer": {},
    "trainer-gpu-schedule": {"trainer": {"gpuCount": 1, "schedule": {
        "roundIntervalSeconds": 120, "maxRoundSeconds": 1800, "maxStepsPerRound": 50}}},
    "no-trainer": {"trainer": {"enabled": False}},
    "no-adaptive": {"trainer": {"enabled": False}, "speculators": {"adaptive": {
        "enabled": False}}},
}  # fmt: skip


@pytest.mark.parametrize("variant", ["trainer", "trainer-gpu-schedule"])
def test_trainer_command_line_parses_with_the_trainers_parser(variant: str) -> None:
    from atlas_sidecar.learning import report
    from atlas_sidecar.learning.command import check_args, report_namespace

    endpoint_spec = spec(**LEARNING[variant])
    job = render.render_trainer_job(OWNER, endpoint_spec)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["atlas"]
    args = cli.build_parser().parse_args(container["args"])
    check_args(args)
    assert args.func.__name__ == "cmd_trainer"
    model, trainer = endpoint_spec["model"], endpoint_spec["trainer"]
    assert (args.target, args.revision) == (model["source"], model["revision"])
    assert args.device == ("cuda" if trainer["gpuCount"] else "cpu")
    assert args.max_train_steps == trainer["schedule"]["maxStepsPerRound"]
    # It stops cleanly before the Job's deadline kills it.
    assert args.max_runtime < job["spec"]["activeDeadlineSeconds"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    for path in (args.traffic_db, args.weights_store, args.state_dir):
        assert any(str(path).startswith(m + "/") for m in mounts), path
    port = container["ports"][0]["containerPort"]
    assert args.port == port and args.host == "0.0.0.0"
    service = render.render_trainer_service(OWNER)
    assert service["spec"]["ports"][0]["port"] == port
    assert {e["name"] for e in container["env"]} == {"HOME", "HF_HOME"}
    # It reports to its own endpoint, the one object its Role lets it patch (the status).
    assert (args.report_endpoint, report_namespace(args)) == (OWNER.name, OWNER.namespace)
    role = next(r for r in render.render_trainer_rbac(OWNER) if r["kind"] == "Role")
    patchable = [rule for rule in role["rules"] if "patch" in rule["verbs"]]
    assert patchable == [{"apiGroups": [report.GROUP], "resources": [f"{report.PLURAL}/status"],
                          "resourceNames": [args.report_endpoint], "verbs": ["get", "patch"]}]
    assert job["metadata"]["namespace"] == args.report_namespace


@pytest.mark.parametrize("variant", LEARNING)
def test_the_sidecars_learning_flags_reach_its_configuration(variant: str) -> None:
    endpoint_spec = spec(**LEARNING[variant])
    pod = containers(endpoint_spec)
    args = serve_args(pod["sidecar"])
    config = commands.server_config_from_args(args)
    adaptive = endpoint_spec["speculators"]["adaptive"]["enabled"]
    mirrors = adaptive and endpoint_spec["trainer"]["enabled"]
    assert (args.weights_store is not None) == adaptive
    assert args.speculator == ("suffix" if adaptive else "none")
    if not mirrors:
        assert config.mirror is None
        return
    trainer = render.render_trainer_job(OWNER, endpoint_spec)["spec"]["template"]["spec"]
    port = trainer["containers"][0]["ports"][0]["containerPort"]
    assert config.mirror.url == f"{OWNER.name}-trainer.{OWNER.namespace}.svc:{port}"
    assert config.mirror.fraction == endpoint_spec["speculators"]["adaptive"]["mirrorFraction"]
    mounts = {m["name"]: m["mountPath"] for m in pod["sidecar"]["volumeMounts"]}
    assert str(config.mirror.spill_dir) == mounts["spill"]
    volumes = render.render_deployment(OWNER, endpoint_spec)["spec"]["template"]["spec"]
    assert any(v["name"] == "spill" and "emptyDir" in v for v in volumes["volumes"])


def test_the_sidecar_names_the_operators_rollout_keys() -> None:
    for name in ("WEIGHT_VERSION_KEY", "CANARY_VERSION_KEY", "CANARY_FRACTION_KEY"):
        assert getattr(weights, name) == getattr(atlas_operator, name), name
    assert set(rolloutfiles.ROLLOUT_KEYS) == set(render.initial_rollout_data())
    assert weights.DEFAULT_ROLLOUT_DIR == Path(ROLLOUT_MOUNT_PATH)
    serve = cli.build_parser().parse_args(["serve"])
    assert serve.weight_version_file == str(weights.DEFAULT_VERSION_FILE)


def test_the_rollout_configmap_the_operator_writes_is_what_the_sidecar_reads(
    tmp_path: Path,
) -> None:
    """Each of the operator's rollout decisions, rendered into the ConfigMap and written
    as kubelet mounts it, parsed by the sidecar into the state the operator meant."""
    policy = validate_spec({"model": {"source": TARGET}, "rollout": {
        "canaryFraction": 0.25, "canaryDurationSeconds": 600}})["rollout"]  # fmt: skip
    now = rollouts.parse_time("2026-01-01T00:00:00Z")
    assert now is not None
    later = now + rollouts.dt.timedelta(seconds=601)
    files = rolloutfiles.RolloutDir(tmp_path)
    Files = rolloutfiles.RolloutFiles

    def written(plan: rollouts.RolloutPlan) -> rolloutfiles.RolloutFiles | None:
        data = render.render_rollout_configmap(OWNER, plan.configmap_data())["data"]
        kubelet_write(tmp_path, data[WEIGHT_VERSION_KEY],
                      data[atlas_operator.CANARY_VERSION_KEY],
                      data[atlas_operator.CANARY_FRACTION_KEY])  # fmt: skip
        return files.read()

    kubelet_write(tmp_path, *render.initial_rollout_data().values())
    assert files.read() == Files()  # nothing published: the replica serves what it has
    first = rollouts.plan_rollout(policy, rollouts.RolloutState(), "v000001", {}, now)
    assert written(first) == Files("v000001")  # the first version: stable at once
    canary = rollouts.plan_rollout(policy, first.state, "v000002", {}, now)
    assert written(canary) == Files("v000001", "v000002", 0.25)
    promoted = rollouts.plan_rollout(policy, canary.state, "v000002", {}, later)
    assert written(promoted) == Files("v000002")
    again = rollouts.plan_rollout(policy, promoted.state, "v000003", {}, later)
    assert written(again) == Files("v000002", "v000003", 0.25)
    accept = {"v000002": 3.0, "v000003": 1.0}
    rolled_back = rollouts.plan_rollout(policy, again.state, "v000003", accept, later)
    assert rolled_back.events[0].reason == "CanaryRolledBack"
    assert written(rolled_back) == Files("v000002")
