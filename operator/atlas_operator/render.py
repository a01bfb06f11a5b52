"""Pure functions that render an AtlasEndpoint's children from its (defaulted) spec.

No API calls here: each function takes the endpoint's identity and spec and returns plain
manifests, so the tests can check them without any Kubernetes. Children and their names:

    Deployment  <name>              SGLang target + ATLAS sidecar per pod
    Service     <name>              gRPC (sidecar.port) and metrics (sidecar.metricsPort)
    ConfigMap   <name>-rollout      weight version the sidecars serve (changed hot)
    PVC         <name>-data         /data/weights (adaptive weights), /data/mirror (traffic)
    Job         <name>-trainer      `atlas trainer`, when trainer.enabled
    Service     <name>-trainer      the trainer's ingest (mirrored traffic), likewise
    ServiceAccount/Role/RoleBinding <name>-trainer   lets the trainer report new versions
The trainer's children are deleted again when trainer.enabled turns false
(trainer_children()).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from atlas_operator import (
    API_VERSION,
    CANARY_FRACTION_KEY,
    CANARY_VERSION_KEY,
    GROUP,
    KIND,
    MANAGED_BY,
    PLURAL,
    ROLLOUT_MOUNT_PATH,
    WEIGHT_VERSION_KEY,
)

Manifest = dict[str, Any]
Spec = Mapping[str, Any]

DATA_MOUNT_PATH = "/data"
WEIGHTS_DIR = f"{DATA_MOUNT_PATH}/weights"
MIRROR_DIR = f"{DATA_MOUNT_PATH}/mirror"
TRAFFIC_DB = f"{MIRROR_DIR}/traffic.sqlite"
TRAINER_STATE_DIR = f"{DATA_MOUNT_PATH}/trainer"
TRAINER_PORT = 50060  # the trainer's ingest (atlas.trainer.v1), behind <name>-trainer
SPILL_MOUNT_PATH = "/spill"  # the sidecar's mirror spill: an emptyDir, one per pod
SPILL_LIMIT_BYTES = 1 << 30
HF_HOME = f"{DATA_MOUNT_PATH}/hf-cache"
TLS_MOUNT_PATH = "/etc/atlas/tls"
# What `atlas serve` reads its tokens from (atlas_sidecar.serving.commands; the contract
# test checks the names against it).
AUTH_TOKEN_ENV = "ATLAS_AUTH_TOKEN"
ADMIN_TOKEN_ENV = "ATLAS_ADMIN_TOKEN"
# With TLS, the sidecar also serves grpc.health.v1 in plaintext on this loopback port,
# for its exec probe (the next free one if the spec's ports take it).
SIDECAR_HEALTH_PORT = 50052
SIDECAR_UID = 1000  # the sidecar and trainer images run as this user (docker/*.Dockerfile)
# SGLang's image runs as root by default; it needs no root at run time. Its Python and
# packages are world-readable, and everything it writes is redirected to volumes this uid
# can write: HOME, XDG_CACHE_HOME (Triton, FlashInfer, torch JIT caches) and TMPDIR go to
# the `sglang-tmp` emptyDir at /tmp, HF_HOME to the data volume (group-writable through
# fsGroup), /dev/shm is a memory emptyDir. Same uid as the sidecar: both write /data.
SGLANG_UID = SIDECAR_UID


def pod_security_context() -> dict[str, Any]:
    """The pod-level half of the `restricted` Pod Security Standard, inherited by every
    container (init containers included): non-root with an explicit non-root uid, the
    runtime's default seccomp profile. fsGroup makes the volumes writable for that uid."""
    return {"runAsNonRoot": True, "runAsUser": SIDECAR_UID, "runAsGroup": SIDECAR_UID,
            "fsGroup": SIDECAR_UID, "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context(**extra: Any) -> dict[str, Any]:
    """The container-level half of `restricted` (these fields exist only per container):
    no privilege escalation, every capability dropped, none added."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, **extra}


@dataclass(frozen=True)
class Owner:
    """The identity of the AtlasEndpoint whose children are rendered."""

    name: str
    namespace: str
    uid: str


def owner_from_body(body: Mapping[str, Any]) -> Owner:
    meta = body["metadata"]
    return Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])


# --- names and labels ------------------------------------------------------------------


def deployment_name(owner: Owner) -> str:
    return owner.name


def service_name(owner: Owner) -> str:
    return owner.name


def rollout_configmap_name(owner: Owner) -> str:
    return f"{owner.name}-rollout"


def data_pvc_name(owner: Owner) -> str:
    return f"{owner.name}-data"


def trainer_name(owner: Owner) -> str:
    return f"{owner.name}-trainer"


def selector_labels(owner: Owner) -> dict[str, str]:
    """Labels that select the serving pods. Never change them: a Deployment's selector is
    immutable."""
    return {f"{GROUP}/endpoint": owner.name, "app.kubernetes.io/component": "serving"}


def labels(owner: Owner, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "atlas-endpoint",
        "app.kubernetes.io/instance": owner.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        f"{GROUP}/endpoint": owner.name,
    }


def owner_reference(owner: Owner) -> dict[str, Any]:
    # controller=True marks us as the managing controller; blockOwnerDeletion keeps the
    # endpoint around (foreground deletion) until the garbage collector removed the child.
    return {"apiVersion": API_VERSION, "kind": KIND, "name": owner.name, "uid": owner.uid,
            "controller": True, "blockOwnerDeletion": True}


def _metadata(owner: Owner, name: str, component: str) -> dict[str, Any]:
    return {"name": name, "namespace": owner.namespace, "labels": labels(owner, component),
            "ownerReferences": [owner_reference(owner)]}


def selector_string(owner: Owner) -> str:
    """The serving pods' selector as `kubectl -l` and the scale subresource want it."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(owner).items()))


# --- containers ------------------------------------------------------------------------


def _resources(spec_resources: Mapping[str, Any], gpu_name: str, gpus: int) -> dict[str, Any]:
    out = {kind: dict(values) for kind, values in spec_resources.items() if values}
    if gpus > 0:
        # Extended resources (GPUs) must be set in limits; requests default to them.
        out.setdefault("limits", {})[gpu_name] = gpus
    return out


def sglang_args(spec: Spec) -> list[str]:
    model, serving = spec["model"], spec["serving"]
    args = ["--model-path", model["source"], "--revision", model["revision"],
            "--dtype", model["dtype"], "--tp-size", str(serving["tensorParallelSize"]),
            # Loopback only: SGLang has no auth, and only the sidecar in this pod talks to it.
            "--host", "127.0.0.1", "--port", str(serving["port"])]
    if model["quantization"] != "none":
        args += ["--quantization", model["quantization"]]
    return args + list(serving["extraArgs"])


def _sglang_health_probe(spec: Spec, period: int, timeout: int, failures: int) -> dict[str, Any]:
    # An exec probe, because SGLang listens on loopback and kubelet probes the pod IP.
    url = f"http://127.0.0.1:{spec['serving']['port']}/health"
    code = f"import urllib.request; urllib.request.urlopen('{url}', timeout={timeout})"
    return {"exec": {"command": ["python3", "-c", code]}, "periodSeconds": period,
            "timeoutSeconds": timeout + 1, "failureThreshold": failures}


def sglang_container(spec: Spec) -> dict[str, Any]:
    serving, placement = spec["serving"], spec["placement"]
    return {
        "name": "sglang",
        "image": serving["image"],
        "imagePullPolicy": serving["imagePullPolicy"],
        "command": ["python3", "-m", "sglang.launch_server"],
        "args": sglang_args(spec),
        # Non-root (see SGLANG_UID): every write goes to a volume.
        "env": [{"name": "HF_HOME", "value": HF_HOME},
                {"name": "HOME", "value": "/tmp"},
                {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"},
                {"name": "TMPDIR", "value": "/tmp"}],
        "resources": _resources(serving["resources"], placement["gpuResourceName"],
                                placement["gpuCount"]),
        "volumeMounts": [{"name": "data", "mountPath": DATA_MOUNT_PATH},
                         {"name": "dshm", "mountPath": "/dev/shm"},
                         {"name": "sglang-tmp", "mountPath": "/tmp"}],
        # Not readOnlyRootFilesystem: libraries in the image may write next to themselves.
        "securityContext": container_security_context(runAsNonRoot=True,
                                                      runAsUser=SGLANG_UID),
        # Loading a large model takes minutes: allow up to 30 min before liveness applies.
        "startupProbe": _sglang_health_probe(spec, period=10, timeout=5, failures=180),
        "readinessProbe": _sglang_health_probe(spec, period=10, timeout=5, failures=3),
        "livenessProbe": _sglang_health_probe(spec, period=30, timeout=10, failures=5),
    }


# The sidecar's --dtype words for the model dtypes SGLang takes.
SIDECAR_DTYPES = {"auto": "bf16", "bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def sidecar_args(owner: Owner, spec: Spec) -> list[str]:
    """`atlas serve` flags: only flags its CLI has, each reaching its serve configuration
    (tests/operator/test_contract.py parses them with the sidecar's own parser)."""
    model, sidecar = spec["model"], spec["sidecar"]
    static = spec["speculators"]["static"]
    args = ["serve", "--host", "0.0.0.0", "--port", str(sidecar["port"]),
            "--metrics-port", str(sidecar["metricsPort"]),
            # The sidecar binds /metrics to loopback unless told: Prometheus scrapes the pod IP.
            "--metrics-host", "0.0.0.0",
            "--backend", "sglang", "--sglang-url", f"http://127.0.0.1:{spec['serving']['port']}",
            "--target", model["source"], "--dtype", SIDECAR_DTYPES[model["dtype"]],
            "--device", "cuda" if sidecar["gpuCount"] > 0 else "cpu",
            # The bound; the controller picks the lookahead of each step below it.
            "--lookahead", str(spec["controller"]["maxLookahead"]),
            # The whole rollout ConfigMap is mounted there (weight-version, canary-version,
            # canary-fraction); kubelet refreshes the files in place, no restart.
            "--weight-version-file", f"{ROLLOUT_MOUNT_PATH}/{WEIGHT_VERSION_KEY}"]
    adaptive = spec["speculators"]["adaptive"]["enabled"]
    if static.get("model"):
        # The controller over the static speculator and (adaptive) the suffix index.
        args += ["--speculator", "atlas" if adaptive else "static", "--draft", static["model"]]
    else:
        args += ["--speculator", "suffix" if adaptive else "none"]
    if adaptive:
        args += learning_args(owner, spec)
    if sidecar.get("tls"):
        args += ["--tls-cert", f"{TLS_MOUNT_PATH}/tls.crt",
                 "--tls-key", f"{TLS_MOUNT_PATH}/tls.key",
                 "--health-port", str(sidecar_health_port(spec))]
    return args


def mirrors(spec: Spec) -> bool:
    """Whether the serving pods mirror traffic: to a trainer, which adaptive needs."""
    return bool(spec["speculators"]["adaptive"]["enabled"] and spec["trainer"]["enabled"])


def learning_args(owner: Owner, spec: Spec) -> list[str]:
    """The adaptive speculator's side of the learning loop: published versions from the
    weights store (the version the rollout ConfigMap names), and, with the trainer,
    every finished request's token ids mirrored to it, spilled to the pod's own
    emptyDir while it is away."""
    args = ["--weights-store", WEIGHTS_DIR]
    if mirrors(spec):
        host = f"{trainer_name(owner)}.{owner.namespace}.svc"
        args += ["--mirror-url", f"{host}:{TRAINER_PORT}",
                 "--mirror-fraction", str(spec["speculators"]["adaptive"]["mirrorFraction"]),
                 "--mirror-spill-dir", SPILL_MOUNT_PATH,
                 "--mirror-spill-bytes", str(SPILL_LIMIT_BYTES)]  # fmt: skip
    return args


def sidecar_health_port(spec: Spec) -> int:
    """The sidecar's loopback health port (with TLS): clear of every port the pod uses."""
    taken = {spec["sidecar"]["port"], spec["sidecar"]["metricsPort"], spec["serving"]["port"]}
    port = SIDECAR_HEALTH_PORT
    while port in taken:
        port += 1
    return port


def sidecar_env(spec: Spec) -> list[dict[str, Any]]:
    """Only variables `atlas serve` reads (its SERVE_ENV; tests/operator/test_contract.py
    checks): one it ignores would look like configuration and change nothing. The
    adaptive speculator's settings (weights and mirror directories, mirror fraction)
    come back with the learning loop that reads them.

    The admin token comes only from `sidecar.adminAuth`, never from `sidecar.auth`:
    without it the sidecar refuses admin RPCs (rollouts still go by the ConfigMap), and
    validation refuses an adminAuth naming the data token's Secret key, since every
    client holding the data token could then roll out weights."""
    static = spec["speculators"]["static"]
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},
        # SGLang's cache too: the sidecar reads the target's tokenizer from what SGLang
        # downloaded, at the same revision.
        {"name": "HF_HOME", "value": HF_HOME},
        {"name": "ATLAS_MODEL_REVISION", "value": spec["model"]["revision"]},
    ]
    if static.get("model"):
        env += [{"name": "ATLAS_DRAFT_REVISION", "value": static["revision"]},
                {"name": "ATLAS_DRAFT_ARCHITECTURE", "value": static["architecture"]}]
    # Tokens by reference: they never appear in the spec, the args or any log.
    for field, name in (("auth", AUTH_TOKEN_ENV), ("adminAuth", ADMIN_TOKEN_ENV)):
        ref = spec["sidecar"].get(field)
        if ref:
            env.append({"name": name, "valueFrom": {"secretKeyRef": {
                "name": ref["secretName"], "key": ref["key"]}}})
    return env


def _sidecar_probe(spec: Spec, period: int, failures: int) -> dict[str, Any]:
    """The standard gRPC health service, which turns NOT_SERVING when the sidecar drains
    or its worker dies. kubelet's gRPC probe cannot speak TLS, and a TCP probe would
    pass as long as the port is open: with TLS, an exec probe asks the sidecar's
    plaintext loopback health port instead (``atlas_sidecar.serving.healthcheck``, which
    imports grpc only, not torch)."""
    check: dict[str, Any] = {"grpc": {"port": spec["sidecar"]["port"]}}
    if spec["sidecar"].get("tls"):
        check = {"exec": {"command": [
            "python", "-m", "atlas_sidecar.serving.healthcheck",
            "--port", str(sidecar_health_port(spec)), "--timeout", "2"]}}  # fmt: skip
    return {**check, "periodSeconds": period, "timeoutSeconds": 3, "failureThreshold": failures}


def sidecar_container(owner: Owner, spec: Spec) -> dict[str, Any]:
    sidecar = spec["sidecar"]
    mounts = [{"name": "rollout", "mountPath": ROLLOUT_MOUNT_PATH, "readOnly": True},
              {"name": "data", "mountPath": DATA_MOUNT_PATH},
              {"name": "tmp", "mountPath": "/tmp"}]
    if sidecar.get("tls"):
        mounts.append({"name": "tls", "mountPath": TLS_MOUNT_PATH, "readOnly": True})
    if mirrors(spec):
        mounts.append({"name": "spill", "mountPath": SPILL_MOUNT_PATH})
    return {
        "name": "sidecar",
        "image": sidecar["image"],
        "imagePullPolicy": sidecar["imagePullPolicy"],
        "command": ["atlas"],
        "args": sidecar_args(owner, spec),
        "env": sidecar_env(spec),
        "ports": [{"name": "grpc", "containerPort": sidecar["port"], "protocol": "TCP"},
                  {"name": "metrics", "containerPort": sidecar["metricsPort"],
                   "protocol": "TCP"}],
        "resources": _resources(sidecar["resources"], spec["placement"]["gpuResourceName"],
                                sidecar["gpuCount"]),
        "volumeMounts": mounts,
        "startupProbe": _sidecar_probe(spec, period=5, failures=120),
        "readinessProbe": _sidecar_probe(spec, period=5, failures=3),
        "livenessProbe": _sidecar_probe(spec, period=20, failures=3),
        "securityContext": container_security_context(runAsNonRoot=True,
                                                      runAsUser=SIDECAR_UID,
                                                      readOnlyRootFilesystem=True),
    }


def _placement(spec: Spec) -> dict[str, Any]:
    placement = spec["placement"]
    out: dict[str, Any] = {"nodeSelector": dict(placement["nodeSelector"]),
                           "tolerations": [dict(t) for t in placement["tolerations"]]}
    if placement.get("priorityClassName"):
        out["priorityClassName"] = placement["priorityClassName"]
    return out


# --- children --------------------------------------------------------------------------


def render_deployment(owner: Owner, spec: Spec) -> Manifest:
    """The serving Deployment. Its pod template depends on the spec only: the weight
    version lives in the rollout ConfigMap, so a new version never restarts a pod."""
    sidecar = spec["sidecar"]
    volumes: list[dict[str, Any]] = [
        {"name": "data", "persistentVolumeClaim": {"claimName": data_pvc_name(owner)}},
        # Mounted as a directory, never with subPath: subPath mounts do not see updates.
        {"name": "rollout", "configMap": {"name": rollout_configmap_name(owner)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory",
                                      "sizeLimit": spec["serving"]["shmSize"]}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
        # SGLang's HOME and JIT caches (Triton, FlashInfer kernels): a few GB at most.
        {"name": "sglang-tmp", "emptyDir": {"sizeLimit": "16Gi"}},
    ]
    if sidecar.get("tls"):
        volumes.append({"name": "tls", "secret": {"secretName": sidecar["tls"]["secretName"]}})
    if mirrors(spec):
        # Room for the spill bound plus its segment slack; kubelet evicts past it.
        volumes.append({"name": "spill",
                        "emptyDir": {"sizeLimit": f"{2 * SPILL_LIMIT_BYTES >> 20}Mi"}})
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner, deployment_name(owner), "serving"),
        "spec": {
            "replicas": spec["replicas"],
            "selector": {"matchLabels": selector_labels(owner)},
            # GPU nodes rarely have a spare GPU to surge onto: replace pods one at a time.
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "revisionHistoryLimit": 3,
            "progressDeadlineSeconds": 3600,
            "template": {
                "metadata": {
                    "labels": {**labels(owner, "serving"), **selector_labels(owner)},
                    "annotations": {"prometheus.io/scrape": "true",
                                    "prometheus.io/port": str(sidecar["metricsPort"]),
                                    "prometheus.io/path": "/metrics"},
                },
                "spec": {
                    **_placement(spec),
                    "enableServiceLinks": False,
                    # Lets in-flight generations finish before the pod goes away.
                    "terminationGracePeriodSeconds": 60,
                    "securityContext": pod_security_context(),
                    "containers": [sglang_container(spec), sidecar_container(owner, spec)],
                    "volumes": volumes,
                },
            },
        },
    }


def render_service(owner: Owner, spec: Spec) -> Manifest:
    sidecar = spec["sidecar"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, service_name(owner), "serving"),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(owner),
            "ports": [
                {"name": "grpc", "port": sidecar["port"], "targetPort": "grpc",
                 "protocol": "TCP"},
                {"name": "metrics", "port": sidecar["metricsPort"], "targetPort": "metrics",
                 "protocol": "TCP"},
            ],
        },
    }


def render_rollout_configmap(owner: Owner, data: Mapping[str, str]) -> Manifest:
    """The ConfigMap the sidecars read their weight version from. Its data is owned by the
    rollout logic (rollout.py); rendering only supplies the initial content."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, rollout_configmap_name(owner), "rollout"),
        "data": dict(data),
    }


def initial_rollout_data() -> dict[str, str]:
    return {WEIGHT_VERSION_KEY: "", CANARY_VERSION_KEY: "", CANARY_FRACTION_KEY: "0"}


def render_data_pvc(owner: Owner, spec: Spec) -> Manifest:
    storage = spec["storage"]
    pvc_spec: dict[str, Any] = {"accessModes": [storage["accessMode"]],
                                "resources": {"requests": {"storage": storage["size"]}}}
    if storage.get("storageClassName"):
        pvc_spec["storageClassName"] = storage["storageClassName"]
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": _metadata(owner, data_pvc_name(owner), "storage"), "spec": pvc_spec}


def trainer_args(owner: Owner, spec: Spec) -> list[str]:
    """`atlas trainer` flags, each reaching its configuration (tests/operator/
    test_contract.py parses them with the trainer's own parser). The Job runs ingest and
    training rounds until a minute before its deadline, then exits 0; sidecars spill
    their mirrored traffic until the next Job is up. After each round the trainer patches
    its endpoint's status (the newest version, accept lengths per version), which drives
    the rollout: the only write its Role allows."""
    model, trainer = spec["model"], spec["trainer"]
    schedule = trainer["schedule"]
    deadline = schedule["maxRoundSeconds"]
    return ["trainer", "--host", "0.0.0.0", "--port", str(TRAINER_PORT),
            "--traffic-db", TRAFFIC_DB, "--weights-store", WEIGHTS_DIR,
            "--state-dir", TRAINER_STATE_DIR,
            "--target", model["source"], "--revision", model["revision"],
            "--dtype", SIDECAR_DTYPES[model["dtype"]],
            "--device", "cuda" if trainer["gpuCount"] > 0 else "cpu",
            "--round-interval", str(max(schedule["roundIntervalSeconds"], 1)),
            "--max-train-steps", str(schedule["maxStepsPerRound"]),
            "--max-round-seconds", str(max(60, deadline // 2)),
            "--max-runtime", str(max(deadline - 60, 60)),
            "--report-endpoint", owner.name, "--report-namespace", owner.namespace]  # fmt: skip


def trainer_env() -> list[dict[str, Any]]:
    """Only what the trainer's libraries read: HOME, and the Hugging Face cache SGLang
    filled (the target's files at the same revision)."""
    return [{"name": "HOME", "value": "/tmp"}, {"name": "HF_HOME", "value": HF_HOME}]


def render_trainer_service(owner: Owner) -> Manifest:
    """Where the sidecars mirror traffic: the trainer pod's ingest port."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, trainer_name(owner), "trainer"),
        "spec": {
            "type": "ClusterIP",
            "selector": {f"{GROUP}/endpoint": owner.name,
                         "app.kubernetes.io/component": "trainer"},
            "ports": [{"name": "ingest", "port": TRAINER_PORT, "targetPort": "ingest",
                       "protocol": "TCP"}],
        },
    }  # fmt: skip


def render_trainer_job(owner: Owner, spec: Spec) -> Manifest:
    """One training round. A Job's pod template is immutable, so a changed trainer spec
    means delete and recreate (handled by the caller), not a patch."""
    trainer, placement = spec["trainer"], spec["placement"]
    pod_spec: dict[str, Any] = {
        "serviceAccountName": trainer_name(owner),
        # Never: each retry is a fresh pod; the Job controller backs off exponentially.
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "containers": [{
            "name": "trainer",
            "image": trainer["image"],
            "command": ["atlas"],
            "args": trainer_args(owner, spec),
            "env": trainer_env(),
            "ports": [{"name": "ingest", "containerPort": TRAINER_PORT, "protocol": "TCP"}],
            "resources": _resources(trainer["resources"], placement["gpuResourceName"],
                                    trainer["gpuCount"]),
            "volumeMounts": [{"name": "data", "mountPath": DATA_MOUNT_PATH},
                             {"name": "tmp", "mountPath": "/tmp"}],
            "securityContext": container_security_context(),
        }],
        "volumes": [{"name": "data",
                     "persistentVolumeClaim": {"claimName": data_pvc_name(owner)}},
                    {"name": "tmp", "emptyDir": {"sizeLimit": "8Gi"}}],
    }
    if trainer["gpuCount"] > 0:
        pod_spec.update(_placement(spec))
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(owner, trainer_name(owner), "trainer"),
        "spec": {
            "backoffLimit": trainer["backoffLimit"],
            "activeDeadlineSeconds": trainer["schedule"]["maxRoundSeconds"],
            "template": {"metadata": {"labels": labels(owner, "trainer")}, "spec": pod_spec},
        },
    }


def render_trainer_network_policy(owner: Owner) -> Manifest:
    """Only this endpoint's serving pods reach the trainer, and only its ingest port. The
    mirror stream carries every request's token ids in plaintext gRPC inside the
    cluster; the policy keeps other workloads from reading the trainer's port or feeding
    it poisoned traffic (a CNI that enforces NetworkPolicy is needed for it to hold)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(owner, trainer_name(owner), "trainer"),
        "spec": {
            "podSelector": {"matchLabels": {f"{GROUP}/endpoint": owner.name,
                                            "app.kubernetes.io/component": "trainer"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": selector_labels(owner)}}],
                         "ports": [{"protocol": "TCP", "port": TRAINER_PORT}]}],
        },
    }  # fmt: skip


def render_trainer_rbac(owner: Owner) -> list[Manifest]:
    """The trainer's identity: it may read its own endpoint and patch its status (to report
    a published version and accept lengths), never its spec, and nothing else."""
    name = trainer_name(owner)
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": _metadata(owner, name, "trainer"), "automountServiceAccountToken": True},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": _metadata(owner, name, "trainer"),
         "rules": [
             {"apiGroups": [GROUP], "resources": [PLURAL], "resourceNames": [owner.name],
              "verbs": ["get"]},
             {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"],
              "resourceNames": [owner.name], "verbs": ["get", "patch"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": _metadata(owner, name, "trainer"),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name,
                       "namespace": owner.namespace}]},
    ]


def trainer_children(owner: Owner) -> list[tuple[str, str, str]]:
    """(apiVersion, kind, name) of every child that exists only with trainer.enabled, in
    the order to delete them (the Job before the identity its pod runs as). Their
    ownerReferences hand them to the garbage collector only when the endpoint goes: the
    operator deletes them itself when the trainer is turned off."""
    name = trainer_name(owner)
    return [("batch/v1", "Job", name), ("v1", "Service", name),
            ("networking.k8s.io/v1", "NetworkPolicy", name),
            ("rbac.authorization.k8s.io/v1", "RoleBinding", name),
            ("rbac.authorization.k8s.io/v1", "Role", name), ("v1", "ServiceAccount", name)]


def controlled_by(obj: Mapping[str, Any], owner: Owner) -> bool:
    """Whether `obj` is this endpoint's child: its controller ownerReference names the
    endpoint's uid. Only such objects are ever deleted: an object of the same name made
    by someone else (or by an earlier endpoint of the same name) is left alone."""
    return any(ref.get("uid") == owner.uid and ref.get("controller")
               and ref.get("kind") == KIND
               for ref in (obj.get("metadata") or {}).get("ownerReferences") or [])


def render_children(owner: Owner, spec: Spec) -> list[Manifest]:
    """Every child the spec asks for, in the order they should be applied (the volume and
    the ConfigMap before the pods that mount them). The trainer Job is separate: it has
    its own lifecycle (rounds, restarts with backoff)."""
    children = [render_data_pvc(owner, spec),
                render_rollout_configmap(owner, initial_rollout_data()),
                render_deployment(owner, spec), render_service(owner, spec)]
    if spec["trainer"]["enabled"]:
        children += [*render_trainer_rbac(owner), render_trainer_service(owner),
                     render_trainer_network_policy(owner)]
    return children


def canonical_json(obj: Any) -> str:
    """A stable serialization, so equal manifests compare (and annotate) equal."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
