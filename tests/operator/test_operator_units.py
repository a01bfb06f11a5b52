"""Pure parts of the operator: rendering, the rollout decision, the idempotent apply."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from atlas_operator import kube, render, rollout, status
from atlas_operator.spec import InvalidSpecError, validate_spec

OWNER = render.Owner(name="coder", namespace="serving", uid="u-1")
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def spec(**overrides: Any) -> dict[str, Any]:
    return validate_spec({"model": {"source": "Qwen/Qwen2.5-Coder-1.5B-Instruct"}, **overrides})


def test_pod_template_does_not_depend_on_weight_versions() -> None:
    # The rollout ConfigMap carries the version; the template must not, or pods would restart.
    rendered = str(render.render_deployment(OWNER, spec()))
    assert "weight-version" in rendered  # the file path the sidecar reads...
    configmap = render.render_rollout_configmap(OWNER, {"weight-version": "w-9"})
    assert configmap["data"]["weight-version"] == "w-9"
    assert "w-9" not in rendered  # ...but never a version itself


def test_sidecar_args_parse_with_the_real_sidecar_cli() -> None:
    cli = pytest.importorskip("atlas_sidecar.cli")
    args = render.sidecar_args(OWNER, spec(speculators={"static": {"model": "Qwen/Qwen2.5-0.5B"}},
                                    sidecar={"tls": {"secretName": "t"}}))
    parsed = cli.build_parser().parse_args(args)
    assert parsed.command == "serve" and parsed.port == 50051 and parsed.lookahead == 8
    assert parsed.sglang_url == "http://127.0.0.1:30000" and parsed.tls_cert


def test_tls_switches_sidecar_probes_to_the_loopback_health_port_and_auth_by_reference() -> None:
    container = render.sidecar_container(OWNER, spec(sidecar={"tls": {"secretName": "t"},
                                                        "auth": {"secretName": "tok"}}))
    # kubelet's gRPC probe cannot do TLS: an exec probe asks the plaintext loopback port
    # that the same container's args open.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[:3] == ["python", "-m", "atlas_sidecar.serving.healthcheck"]
        port = command[command.index("--port") + 1]
        assert container["args"][container["args"].index("--health-port") + 1] == port
    # Plaintext: kubelet's gRPC probe.
    assert "--health-port" not in render.sidecar_args(OWNER, spec())
    assert render.sidecar_container(OWNER, spec())["readinessProbe"]["grpc"] == {"port": 50051}
    clash = spec(sidecar={"tls": {"secretName": "t"}, "metricsPort": 50052})
    assert render.sidecar_health_port(clash) == 50053
    token = next(e for e in container["env"] if e["name"] == "ATLAS_AUTH_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "tok", "key": "token"}


def test_admin_token_is_its_own_secret() -> None:
    def env(**sidecar: Any) -> dict[str, Any]:
        container = render.sidecar_container(OWNER, spec(sidecar=sidecar))
        return {e["name"]: e.get("valueFrom") for e in container["env"]}

    # Never defaulted from the data token: no adminAuth, no admin token (admin RPCs off).
    assert "ATLAS_ADMIN_TOKEN" not in env(auth={"secretName": "tok"})
    both = env(auth={"secretName": "tok"}, adminAuth={"secretName": "adm"})
    assert both["ATLAS_AUTH_TOKEN"] == {"secretKeyRef": {"name": "tok", "key": "token"}}
    assert both["ATLAS_ADMIN_TOKEN"] == {"secretKeyRef": {"name": "adm", "key": "token"}}
    # Another key of the same Secret is another token; the same Secret key is not.
    env(auth={"secretName": "tok"}, adminAuth={"secretName": "tok", "key": "admin"})
    for admin in ({"secretName": "tok"}, {"secretName": "tok", "key": "token"}):
        with pytest.raises(InvalidSpecError, match="sidecar.adminAuth must name another "
                                                   "Secret or key than sidecar.auth"):
            spec(sidecar={"auth": {"secretName": "tok"}, "adminAuth": admin})


def test_only_children_the_endpoint_controls_count_as_its_own() -> None:
    rendered = {c["kind"]: c for c in render.render_children(OWNER, spec())}
    trainer = render.trainer_children(OWNER)
    assert {kind for _, kind, _ in trainer} - {"Job"} <= set(rendered)
    assert render.controlled_by(render.render_trainer_job(OWNER, spec()), OWNER)
    other = render.Owner(name="coder", namespace="serving", uid="u-2")  # same name, reborn
    assert not render.controlled_by(rendered["ServiceAccount"], other)
    assert not render.controlled_by({"metadata": {"name": "coder-trainer"}}, OWNER)
    not_controller = {"metadata": {"ownerReferences": [
        {**render.owner_reference(OWNER), "controller": False}]}}
    assert not render.controlled_by(not_controller, OWNER)
    # Off, nothing of the trainer is rendered: the operator deletes what it left.
    off = {(c["kind"], c["metadata"]["name"])
           for c in render.render_children(OWNER, spec(trainer={"enabled": False}))}
    assert not off & {(kind, name) for _, kind, name in trainer}


@pytest.mark.parametrize(("mode", "replicas", "trainer", "ok", "reason"), [
    ("ReadWriteMany", 4, True, True, "SharedAcrossNodes"),
    ("ReadWriteOnce", 1, False, True, "SinglePod"),
    ("ReadWriteOncePod", 1, False, True, "SinglePod"),
    ("ReadWriteOnce", 0, True, True, "SinglePod"),  # scaled to zero: the trainer alone
    ("ReadWriteOnce", 2, False, False, "SingleNodeAccessMode"),
    ("ReadWriteOnce", 1, True, False, "SingleNodeAccessMode"),
    ("ReadWriteOncePod", 1, True, False, "SinglePodAccessMode"),
])
def test_storage_condition_fits_the_access_mode_to_the_pods_that_mount_it(
        mode: str, replicas: int, trainer: bool, ok: bool, reason: str) -> None:
    got = status.storage_condition(mode, replicas, trainer)
    assert got[:2] == (ok, reason)
    if reason == "SingleNodeAccessMode":  # says what goes wrong, and what to do
        assert "hang in ContainerCreating" in got[2] and "ReadWriteMany" in got[2]
    if trainer and not ok:
        assert "the trainer pod" in got[2]


def test_storage_default_stays_shared_and_the_live_mode_wins() -> None:
    # The default does not follow replicas: the PVC is made once, replicas change later.
    for replicas in (1, 3):
        assert spec(replicas=replicas)["storage"]["accessMode"] == "ReadWriteMany"
    pvc = render.render_data_pvc(OWNER, spec(storage={"accessMode": "ReadWriteOnce"},
                                             trainer={"enabled": False}))
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    # The spec asked for ReadWriteMany after the PVC was made ReadWriteOnce: still broken.
    ok, _, message = status.storage_condition("ReadWriteOnce", 3, False, "ReadWriteMany")
    assert not ok and "immutable" in message


def test_gpus_go_to_limits_of_the_right_containers() -> None:
    deployment = render.render_deployment(OWNER, spec(placement={"gpuCount": 4},
                                                      serving={"tensorParallelSize": 4}))
    sglang, sidecar = deployment["spec"]["template"]["spec"]["containers"]
    assert sglang["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert "--tp-size" in sglang["args"] and "4" in sglang["args"]
    assert "limits" not in sidecar["resources"]  # sidecar.gpuCount defaults to 0


def policy(**overrides: Any) -> dict[str, Any]:
    return {**spec()["rollout"], **overrides}


def test_first_version_is_promoted_at_once() -> None:
    plan = rollout.plan_rollout(policy(), rollout.RolloutState(), "w-1", {}, NOW)
    assert plan.configmap_data()["weight-version"] == "w-1"
    assert [e.reason for e in plan.events] == ["WeightsPromoted"]


def test_new_version_goes_to_canary_then_is_promoted_after_the_duration() -> None:
    state = rollout.RolloutState(serving="w-1")
    plan = rollout.plan_rollout(policy(canaryFraction=0.2), state, "w-2", {}, NOW)
    assert plan.configmap_data() == {"weight-version": "w-1", "canary-version": "w-2",
                                     "canary-fraction": "0.2"}
    later = NOW + dt.timedelta(seconds=599)
    assert rollout.plan_rollout(policy(), plan.state, "w-2", {}, later).state == plan.state
    done = rollout.plan_rollout(policy(), plan.state, "w-2", {}, later + dt.timedelta(seconds=1))
    assert done.configmap_data()["weight-version"] == "w-2"
    assert done.configmap_data()["canary-version"] == ""


def test_canary_with_a_worse_accept_length_is_rolled_back_and_not_retried() -> None:
    state = rollout.RolloutState(serving="w-1", canary="w-2", canary_started_at=NOW)
    plan = rollout.plan_rollout(policy(), state, "w-2", {"w-1": 3.0, "w-2": 2.5}, NOW)
    assert plan.state == rollout.RolloutState(serving="w-1", rejected=("w-2",))
    assert plan.events[0].type == "Warning"
    again = rollout.plan_rollout(policy(), plan.state, "w-2", {}, NOW)
    assert again.state == plan.state and not again.events
    degraded = status.degraded_condition("w-2", plan.state.rejected, 0)
    assert degraded[:2] == (True, "CanaryRolledBack")


def test_conditions_keep_their_transition_time_until_the_status_flips() -> None:
    conds = status.set_condition([], "Ready", False, "Pending", "m", "t1", 1)
    conds = status.set_condition(conds, "Ready", False, "PodsNotReady", "m2", "t2", 2)
    assert conds[0]["lastTransitionTime"] == "t1" and conds[0]["reason"] == "PodsNotReady"
    conds = status.set_condition(conds, "Ready", True, "Serving", "m3", "t3", 2)
    assert conds[0]["lastTransitionTime"] == "t3"


def test_restart_backoff_is_exponential_and_capped() -> None:
    assert [status.restart_delay_s(60, n) for n in range(4)] == [60, 120, 240, 480]
    assert status.restart_delay_s(60, 20) == 3600


class FakeKube:
    """An in-memory stand-in for kube.Kube that records writes."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.writes: list[str] = []

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Any:
        return self.objects.get(name)

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.writes.append("create")
        self.objects[obj["metadata"]["name"]] = obj
        return obj

    def patch(self, api_version: str, kind: str, namespace: str, name: str,
              patch: dict[str, Any], subresource: str | None = None) -> dict[str, Any]:
        self.writes.append("patch")
        merged = kube.deep_merge(self.objects[name], patch)
        self.objects[name] = _drop_nulls(merged)
        return self.objects[name]

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        self.writes.append("delete")
        self.objects.pop(name, None)


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    return value


def test_apply_creates_then_does_nothing_then_patches_and_removes_dropped_keys() -> None:
    fake = FakeKube()
    service = render.render_service(OWNER, spec())
    service["spec"]["sessionAffinity"] = "ClientIP"
    assert kube.apply(fake, service).action == "created"  # type: ignore[arg-type]
    assert kube.apply(fake, service).action == "unchanged"  # type: ignore[arg-type]
    del service["spec"]["sessionAffinity"]
    assert kube.apply(fake, service).action == "patched"  # type: ignore[arg-type]
    assert "sessionAffinity" not in fake.objects["coder"]["spec"]
    assert fake.writes == ["create", "patch"]


def test_apply_leaves_create_only_fields_and_recreates_immutable_ones() -> None:
    fake = FakeKube()
    configmap = render.render_rollout_configmap(OWNER, render.initial_rollout_data())
    kube.apply(fake, configmap, create_only=("data",))  # type: ignore[arg-type]
    fake.objects["coder-rollout"]["data"]["weight-version"] = "w-3"  # the rollout's write
    assert kube.apply(fake, configmap, create_only=("data",)).action == "unchanged"  # type: ignore[arg-type]
    assert fake.objects["coder-rollout"]["data"]["weight-version"] == "w-3"

    job = render.render_trainer_job(OWNER, spec())
    kube.apply(fake, job)  # type: ignore[arg-type]
    changed = render.render_trainer_job(OWNER, spec(trainer={"gpuCount": 2}))
    result = kube.apply(fake, changed, recreate_on_change=("spec",))  # type: ignore[arg-type]
    assert result.action == "recreated" and "delete" in fake.writes


def test_the_sidecar_reads_the_tokens_and_metrics_address_the_operator_renders(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cli = pytest.importorskip("atlas_sidecar.cli")
    commands = pytest.importorskip("atlas_sidecar.serving.commands")
    container = render.sidecar_container(OWNER, spec(sidecar={"auth": {"secretName": "tok"}}))
    parsed = cli.build_parser().parse_args(container["args"])
    # Prometheus scrapes the pod IP: the sidecar's loopback default must be overridden.
    assert parsed.metrics_host == "0.0.0.0"
    assert parsed.metrics_port == container["ports"][1]["containerPort"]
    # The token's env var is the one the sidecar reads; no admin token is rendered, so
    # the data token is all the pod has and admin RPCs stay refused.
    env = {e["name"]: e for e in container["env"]}
    assert env[commands.AUTH_TOKEN_ENV]["valueFrom"]["secretKeyRef"]["name"] == "tok"
    assert commands.ADMIN_TOKEN_ENV not in env
    monkeypatch.setenv(commands.AUTH_TOKEN_ENV, "from-the-secret")
    monkeypatch.delenv(commands.ADMIN_TOKEN_ENV, raising=False)
    assert commands._read_token(parsed.auth_token_file, commands.AUTH_TOKEN_ENV) == (
        "from-the-secret"
    )
    assert commands._read_token(parsed.admin_token_file, commands.ADMIN_TOKEN_ENV) is None


def test_is_subset_compares_quantities_by_value_and_ignores_server_defaults() -> None:
    desired = {"resources": {"limits": {"nvidia.com/gpu": 1, "memory": "1024Mi"},
                             "requests": {"cpu": "0.5"}},
               "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "1024Mi"}}]}
    live = {"resources": {"limits": {"nvidia.com/gpu": "1", "memory": "1Gi"},
                          "requests": {"cpu": "500m"}},
            "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}],
            "terminationMessagePath": "/dev/termination-log"}
    assert kube.is_subset(desired, live)
    # A different value is still a difference...
    assert not kube.is_subset({"resources": {"limits": {"nvidia.com/gpu": 2}}}, live)
    # ...and outside quantity fields, a number and a string differ.
    assert not kube.is_subset({"replicas": 1}, {"replicas": "1"})


def test_is_subset_takes_empty_optional_fields_as_absent() -> None:
    # The apiserver drops empty lists and maps (omitempty): they read back as missing.
    assert kube.is_subset({"tolerations": [], "nodeSelector": {}, "image": "x"}, {"image": "x"})
    assert not kube.is_subset({"tolerations": [{"key": "k"}]}, {})


# --- the `restricted` Pod Security Standard ----------------------------------------------
# From the published rule list (kubernetes.io/docs/concepts/security/pod-security-standards,
# the baseline controls plus the restricted ones, as of Kubernetes 1.34).

PSS_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                    "persistentVolumeClaim", "projected", "secret"}
PSS_SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
                    "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies",
                    "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
                    "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes"}
PSS_SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t",
                     "container_engine_t"}
APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"


def restricted_violations(template: dict[str, Any]) -> list[str]:
    """The `restricted` rules a pod template breaks, as 'rule: where' strings (empty: it
    passes). Pod-level settings count for every container unless a container overrides."""
    pod = template["spec"]
    annotations = (template.get("metadata") or {}).get("annotations") or {}
    pod_sc = pod.get("securityContext") or {}
    containers = [(c["name"], c) for key in ("initContainers", "containers",
                                             "ephemeralContainers")
                  for c in pod.get(key) or []]
    out: list[str] = []

    def rule(name: str, ok: bool, where: str = "pod") -> None:
        if not ok:
            out.append(f"{name}: {where}")

    # Baseline.
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        rule("host namespaces", not pod.get(key), key)
    rule("HostProcess", not (pod_sc.get("windowsOptions") or {}).get("hostProcess"))
    for volume in pod.get("volumes") or []:
        rule("hostPath volumes", "hostPath" not in volume, volume["name"])
        kinds = set(volume) - {"name"}
        rule("volume types", kinds <= PSS_VOLUME_TYPES, f"{volume['name']}: {kinds}")
    for sysctl in pod_sc.get("sysctls") or []:
        rule("sysctls", sysctl["name"] in PSS_SAFE_SYSCTLS, sysctl["name"])
    for key, value in annotations.items():
        if key.startswith(APPARMOR_ANNOTATION):
            rule("AppArmor", value == "runtime/default" or value.startswith("localhost/"), key)

    def selinux_ok(sc: dict[str, Any]) -> bool:
        options = sc.get("seLinuxOptions") or {}
        return options.get("type", "") in PSS_SELINUX_TYPES and not options.get("user") \
            and not options.get("role")

    def apparmor_ok(sc: dict[str, Any]) -> bool:
        return (sc.get("appArmorProfile") or {}).get("type", "RuntimeDefault") in (
            "RuntimeDefault", "Localhost")

    rule("SELinux", selinux_ok(pod_sc))
    rule("AppArmor", apparmor_ok(pod_sc))
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    rule("seccomp", pod_seccomp in (None, "RuntimeDefault", "Localhost"))
    for name, container in containers:
        sc = container.get("securityContext") or {}
        caps = sc.get("capabilities") or {}
        rule("privileged containers", not sc.get("privileged"), name)
        rule("HostProcess", not (sc.get("windowsOptions") or {}).get("hostProcess"), name)
        rule("host ports", not any(p.get("hostPort") for p in container.get("ports") or []),
             name)
        rule("SELinux", selinux_ok(sc), name)
        rule("AppArmor", apparmor_ok(sc), name)
        rule("/proc mount type", sc.get("procMount", "Default") == "Default", name)
        # Restricted.
        rule("privilege escalation", sc.get("allowPrivilegeEscalation") is False, name)
        rule("running as non-root", sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True,
             name)
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        rule("running as non-root user", uid is None or uid != 0, name)
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        rule("seccomp", seccomp in ("RuntimeDefault", "Localhost"), name)
        rule("capabilities (drop ALL)", "ALL" in (caps.get("drop") or []), name)
        rule("capabilities (add only NET_BIND_SERVICE)",
             set(caps.get("add") or []) <= {"NET_BIND_SERVICE"}, name)
    uid = pod_sc.get("runAsUser")
    rule("running as non-root user", uid is None or uid != 0)
    return out


RESTRICTED_EXAMPLES = {
    "minimal": {},
    "gpu-tls-adaptive": dict(
        placement={"gpuCount": 2}, serving={"tensorParallelSize": 2},
        speculators={"static": {"model": "Qwen/Qwen2.5-Coder-0.5B-Instruct"},
                     "adaptive": {"enabled": True}},
        trainer={"enabled": True, "gpuCount": 1},
        sidecar={"gpuCount": 1, "tls": {"secretName": "tls"}, "auth": {"secretName": "tok"}}),
}


def rendered_pod_templates(overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    endpoint_spec = spec(**overrides)
    return {"Deployment": render.render_deployment(OWNER, endpoint_spec)["spec"]["template"],
            "Job": render.render_trainer_job(OWNER, endpoint_spec)["spec"]["template"]}


@pytest.mark.parametrize("example", RESTRICTED_EXAMPLES)
def test_every_rendered_pod_passes_the_restricted_pod_security_standard(example: str) -> None:
    templates = rendered_pod_templates(RESTRICTED_EXAMPLES[example])
    for kind, template in templates.items():
        assert template["spec"]["containers"], kind
        assert restricted_violations(template) == [], kind
        # Every container runs with an explicit non-root uid (not just "the image's").
        pod_uid = template["spec"]["securityContext"].get("runAsUser")
        for container in template["spec"]["containers"]:
            uid = (container.get("securityContext") or {}).get("runAsUser", pod_uid)
            assert isinstance(uid, int) and uid > 0, (kind, container["name"])


def test_the_restricted_check_names_each_broken_rule() -> None:
    # The checker itself, on a pod that breaks one rule of each kind.
    template = rendered_pod_templates({})["Deployment"]
    template["spec"] |= {"hostNetwork": True,
                         "volumes": [{"name": "h", "hostPath": {"path": "/"}}]}
    template["spec"]["securityContext"] = {"sysctls": [{"name": "kernel.msgmax", "value": "1"}],
                                           "runAsUser": 0}
    sglang = template["spec"]["containers"][0]
    sglang["securityContext"] = {"privileged": True, "capabilities": {"add": ["SYS_ADMIN"]},
                                 "procMount": "Unmasked",
                                 "seLinuxOptions": {"type": "spc_t"}}
    sglang["ports"] = [{"containerPort": 80, "hostPort": 80}]
    broken = {v.split(":")[0] for v in restricted_violations(template)}
    assert broken == {"host namespaces", "hostPath volumes", "volume types", "sysctls",
                      "privileged containers", "host ports", "SELinux", "/proc mount type",
                      "privilege escalation", "running as non-root",
                      "running as non-root user", "seccomp", "capabilities (drop ALL)",
                      "capabilities (add only NET_BIND_SERVICE)"}


def test_only_the_endpoints_serving_pods_reach_the_trainers_ingest_port() -> None:
    """Both ends of the fence: it selects the pods the trainer Job runs, admits the pods the
    Deployment runs, on the port the trainer listens on and the sidecars mirror to."""
    s = spec(speculators={"adaptive": {"enabled": True}}, trainer={"enabled": True})
    policy = render.render_trainer_network_policy(OWNER)
    job, deployment = render.render_trainer_job(OWNER, s), render.render_deployment(OWNER, s)
    trainer_labels = job["spec"]["template"]["metadata"]["labels"]
    serving_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selects = policy["spec"]["podSelector"]["matchLabels"]
    assert selects.items() <= trainer_labels.items()
    assert not selects.items() <= serving_labels.items()
    (rule,) = policy["spec"]["ingress"]
    (source,) = rule["from"]
    assert source["podSelector"]["matchLabels"].items() <= serving_labels.items()
    assert not source["podSelector"]["matchLabels"].items() <= trainer_labels.items()
    (port,) = rule["ports"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert port["port"] == container["ports"][0]["containerPort"] == render.TRAINER_PORT
    sidecar = deployment["spec"]["template"]["spec"]["containers"][1]["args"]
    assert sidecar[sidecar.index("--mirror-url") + 1].endswith(f":{port['port']}")
    assert policy in render.render_children(OWNER, s)
    assert ("networking.k8s.io/v1", "NetworkPolicy", policy["metadata"]["name"]) in \
        render.trainer_children(OWNER)
