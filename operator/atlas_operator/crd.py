"""The AtlasEndpoint CustomResourceDefinition: the one source of truth for its schema.

`crds/atlasendpoints.atlas.ai.yaml` and the chart's copy under `charts/atlas-operator/crds/`
are generated from `build_crd()` (and kopf's peering CRD, which the chart also installs, from
`build_kopf_peering_crd()`); the operator's defaulting and validation (`spec.py`) read
the same schema. Regenerate after editing this module:

    python -m atlas_operator.crd --write     # rewrite both copies
    python -m atlas_operator.crd --check     # exit 1 if a copy drifted (used by the tests)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from atlas_operator import CRD_NAME, GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION

Schema = dict[str, Any]

# Defaults that point at images: pin to tags you have verified in your registry.
DEFAULT_SGLANG_IMAGE = "lmsysorg/sglang:v0.5.2-cu129-b200"
DEFAULT_SIDECAR_IMAGE = "ghcr.io/atlas-specdec/atlas-sidecar:0.1.0"
DEFAULT_TRAINER_IMAGE = "ghcr.io/atlas-specdec/atlas-trainer:0.1.0"
# B200 nodes as labelled by NVIDIA's GPU feature discovery.
DEFAULT_NODE_SELECTOR = {"nvidia.com/gpu.product": "NVIDIA-B200"}
DEFAULT_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]

# Kubernetes resource quantities ("8", "500m", "64Gi"), as the apiserver accepts them.
QUANTITY_PATTERN = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


# --- small schema builders: keep the big literal below readable -------------------------


def _str(desc: str, default: str | None = None, max_length: int = 512, **extra: Any) -> Schema:
    schema: Schema = {"type": "string", "description": desc, "maxLength": max_length, **extra}
    if default is not None:
        schema["default"] = default
    return schema


def _int(desc: str, default: int | None, minimum: int, maximum: int) -> Schema:
    schema: Schema = {"type": "integer", "description": desc, "minimum": minimum,
                      "maximum": maximum}
    if default is not None:
        schema["default"] = default
    return schema


def _num(desc: str, default: float, minimum: float, maximum: float) -> Schema:
    return {"type": "number", "description": desc, "default": default,
            "minimum": minimum, "maximum": maximum}


def _bool(desc: str, default: bool) -> Schema:
    return {"type": "boolean", "description": desc, "default": default}


def _enum(desc: str, values: list[str], default: str) -> Schema:
    return {"type": "string", "description": desc, "enum": values, "default": default}


def _obj(desc: str, props: dict[str, Schema], required: list[str] | None = None,
         default: dict[str, Any] | None = None) -> Schema:
    schema: Schema = {"type": "object", "description": desc, "properties": props}
    if required:
        schema["required"] = required
    if default is not None:
        schema["default"] = default
    return schema


def _quantity(desc: str, default: str | None = None) -> Schema:
    # No `pattern` here: structural schemas forbid it beside int-or-string; spec.py checks
    # the syntax with QUANTITY_PATTERN and the apiserver checks it again on the children.
    schema: Schema = {"description": desc, "x-kubernetes-int-or-string": True,
                      "anyOf": [{"type": "integer"}, {"type": "string"}]}
    if default is not None:
        schema["default"] = default
    return schema


def _resources(desc: str, default: dict[str, Any]) -> Schema:
    quantities = {"type": "object", "maxProperties": 16,
                  "additionalProperties": _quantity("A resource quantity.")}
    return _obj(desc, {
        "requests": {**quantities, "description": "Minimum resources (scheduling)."},
        "limits": {**quantities, "description": "Maximum resources (enforced)."},
    }, default=default)


def _secret_ref(desc: str, with_key: bool) -> Schema:
    props: dict[str, Schema] = {
        "secretName": _str("Name of a Secret in the endpoint's namespace.", max_length=253,
                           pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
    }
    if with_key:
        props["key"] = _str("Key inside the Secret that holds the bearer token.", "token",
                            max_length=253)
    return _obj(desc, props, required=["secretName"])


def _condition() -> Schema:
    return _obj("A standard Kubernetes condition.", {
        "type": _str("Ready, TargetReady, SidecarReady, TrainerReady, SpeculatorDegraded or "
                     "StorageAccessible.", max_length=64),
        "status": {"type": "string", "enum": ["True", "False", "Unknown"],
                   "description": "Whether the condition holds."},
        "reason": _str("One CamelCase word saying why.", max_length=128),
        "message": _str("Human-readable details.", max_length=2048),
        "lastTransitionTime": {"type": "string", "format": "date-time",
                               "description": "When status last changed."},
        "observedGeneration": {"type": "integer", "minimum": 0,
                               "description": "The .metadata.generation this was computed for."},
    }, required=["type", "status"])


# --- the schema ------------------------------------------------------------------------


def spec_schema() -> Schema:
    """The openAPIV3Schema of `.spec`."""
    return _obj("Desired state of one ATLAS serving endpoint.", {
        "model": _obj("The target model: what SGLang serves and the speculators accelerate.", {
            "source": _str("Hugging Face repo id (org/name) or a path SGLang can load "
                           "(e.g. /data/models/...).", minLength=1),
            "revision": _str("Git revision (branch, tag or commit) of the source.", "main",
                             max_length=128),
            "dtype": _enum("Weights and activations dtype (SGLang --dtype).",
                           ["auto", "bfloat16", "float16", "float32"], "bfloat16"),
            "quantization": _enum("Weight quantization (SGLang --quantization); none = off.",
                                  ["none", "fp8", "w8a8_fp8", "modelopt_fp4", "awq", "gptq"],
                                  "none"),
        }, required=["source"]),
        "serving": _obj("The SGLang target server container.", {
            "image": _str("SGLang image.", DEFAULT_SGLANG_IMAGE),
            "imagePullPolicy": _enum("Image pull policy.", ["Always", "IfNotPresent", "Never"],
                                     "IfNotPresent"),
            "tensorParallelSize": {**_int("SGLang --tp-size: GPUs one model copy spans.", 1,
                                          1, 8), "enum": [1, 2, 4, 8]},
            "port": _int("Port SGLang listens on inside the pod (loopback use only).", 30000,
                         1024, 65535),
            "extraArgs": {"type": "array", "maxItems": 64, "default": [],
                          "description": "Extra SGLang server arguments, appended verbatim.",
                          "items": {"type": "string", "maxLength": 1024}},
            "shmSize": _quantity("Size of /dev/shm (NCCL needs it for tensor parallelism).",
                                 "16Gi"),
            "resources": _resources("CPU/memory for the SGLang container; GPUs come from "
                                    "placement.gpuCount.",
                                    {"requests": {"cpu": "8", "memory": "64Gi"}}),
        }, default={}),
        "replicas": _int("Number of serving pods (each: SGLang + sidecar).", 1, 0, 64),
        "placement": _obj("Where serving pods run.", {
            "gpuCount": _int("GPUs per serving pod; at least serving.tensorParallelSize.", 1,
                             1, 8),
            "gpuResourceName": _str("Extended resource name of the GPU.", "nvidia.com/gpu",
                                    max_length=253),
            "nodeSelector": {"type": "object", "maxProperties": 32,
                             "default": DEFAULT_NODE_SELECTOR,
                             "description": "Node labels the pods require (default: B200).",
                             "additionalProperties": {"type": "string", "maxLength": 253}},
            "tolerations": {"type": "array", "maxItems": 32, "default": DEFAULT_TOLERATIONS,
                            "description": "Taints the pods tolerate (default: GPU taint).",
                            "items": _obj("A toleration.", {
                                "key": _str("Taint key; empty matches all.", max_length=253),
                                "operator": {"type": "string", "enum": ["Exists", "Equal"],
                                             "description": "How key and value match."},
                                "value": _str("Taint value for Equal.", max_length=253),
                                "effect": {"type": "string", "description": "Taint effect.",
                                           "enum": ["NoSchedule", "PreferNoSchedule",
                                                    "NoExecute"]},
                                "tolerationSeconds": {"type": "integer", "minimum": 0,
                                                      "description": "NoExecute grace."},
                            })},
            "priorityClassName": _str("PriorityClass of serving pods.", max_length=253),
        }, default={}),
        "speculators": _obj("The speculators that draft tokens for the target.", {
            "static": _obj("The static speculator: a heavier draft model trained offline, "
                           "the speed floor from the first request.", {
                "model": _str("Draft model or EAGLE head (repo id or path); empty = none."),
                "revision": _str("Revision of the static speculator.", "main",
                                 max_length=128),
                "architecture": _enum("What the static model is.",
                                      ["draft-lm", "eagle", "eagle3"], "draft-lm"),
            }, default={}),
            "adaptive": _obj("The adaptive speculator: a suffix index over live traffic and a "
                             "small neural drafter distilled online by the trainer.", {
                "enabled": _bool("Serve the adaptive speculator.", True),
                "mirrorFraction": _num("Fraction of finished requests mirrored to the "
                                       "trainer.", 1.0, 0.0, 1.0),
            }, default={}),
        }, default={}),
        "trainer": _obj("The online trainer Job that distills the adaptive drafter.", {
            "enabled": _bool("Run the trainer (needs speculators.adaptive.enabled).", True),
            "image": _str("Trainer image.", DEFAULT_TRAINER_IMAGE),
            "gpuCount": _int("GPUs for the trainer pod.", 1, 0, 8),
            "resources": _resources("CPU/memory for the trainer container.",
                                    {"requests": {"cpu": "4", "memory": "32Gi"}}),
            "schedule": _obj("How often and how long the trainer runs.", {
                "roundIntervalSeconds": _int("Pause between training rounds.", 900, 0, 86400),
                "maxRoundSeconds": _int("Wall-clock budget of one round (Job deadline).",
                                        3600, 60, 86400),
                "maxStepsPerRound": _int("Optimizer-step budget of one round.", 2000, 1,
                                         10_000_000),
            }, default={}),
            "backoffLimit": _int("Pod retries inside one trainer Job.", 3, 0, 20),
            "restartBackoffSeconds": _int("Base of the exponential delay before a failed "
                                          "trainer Job is recreated (capped at 1 h).", 60, 1,
                                          3600),
        }, default={}),
        "storage": _obj("The volume for adaptive weights (/data/weights) and mirrored "
                        "traffic (/data/mirror), shared by serving pods and the trainer.", {
            "size": _quantity("Requested capacity; can grow, never shrink.", "200Gi"),
            "storageClassName": _str("StorageClass; empty = the cluster default.",
                                     max_length=253),
            # The default does not follow replicas: see status.storage_condition().
            "accessMode": _enum("Access mode, fixed when the PVC is created. Every serving "
                                "pod and the trainer pod mount it: ReadWriteMany shares it "
                                "across nodes. ReadWriteOnce (one node) and "
                                "ReadWriteOncePod (one pod) fit one pod only (replicas 1, "
                                "trainer off); else condition StorageAccessible is False: "
                                "pods on another node hang in ContainerCreating.",
                                ["ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod"],
                                "ReadWriteMany"),
        }, default={}),
        "controller": _obj("Bounds for the confidence-aware controller; everything else "
                           "(speculator choice, per-step lookahead) is learned online.", {
            "maxLookahead": _int("Most draft tokens verified per step.", 8, 1, 32),
        }, default={}),
        "sidecar": _obj("The ATLAS gRPC sidecar container.", {
            "image": _str("Sidecar image.", DEFAULT_SIDECAR_IMAGE),
            "imagePullPolicy": _enum("Image pull policy.", ["Always", "IfNotPresent", "Never"],
                                     "IfNotPresent"),
            "port": _int("gRPC port (Service port too).", 50051, 1024, 65535),
            "metricsPort": _int("Prometheus /metrics port.", 9090, 1024, 65535),
            "gpuCount": _int("GPUs for the sidecar's drafters (the static speculator wants one); "
                             "0 runs them on CPU.", 0, 0, 8),
            "resources": _resources("CPU/memory for the sidecar container.",
                                    {"requests": {"cpu": "2", "memory": "8Gi"}}),
            "tls": _secret_ref("TLS for gRPC: a kubernetes.io/tls Secret (tls.crt, tls.key).",
                               with_key=False),
            "auth": _secret_ref("Bearer-token auth for gRPC: the Secret and key of the token.",
                                with_key=True),
            "adminAuth": _secret_ref("Token of the admin RPCs (RolloutWeights, ResetStats): "
                                     "the Secret and key. Unset: admin RPCs are refused. It "
                                     "must be another token than auth (never defaulted to "
                                     "it): the data token opens no admin RPC.",
                                     with_key=True),
        }, default={}),
        "rollout": _obj("How new adaptive weight versions reach the sidecars (hot, no pod "
                        "restart).", {
            "canaryFraction": _num("Fraction of requests served by a new version before "
                                   "promotion; 0 promotes at once.", 0.1, 0.0, 1.0),
            "canaryDurationSeconds": _int("How long a canary runs before promotion.", 600, 0,
                                          86400),
            "autoRollback": _bool("Drop a canary whose accept length falls too far.", True),
            "maxAcceptLengthDrop": _num("Relative accept-length drop (canary vs serving) "
                                        "that triggers rollback.", 0.05, 0.0, 1.0),
        }, default={}),
    }, required=["model"])


def status_schema() -> Schema:
    """The openAPIV3Schema of `.status` (written by the operator; the trainer may write
    latestPublishedVersion and acceptLengthByVersion)."""
    return _obj("Observed state, written by the operator and the trainer.", {
        "observedGeneration": {"type": "integer", "minimum": 0,
                               "description": "The .metadata.generation last reconciled."},
        "replicas": {"type": "integer", "minimum": 0,
                     "description": "Serving pods that exist (scale subresource)."},
        "readyReplicas": {"type": "integer", "minimum": 0,
                          "description": "Serving pods ready to take traffic."},
        "selector": _str("Label selector of the serving pods (scale subresource).",
                         max_length=1024),
        "servingWeightVersion": _str("Adaptive weight version the sidecars serve.",
                                     max_length=128),
        "canaryWeightVersion": _str("Version in canary, if any.", max_length=128),
        "latestPublishedVersion": _str("Newest version the trainer published.",
                                       max_length=128),
        "recentAcceptLength": {"type": "number", "minimum": 0,
                               "description": "Recent mean accepted tokens per step for the "
                                              "serving version."},
        "acceptLengthByVersion": {"type": "object", "maxProperties": 32,
                                  "description": "Recent accept length per weight version, "
                                                 "reported by the trainer from mirrored "
                                                 "traffic.",
                                  "additionalProperties": {"type": "number", "minimum": 0}},
        "rollout": _obj("Rollout progress.", {
            "phase": {"type": "string", "enum": ["Idle", "Canary"],
                      "description": "Idle or Canary."},
            "canaryStartedAt": {"type": "string", "format": "date-time",
                                "description": "When the current canary began."},
            "rejectedVersions": {"type": "array", "maxItems": 16,
                                 "description": "Versions rolled back; never retried.",
                                 "items": {"type": "string", "maxLength": 128}},
        }),
        "trainer": _obj("Trainer Job progress.", {
            "phase": {"type": "string", "description": "Trainer state.",
                      "enum": ["Disabled", "Pending", "Running", "Succeeded", "Failed",
                               "BackingOff"]},
            "restarts": {"type": "integer", "minimum": 0,
                         "description": "Consecutive failed Jobs recreated."},
            "lastFinishedAt": {"type": "string", "format": "date-time",
                               "description": "When the last Job finished."},
        }),
        "conditions": {"type": "array", "maxItems": 16, "items": _condition(),
                       "description": "Ready, TargetReady, SidecarReady, TrainerReady, "
                                      "SpeculatorDegraded, StorageAccessible.",
                       "x-kubernetes-list-type": "map",
                       "x-kubernetes-list-map-keys": ["type"]},
    })


# Cross-field rules: CEL for the apiserver, the same rule in Python for the operator (an
# apiserver without CEL, or the emulator in tests, would let them through).
CROSS_FIELD_RULES: list[tuple[str, str, Any]] = [
    ("self.placement.gpuCount >= self.serving.tensorParallelSize",
     "placement.gpuCount must be at least serving.tensorParallelSize",
     lambda spec: spec["placement"]["gpuCount"] >= spec["serving"]["tensorParallelSize"]),
    ("!self.trainer.enabled || self.speculators.adaptive.enabled",
     "trainer.enabled needs speculators.adaptive.enabled",
     lambda spec: not spec["trainer"]["enabled"] or spec["speculators"]["adaptive"]["enabled"]),
    ("self.sidecar.port != self.sidecar.metricsPort && self.sidecar.port != self.serving.port"
     " && self.sidecar.metricsPort != self.serving.port",
     "sidecar.port, sidecar.metricsPort and serving.port must differ",
     lambda spec: len({spec["sidecar"]["port"], spec["sidecar"]["metricsPort"],
                       spec["serving"]["port"]}) == 3),
    # The admin token opens rollouts and stat resets: every client holding the data token
    # would hold it too if both named the same Secret key.
    ("!has(self.sidecar.adminAuth) || !has(self.sidecar.auth)"
     " || self.sidecar.adminAuth.secretName != self.sidecar.auth.secretName"
     " || self.sidecar.adminAuth.key != self.sidecar.auth.key",
     "sidecar.adminAuth must name another Secret or key than sidecar.auth: the admin token "
     "must not be the data token",
     lambda spec: _distinct_tokens(spec["sidecar"])),
]


def _distinct_tokens(sidecar: dict[str, Any]) -> bool:
    admin, data = sidecar.get("adminAuth"), sidecar.get("auth")
    if not admin or not data:
        return True
    return bool((admin["secretName"], admin["key"]) != (data["secretName"], data["key"]))


# The name becomes a Service name (a DNS-1035 label) and gets "-trainer" appended (63 max).
MAX_NAME_LENGTH = 55
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
NAME_RULE = (f"self.metadata.name.size() <= {MAX_NAME_LENGTH} && "
             f"self.metadata.name.matches('{NAME_PATTERN}')",
             f"metadata.name must be a DNS label of at most {MAX_NAME_LENGTH} characters that "
             "starts with a letter (it names a Service and, with -trainer, a Job)")


def openapi_schema() -> Schema:
    spec = spec_schema()
    spec["x-kubernetes-validations"] = [
        {"rule": rule, "message": message} for rule, message, _ in CROSS_FIELD_RULES
    ]
    return {"type": "object", "description": "An ATLAS speculative-decoding endpoint.",
            "required": ["spec"],
            "x-kubernetes-validations": [{"rule": NAME_RULE[0], "message": NAME_RULE[1]}],
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"type": "object"},
                "spec": spec,
                "status": status_schema(),
            }}


def build_crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME,
                     "labels": {"app.kubernetes.io/part-of": "atlas"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "plural": PLURAL, "singular": SINGULAR,
                      "shortNames": SHORT_NAMES, "listKind": f"{KIND}List",
                      "categories": ["atlas"]},
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": openapi_schema()},
                "subresources": {
                    "status": {},
                    # `kubectl scale ae/x --replicas=N` and HPAs work on the serving pods.
                    "scale": {"specReplicasPath": ".spec.replicas",
                              "statusReplicasPath": ".status.replicas",
                              "labelSelectorPath": ".status.selector"},
                },
                "additionalPrinterColumns": [
                    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas",
                     "description": "Serving pods ready."},
                    {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas",
                     "description": "Serving pods desired."},
                    {"name": "Weights", "type": "string",
                     "jsonPath": ".status.servingWeightVersion",
                     "description": "Adaptive weight version served."},
                    {"name": "AcceptLen", "type": "number",
                     "jsonPath": ".status.recentAcceptLength",
                     "description": "Recent accepted tokens per step."},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
            }],
        },
    }


def build_kopf_peering_crd() -> dict[str, Any]:
    """kopf's ClusterKopfPeering: where operator replicas see each other (main.py explains
    why we use it). The shape kopf documents; its fields are kopf's business, so the schema
    keeps them unpruned."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "clusterkopfpeerings.kopf.dev",
                     "labels": {"app.kubernetes.io/part-of": "atlas"}},
        "spec": {
            "group": "kopf.dev",
            "scope": "Cluster",
            "names": {"kind": "ClusterKopfPeering", "plural": "clusterkopfpeerings",
                      "singular": "clusterkopfpeering"},
            "versions": [{
                "name": "v1", "served": True, "storage": True,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "Heartbeats of kopf operators that share a peering name.",
                    "properties": {
                        "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                                   "description": "One entry per live operator replica."},
                    },
                }},
            }],
        },
    }


# --- generation of the YAML copies ----------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[2]
HEADER = ("# GENERATED by `python -m atlas_operator.crd --write` from "
          "operator/atlas_operator/crd.py.\n# Do not edit by hand: edit crd.py and regenerate.\n")


def generated_files() -> dict[Path, str]:
    """Every generated file and its content: the CRDs in crds/ and the chart's copies."""
    texts = {f"{crd['metadata']['name']}.yaml":
             HEADER + yaml.safe_dump(crd, sort_keys=False, width=100)
             for crd in (build_crd(), build_kopf_peering_crd())}
    return {folder / name: text
            for folder in (REPO_ROOT / "crds", REPO_ROOT / "charts" / "atlas-operator" / "crds")
            for name, text in texts.items()}


def render_yaml() -> str:
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the generated copies")
    mode.add_argument("--check", action="store_true", help="fail if a copy drifted")
    args = parser.parse_args(argv)
    files = generated_files()
    if args.write:
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO_ROOT)}")
        return 0
    if args.check:
        stale = [p for p, text in files.items() if not p.exists() or p.read_text() != text]
        for path in stale:
            print(f"{path.relative_to(REPO_ROOT)} is stale: run python -m atlas_operator.crd "
                  "--write", file=sys.stderr)
        return 1 if stale else 0
    sys.stdout.write(render_yaml())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
