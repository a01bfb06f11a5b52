"""Static checks: the generated CRDs, the CRs against the CRD schema, and the Helm chart
(helm lint --strict, helm template | kubernetes-validate --strict on several versions)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from atlas_operator import crd
from atlas_operator.spec import InvalidSpecError, apply_defaults, validate_endpoint

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "atlas-operator"
CRS = Path(__file__).parent / "crs"
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
# Oldest and newest the chart supports (kubeVersion >=1.25), and one in between.
KUBE_VERSIONS = ["1.25", "1.30", "1.34"]
EXPECT_ERROR = "test.atlas.ai/expect-error"


def helm() -> str:
    path = os.environ.get("HELM") or str(REPO / ".tools" / "helm")
    if not Path(path).is_file() and shutil.which("helm"):
        path = shutil.which("helm") or path
    if not Path(path).is_file():
        pytest.skip("helm not found: run `bash scripts/fetch-k8s-tools.sh .tools` (make tools)")
    return path


def load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return doc


# --- the CRD ---------------------------------------------------------------------------


def test_generated_crd_copies_match_their_source() -> None:
    files = crd.generated_files()
    assert {p.parent for p in files} == {REPO / "crds", CHART / "crds"}
    for path, text in files.items():
        assert path.read_text() == text, f"{path} drifted: python -m atlas_operator.crd --write"
    assert crd.main(["--check"]) == 0


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", ["atlasendpoints.atlas.ai", "clusterkopfpeerings.kopf.dev"])
def test_crd_validates_against_the_kubernetes_schema(name: str, version: str) -> None:
    manifest = load(REPO / "crds" / f"{name}.yaml")
    assert kubernetes_validate.validate(manifest, version, strict=True)


def _walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    nodes = [(path, schema)]
    for name, sub in schema.get("properties", {}).items():
        nodes += _walk(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            nodes += _walk(schema[key], f"{path}[{key}]")
    return nodes


def test_crd_schema_is_structural_and_documented() -> None:
    schema = crd.openapi_schema()
    for path, node in _walk(schema):
        # Structural: every node has a type, except int-or-string and opaque nodes.
        assert "type" in node or node.get("x-kubernetes-int-or-string") \
            or node.get("x-kubernetes-preserve-unknown-fields"), path
        assert not ("properties" in node and "additionalProperties" in node), path
    for path, node in _walk(schema["properties"]["spec"], ".spec"):
        if "[" not in path:
            assert node.get("description"), f"{path} has no description"
    for path, node in _walk(schema["properties"]["status"], ".status"):
        if "[" not in path:
            assert node.get("description"), f"{path} has no description"


def test_crd_defaults_are_valid_and_apply_to_an_empty_spec() -> None:
    spec_schema = crd.openapi_schema()["properties"]["spec"]
    spec = apply_defaults({"model": {"source": "x/y"}}, spec_schema)
    # The schema's own defaults pass its own validation (the apiserver requires it).
    assert validate_endpoint({"metadata": {"name": "a"}, "spec": spec}) == spec
    assert spec["placement"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-B200"}
    assert spec["serving"]["tensorParallelSize"] == 1
    assert spec["controller"]["maxLookahead"] == 8
    assert spec["sidecar"]["port"] == 50051 and spec["sidecar"]["metricsPort"] == 9090


def test_crd_has_status_scale_and_printer_columns() -> None:
    version = crd.build_crd()["spec"]["versions"][0]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {"Ready": ".status.readyReplicas", "Replicas": ".spec.replicas",
                       "Weights": ".status.servingWeightVersion",
                       "AcceptLen": ".status.recentAcceptLength",
                       "Age": ".metadata.creationTimestamp"}
    conditions = crd.status_schema()["properties"]["conditions"]
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]


# --- CRs against the schema -------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES + sorted(CRS.glob("good-*.yaml")),
                         ids=lambda p: p.name)
def test_good_custom_resources_pass_the_schema(path: Path) -> None:
    body = load(path)
    assert (body["apiVersion"], body["kind"]) == ("atlas.ai/v1alpha1", "AtlasEndpoint")
    spec = validate_endpoint(body)
    assert spec["model"]["source"] == body["spec"]["model"]["source"]


@pytest.mark.parametrize("path", sorted(CRS.glob("bad-*.yaml")), ids=lambda p: p.name)
def test_bad_custom_resources_fail_with_the_right_message(path: Path) -> None:
    body = load(path)
    expected = body["metadata"]["annotations"][EXPECT_ERROR]
    with pytest.raises(InvalidSpecError) as caught:
        validate_endpoint(body)
    assert caught.value.errors == [expected]


@pytest.mark.parametrize("name", ["Coder", "9lives", "a" * 56, "under_score"])
def test_bad_names_are_rejected(name: str) -> None:
    with pytest.raises(InvalidSpecError, match="metadata.name must be a DNS label"):
        validate_endpoint({"metadata": {"name": name}, "spec": {"model": {"source": "x/y"}}})


# --- the Helm chart ----------------------------------------------------------------------


def _template(*args: str) -> list[dict[str, Any]]:
    out = subprocess.run([helm(), "template", "atlas", str(CHART), "--namespace", "atlas-system",
                          *args], check=True, capture_output=True, text=True, timeout=60).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def test_helm_lint_strict_passes() -> None:
    result = subprocess.run([helm(), "lint", "--strict", str(CHART)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", [[], ["--set", "replicaCount=2"],
                                    ["--set", "peering.enabled=false,rbac.create=false"],
                                    ["--set", "rbac.scope=namespace,peering.enabled=false",
                                     "--set", "rbac.namespaces={serving,team-b}"]],
                         ids=["defaults", "two-replicas", "standalone", "namespaced"])
def test_rendered_chart_passes_kubernetes_validate_strict(version: str, values: list[str],
                                                          tmp_path: Path) -> None:
    rendered = tmp_path / "chart.yaml"
    docs = _template("--include-crds", "--kube-version", version, *values)
    rendered.write_text(yaml.safe_dump_all(docs))
    result = subprocess.run(["kubernetes-validate", "--strict", "-k", version, str(rendered)],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PATH": f"{Path(sys.executable).parent}:"
                                                       f"{os.environ.get('PATH', '')}"})
    assert result.returncode == 0, result.stdout + result.stderr
    validated = {line.split("resource ")[1].split(" ")[0] for line in result.stdout.splitlines()
                 if line.startswith("INFO")}
    assert "deployment/atlas-atlas-operator" in validated
    assert "customresourcedefinition/atlasendpoints.atlas.ai" in validated


def test_chart_carries_the_generated_crd_not_a_copy_by_hand() -> None:
    docs = _template("--include-crds")
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    assert crd.build_crd() in crds


def test_chart_refuses_replicas_without_peering() -> None:
    result = subprocess.run([helm(), "template", "x", str(CHART), "--set",
                             "replicaCount=3,peering.enabled=false"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "needs peering.enabled=true" in result.stderr


def test_operator_deployment_flags_follow_values() -> None:
    def operator_args(*values: str) -> list[str]:
        deployment = next(d for d in _template(*values) if d["kind"] == "Deployment")
        args: list[str] = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        return args

    assert "--peering=atlas-operator" in operator_args()
    assert "--standalone" in operator_args("--set", "peering.enabled=false")
    from atlas_operator.main import parse_args

    parsed = parse_args(operator_args("--set", "peering.enabled=false,operator.verbose=true"))
    assert parsed.standalone and parsed.verbose


def chart_rules() -> list[dict[str, Any]]:
    role = next(d for d in _template() if d["kind"] == "ClusterRole")
    rules: list[dict[str, Any]] = role["rules"]
    return rules


def test_chart_rbac_is_least_privilege() -> None:
    rules = chart_rules()
    for rule in rules:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
    granted = {(g, r, v) for rule in rules for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    # No secrets at all, no deletes beyond the trainer's children (its Job, recreated each
    # round; its Service and RBAC, deleted when the trainer is turned off), no pod
    # mutations.
    assert not any(r == "secrets" for _, r, _ in granted)
    from atlas_operator import kube, render

    trainer = {(api_version.rpartition("/")[0], kube.PLURALS[kind])
               for api_version, kind, _ in render.trainer_children(render.Owner("a", "b", "c"))}
    assert {(g, r) for g, r, v in granted if v == "delete"} == trainer == {
        ("batch", "jobs"), ("", "services"), ("", "serviceaccounts"),
        ("rbac.authorization.k8s.io", "roles"), ("rbac.authorization.k8s.io", "rolebindings"),
        ("networking.k8s.io", "networkpolicies")}
    assert {v for g, r, v in granted if r == "pods"} == {"list"}
    # blockOwnerDeletion on the children's ownerReferences needs this where it is enforced.
    assert ("atlas.ai", "atlasendpoints/finalizers", "update") in granted
    assert {v for g, r, v in granted if r.endswith("/finalizers")} == {"update"}


NAMESPACED = ["--set", "rbac.scope=namespace,peering.enabled=false",
              "--set", "rbac.namespaces={serving,team-b}"]


def test_helm_lint_strict_passes_in_namespace_scope() -> None:
    result = subprocess.run([helm(), "lint", "--strict", str(CHART), *NAMESPACED],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_namespace_scope_grants_roles_in_the_watched_namespaces_only() -> None:
    docs = _template(*NAMESPACED)
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"}
    roles = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "Role"}
    bindings = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "RoleBinding"}
    assert set(roles) == set(bindings) == {"serving", "team-b"}
    # The same rules as the cluster install, less the cluster-scoped resources a Role
    # cannot grant (CRD discovery, kopf's cluster peering).
    cluster_scoped = {"apiextensions.k8s.io", "kopf.dev"}
    expected = [r for r in chart_rules() if not set(r["apiGroups"]) & cluster_scoped]
    for namespace, role in roles.items():
        assert role["rules"] == expected, namespace
        binding = bindings[namespace]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": role["metadata"]["name"]}
        assert [(s["kind"], s["namespace"]) for s in binding["subjects"]] == [
            ("ServiceAccount", "atlas-system")]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    from atlas_operator.main import parse_args

    parsed = parse_args(deployment["spec"]["template"]["spec"]["containers"][0]["args"])
    assert parsed.namespace == ["serving", "team-b"] and parsed.standalone


def test_namespace_scope_defaults_to_the_release_namespace() -> None:
    docs = _template("--set", "rbac.scope=namespace,peering.enabled=false")
    assert [d["metadata"]["namespace"] for d in docs if d["kind"] == "Role"] == ["atlas-system"]


@pytest.mark.parametrize(("values", "message"), [
    ("rbac.scope=namespace", "needs peering.enabled=false"),
    ("rbac.scope=everywhere", "rbac.scope must be cluster or namespace"),
])
def test_chart_refuses_unworkable_rbac_scopes(values: str, message: str) -> None:
    result = subprocess.run([helm(), "template", "x", str(CHART), "--set", values],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and message in result.stderr
