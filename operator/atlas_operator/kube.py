"""A small dict-in, dict-out Kubernetes client and the idempotent `apply` the operator uses.

Why not typed models: children are rendered as plain dicts, and comparing dicts is what
idempotency needs. Why not server-side apply: it is the right tool on a real cluster, but
the emulator the tests run against ignores it; a JSON merge patch computed against the last
applied state (kept in an annotation, like `kubectl apply`) works on both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import kubernetes
from kubernetes.client.exceptions import ApiException
from kubernetes.utils import parse_quantity

from atlas_operator import LAST_APPLIED_ANNOTATION, PLURAL
from atlas_operator.render import Manifest, canonical_json

# Plurals of the kinds the operator touches (it needs no discovery for these).
PLURALS = {
    "ConfigMap": "configmaps",
    "Deployment": "deployments",
    "Event": "events",
    "Job": "jobs",
    "NetworkPolicy": "networkpolicies",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "Pod": "pods",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "Service": "services",
    "ServiceAccount": "serviceaccounts",
    "AtlasEndpoint": PLURAL,
}
REQUEST_TIMEOUT_S = 30.0


def load_api_client() -> kubernetes.client.ApiClient:
    """In-cluster credentials when running in a pod, else $KUBECONFIG (read now, not at
    import time, so tests can point it at an emulator)."""
    configuration = kubernetes.client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    else:
        kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"),
                                           client_configuration=configuration)
    return kubernetes.client.ApiClient(configuration)


def object_path(api_version: str, kind: str, namespace: str | None, name: str | None = None,
                subresource: str | None = None) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = base + (f"/namespaces/{quote(namespace)}" if namespace else "") + f"/{PLURALS[kind]}"
    if name:
        path += f"/{quote(name)}"
    if subresource:
        path += f"/{subresource}"
    return path


class Kube:
    """get / list / create / patch / delete on plain dicts. Errors are ApiException."""

    def __init__(self, api_client: kubernetes.client.ApiClient) -> None:
        self.api = api_client

    def _call(self, method: str, path: str, body: Any = None,
              query: list[tuple[str, str]] | None = None,
              content_type: str = "application/json") -> Any:
        request = self.api.param_serialize(
            method, path, query_params=query or None,
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body, auth_settings=["BearerToken"])
        response = self.api.call_api(*request, _request_timeout=REQUEST_TIMEOUT_S)
        data = response.read()
        if not 200 <= response.status <= 299:
            raise ApiException.from_response(http_resp=response, body=data.decode(errors="replace"),
                                             data=None)
        return json.loads(data) if data else None

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Manifest | None:
        try:
            obj: Manifest = self._call("GET", object_path(api_version, kind, namespace, name))
            return obj
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: str,
             match_labels: Mapping[str, str]) -> list[Manifest]:
        selector = ",".join(f"{k}={v}" for k, v in sorted(match_labels.items()))
        result = self._call("GET", object_path(api_version, kind, namespace),
                            query=[("labelSelector", selector), ("limit", "500")])
        items: list[Manifest] = result.get("items", [])
        # Filter here too: cheap, and correct even where a server ignores the selector.
        return [item for item in items
                if all(item.get("metadata", {}).get("labels", {}).get(k) == v
                       for k, v in match_labels.items())]

    def create(self, obj: Manifest) -> Manifest:
        meta = obj["metadata"]
        created: Manifest = self._call(
            "POST", object_path(obj["apiVersion"], obj["kind"], meta.get("namespace")), obj)
        return created

    def patch(self, api_version: str, kind: str, namespace: str, name: str,
              patch: Mapping[str, Any], subresource: str | None = None) -> Manifest:
        patched: Manifest = self._call(
            "PATCH", object_path(api_version, kind, namespace, name, subresource), dict(patch),
            content_type="application/merge-patch+json")
        return patched

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        try:
            # Background: the object goes now, the garbage collector removes its pods.
            self._call("DELETE", object_path(api_version, kind, namespace, name),
                       {"propagationPolicy": "Background"})
        except ApiException as e:
            if e.status != 404:
                raise


# --- idempotent apply -----------------------------------------------------------------


def removed_keys(last: Any, desired: Any) -> Any:
    """A merge patch that deletes (sets to null) every key present in `last` but gone from
    `desired`, recursing through dicts. Lists are replaced wholesale by a merge patch, so
    they need nothing."""
    if not isinstance(last, dict) or not isinstance(desired, dict):
        return {}
    patch: dict[str, Any] = {}
    for key, old in last.items():
        if key not in desired:
            patch[key] = None
        else:
            sub = removed_keys(old, desired[key])
            if sub:
                patch[key] = sub
    return patch


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# Keys whose values are Kubernetes quantities. The apiserver stores a quantity in its
# canonical string form, whatever was sent: a GPU limit written as 1 reads back as "1",
# "1024Mi" as "1Gi", "0.5" as "500m". Compared as written, every resync would patch.
QUANTITY_MAPS = frozenset({"limits", "requests", "capacity", "allocatable", "hard"})
QUANTITY_KEYS = frozenset({"sizeLimit", "storage"})


def same_quantity(desired: Any, live: Any) -> bool:
    """Whether two quantities are equal in value (1 == "1" == "1000m"); an unparsable one
    is equal only to itself."""
    if desired == live:
        return True
    try:
        return bool(parse_quantity(desired) == parse_quantity(live))
    except ValueError:
        return False


def is_subset(desired: Any, live: Any) -> bool:
    """Whether `live` already carries everything in `desired`, compared by value, not by
    representation. Only the fields we render are compared: extra keys in live dicts are
    fine (the apiserver fills in defaults, controllers add their own); lists must match
    item by item. Quantities (the values of QUANTITY_MAPS, QUANTITY_KEYS) compare as
    numbers. An empty list or map matches an absent key: the apiserver omits empty
    optional fields (`tolerations: []`, `nodeSelector: {}`) when it serializes."""
    if isinstance(desired, dict):
        if not isinstance(live, dict):
            return False
        for key, value in desired.items():
            if key not in live:
                if value in ({}, [], None):
                    continue
                return False
            if key in QUANTITY_MAPS and isinstance(value, dict):
                have = live[key]
                if not isinstance(have, dict) or not all(
                        k in have and same_quantity(v, have[k]) for k, v in value.items()):
                    return False
            elif key in QUANTITY_KEYS and not isinstance(value, dict | list):
                if not same_quantity(value, live[key]):
                    return False
            elif not is_subset(value, live[key]):
                return False
        return True
    if isinstance(desired, list):
        return isinstance(live, list) and len(desired) == len(live) and all(
            is_subset(d, v) for d, v in zip(desired, live, strict=True))
    return bool(desired == live)


def _without(obj: Manifest, fields: Iterable[str]) -> Manifest:
    return {k: v for k, v in obj.items() if k not in set(fields)}


def _last_applied(live: Manifest) -> Manifest:
    raw = live.get("metadata", {}).get("annotations", {}).get(LAST_APPLIED_ANNOTATION)
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}


def _stamped(obj: Manifest, managed: Manifest) -> Manifest:
    """`obj` with the canonical JSON of what we manage in the last-applied annotation."""
    meta = dict(obj["metadata"])
    meta["annotations"] = {**meta.get("annotations", {}),
                           LAST_APPLIED_ANNOTATION: canonical_json(managed)}
    return {**obj, "metadata": meta}


@dataclass(frozen=True)
class Applied:
    action: str  # "created", "patched", "recreated" or "unchanged"
    object: Manifest


def apply(kube: Kube, desired: Manifest, create_only: tuple[str, ...] = (),
          recreate_on_change: tuple[str, ...] = ()) -> Applied:
    """Make the live object match `desired`: create it if missing, patch it if it differs
    from what we applied last or drifted, else leave it alone (no write at all).

    create_only: top-level fields set at creation and then owned by someone else (the
        rollout ConfigMap's data) or immutable (a PVC's spec).
    recreate_on_change: top-level fields that cannot be patched (a Job's spec): a change
        there deletes and recreates the object.
    """
    api_version, kind = desired["apiVersion"], desired["kind"]
    namespace, name = desired["metadata"]["namespace"], desired["metadata"]["name"]
    managed = _without(desired, create_only)
    live = kube.get(api_version, kind, namespace, name)
    if live is None:
        try:
            return Applied("created", kube.create(_stamped(desired, managed)))
        except ApiException as e:
            if e.status != 409:  # 409: someone (an earlier run of ours) got there first
                raise
            live = kube.get(api_version, kind, namespace, name)
            if live is None:
                raise
    last = _last_applied(live)
    if last == managed and is_subset(managed, live):
        return Applied("unchanged", live)
    if any(last.get(f) != managed.get(f) for f in recreate_on_change) and last:
        kube.delete(api_version, kind, namespace, name)
        return Applied("recreated", kube.create(_stamped(desired, managed)))
    patch = deep_merge(removed_keys(last, managed), _stamped(managed, managed))
    return Applied("patched", kube.patch(api_version, kind, namespace, name, patch))
