"""Test harness for the operator: a kmock Kubernetes emulator on loopback, made a little more
like a real apiserver, and the real operator (kopf's own runner) pointed at it."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

# Fast clocks for the operator (read when atlas_operator.handlers is imported).
os.environ.setdefault("ATLAS_RESYNC_SECONDS", "1")
os.environ.setdefault("ATLAS_RETRY_SECONDS", "0.5")
os.environ.setdefault("ATLAS_PEERING_LIFETIME", "3")

import attrs  # noqa: E402
import jsonpatch  # noqa: E402
import kmock  # noqa: E402
import yaml  # noqa: E402
from kmock._internal import enums, rendering  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "serving"

# What the emulator serves (kmock needs the resources declared for discovery and listing).
RESOURCES: dict[str, dict[str, Any]] = {
    "atlas.ai/v1alpha1/atlasendpoints": dict(kind="AtlasEndpoint", singular="atlasendpoint",
                                             shortnames={"ae"}, subresources={"status", "scale"}),
    "apps/v1/deployments": dict(kind="Deployment", singular="deployment",
                                subresources={"status", "scale"}),
    "batch/v1/jobs": dict(kind="Job", singular="job", subresources={"status"}),
    "v1/configmaps": dict(kind="ConfigMap", singular="configmap"),
    "networking.k8s.io/v1/networkpolicies": dict(kind="NetworkPolicy",
                                                 singular="networkpolicy"),
    "v1/services": dict(kind="Service", singular="service", subresources={"status"}),
    "v1/persistentvolumeclaims": dict(kind="PersistentVolumeClaim",
                                      singular="persistentvolumeclaim"),
    "v1/serviceaccounts": dict(kind="ServiceAccount", singular="serviceaccount"),
    "v1/pods": dict(kind="Pod", singular="pod", subresources={"status"}),
    "v1/events": dict(kind="Event", singular="event"),
    "rbac.authorization.k8s.io/v1/roles": dict(kind="Role", singular="role"),
    "rbac.authorization.k8s.io/v1/rolebindings": dict(kind="RoleBinding", singular="rolebinding"),
    "v1/namespaces": dict(kind="Namespace", singular="namespace", namespaced=False),
    "apiextensions.k8s.io/v1/customresourcedefinitions": dict(
        kind="CustomResourceDefinition", singular="customresourcedefinition", namespaced=False),
    "kopf.dev/v1/clusterkopfpeerings": dict(kind="ClusterKopfPeering",
                                            singular="clusterkopfpeering", namespaced=False),
}
VERBS = {"get", "list", "watch", "create", "patch", "delete"}


@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator plus the few apiserver behaviours the operator relies on:

    - metadata stamping (name from generateName, uid, resourceVersion, creationTimestamp,
      generation that moves only when .spec changes): kmock stamps nothing, and
      ownerReferences need uids;
    - the garbage collector: deleting an owner deletes everything whose ownerReferences
      name its uid (this is how a real cluster removes an endpoint's children);
    - injected failures: `fail_creates` makes POSTs of those plurals answer 503 without
      storing anything (an apiserver hiccup), to interrupt the operator mid-way.
    """

    fail_creates: set[str] = attrs.field(factory=set)
    # Plurals every request to which answers 403 (what RBAC without a grant does).
    forbidden: set[str] = attrs.field(factory=set)
    _versions: Any = attrs.field(factory=lambda: itertools.count(1))

    async def _handle(self, request: rendering.Request) -> Any:
        resource = request.resource
        if resource is not None and resource.plural in self.forbidden:
            raise kmock.KubernetesError(status=403, reason="Forbidden",
                                        message=f"{resource.plural} is forbidden")
        if resource is not None and isinstance(request.data, dict):
            if request.action in (enums.action.CREATE, enums.action.UPDATE) \
                    and request.subresource is None:
                _canonicalize_quantities(request.data)
                _default_containers(request.data)
                if resource.plural in ("deployments", "jobs"):
                    _omit_empty(request.data.get("spec"))
            if request.action == enums.action.CREATE:
                if resource.plural in self.fail_creates:
                    raise kmock.KubernetesError(status=503, reason="ServiceUnavailable",
                                                message="injected failure")
                meta = request.data.setdefault("metadata", {})
                if not meta.get("name") and meta.get("generateName"):  # kopf's events use it
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp",
                                dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
                meta.setdefault("generation", 1)
                meta["resourceVersion"] = str(next(self._versions))
            elif request.action == enums.action.UPDATE and request.name:
                key = (resource, request.namespace, request.name)
                meta = request.data.setdefault("metadata", {})
                meta["resourceVersion"] = str(next(self._versions))
                if key in self.objects and not self.objects[key].deleted:
                    live = self.objects[key].raw
                    generation = live.get("metadata", {}).get("generation", 1)
                    spec_changed = request.subresource is None and "spec" in request.data \
                        and _merged(live.get("spec"), request.data["spec"]) != live.get("spec")
                    meta["generation"] = generation + 1 if spec_changed else generation
        elif resource is not None and isinstance(request.data, list) \
                and request.action == enums.action.UPDATE:
            # A JSON patch (kopf uses them, guarded by a resourceVersion test): bump it too.
            request.data.append({"op": "add", "path": "/metadata/resourceVersion",
                                 "value": str(next(self._versions))})
        try:
            response = await super()._handle(request)
        except jsonpatch.JsonPatchException as e:
            # A real apiserver answers a failed JSON-patch `test` (kopf's optimistic
            # concurrency) with 422, which kopf expects; kmock would answer 500.
            raise kmock.KubernetesError(status=422, reason="Invalid", message=str(e)) from e
        # An owner goes away on DELETE, or on the PATCH that drops its last finalizer.
        if request.action in (enums.action.DELETE, enums.action.UPDATE) and request.name:
            await self._collect_garbage()
        return response

    async def _collect_garbage(self) -> None:
        """Delete objects whose owners are all gone, until nothing changes (cascades)."""
        while True:
            alive = {obj.raw["metadata"].get("uid") for _, _, obj in self._live()}
            orphans = [(res, ns, name) for (res, ns, name), obj in self._live_items()
                       if (refs := obj.raw["metadata"].get("ownerReferences"))
                       and not any(ref.get("uid") in alive for ref in refs)]
            if not orphans:
                return
            async with self._lock:
                for key in orphans:
                    raw = self.objects[key].raw
                    self.objects[key].delete()
                    await self._buses[key[0]].put({"type": "DELETED", "object": raw})

    def _live_items(self) -> list[tuple[tuple[Any, str, str], Any]]:
        return [(key, obj) for key, obj in self.objects.items() if not obj.deleted]

    def _live(self) -> list[tuple[Any, str, Any]]:
        return [(key[0], key[1], obj) for key, obj in self._live_items()]

    # --- helpers for the tests ---------------------------------------------------------

    def get(self, resource: str, name: str, namespace: str | None = NAMESPACE) -> dict | None:
        key = (kmock.resource(resource), namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        raw: dict = self.objects[key].raw
        return raw

    def live(self, resource: str, namespace: str | None = NAMESPACE) -> list[dict]:
        res = kmock.resource(resource)
        return [obj.raw for (r, ns, _), obj in self._live_items()
                if r == res and (namespace is None or ns == namespace)]

    def count_requests(self, method: str, resource: str) -> int:
        res = kmock.resource(resource)
        return sum(1 for r in self._requests
                   if r.method == enums.method(method) and r.resource == res)


# Where a real apiserver stores quantities (it keeps them in canonical form, not as sent).
QUANTITY_MAPS = {"limits", "requests", "capacity", "allocatable", "hard"}
QUANTITY_KEYS = {"sizeLimit", "storage"}
_DECIMAL = [("E", 18), ("P", 15), ("T", 12), ("G", 9), ("M", 6), ("k", 3), ("", 0),
            ("m", -3), ("u", -6), ("n", -9)]
_BINARY = [("Ei", 60), ("Pi", 50), ("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)]


def canonical_quantity(value: Any) -> Any:
    """A quantity as the apiserver stores it (resource.Quantity's canonical form): numbers
    become strings, binary-suffixed values keep the largest exact binary suffix, the rest
    the largest exact decimal one (1 -> "1", "1024Mi" -> "1Gi", "0.5" -> "500m",
    "1000" -> "1k"). An unparsable value is left for validation to reject."""
    from kubernetes.utils import parse_quantity

    try:
        number = parse_quantity(value)
    except ValueError:
        return value
    text = str(value)
    if text.endswith("i") and number == number.to_integral_value() and number >= 1024:
        for suffix, power in _BINARY:
            if number % (2 ** power) == 0:
                return f"{int(number) // 2 ** power}{suffix}"
    if number == 0:
        return "0"
    for suffix, power in _DECIMAL:
        scaled = number.scaleb(-power)
        if scaled == scaled.to_integral_value():
            return f"{int(scaled)}{suffix}"
    return text


def _canonicalize_quantities(obj: Any) -> None:
    if isinstance(obj, list):
        for item in obj:
            _canonicalize_quantities(item)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if key in QUANTITY_MAPS and isinstance(value, dict):
                for name, quantity in value.items():
                    if quantity is not None and not isinstance(quantity, dict | list):
                        value[name] = canonical_quantity(quantity)
            elif key in QUANTITY_KEYS and value is not None \
                    and not isinstance(value, dict | list):
                obj[key] = canonical_quantity(value)
            else:
                _canonicalize_quantities(value)


def _default_containers(obj: Any) -> None:
    """Fields the apiserver fills in on every container it stores (a few of them)."""
    if isinstance(obj, list):
        for item in obj:
            _default_containers(item)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    if isinstance(container, dict) and container.get("name"):
                        container.setdefault("terminationMessagePath", "/dev/termination-log")
                        container.setdefault("terminationMessagePolicy", "File")
            else:
                _default_containers(value)


def _omit_empty(obj: Any) -> None:
    """Drop empty lists and nodeSelector maps, as the apiserver's serialization does
    (omitempty). Not in a merge patch's nulls: a None value is a deletion, kept."""
    if isinstance(obj, list):
        for item in obj:
            _omit_empty(item)
    elif isinstance(obj, dict):
        for key in [k for k, v in obj.items() if v == [] or (k == "nodeSelector" and v == {})]:
            del obj[key]
        for value in obj.values():
            _omit_empty(value)


def _merged(old: Any, patch: Any) -> Any:
    if not isinstance(old, dict) or not isinstance(patch, dict):
        return patch
    out = dict(old)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merged(old.get(key), value)
    return out


@contextlib.asynccontextmanager
async def emulated_apiserver(kubeconfig: Path) -> AsyncIterator[ApiServer]:
    """A started emulator and a kubeconfig file pointing at it (the caller sets KUBECONFIG)."""
    emulator = ApiServer()
    for name, info in RESOURCES.items():
        emulator.resources[name] = kmock.ResourceInfo(
            namespaced=info.get("namespaced", True), kind=info["kind"],
            singular=info["singular"], verbs=VERBS, shortnames=info.get("shortnames", set()),
            subresources=info.get("subresources", set()))
    async with emulator, kmock.Server(emulator) as server:
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": str(server.url).rstrip("/")}}],
            "users": [{"name": "tester", "user": {"token": "not-a-secret"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator",
                                                          "user": "tester"}}],
        }))
        yield emulator


@contextlib.asynccontextmanager
async def running_operator(*, standalone: bool = True, priority: int = 0,
                           peering_name: str = "atlas-operator",
                           namespaces: list[str] | None = None) -> AsyncIterator[asyncio.Task]:
    """The real operator: kopf's runner with our handlers, in this event loop."""
    import kopf

    from atlas_operator import handlers

    handlers.reset_client()
    handlers.scan_cluster = not namespaces  # as main.py does for --namespace
    before = asyncio.all_tasks()
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(kopf.operator(
        # kopf makes peering mandatory whenever a peering name is given, even standalone.
        clusterwide=not namespaces, namespaces=namespaces or (), standalone=standalone,
        priority=priority,
        peering_name=None if standalone else peering_name,
        stop_flag=stop, ready_flag=ready))
    await asyncio.wait_for(ready.wait(), timeout=15)
    try:
        yield task
    finally:
        stop.set()
        # kopf exits gracefully within seconds; a peering farewell that the emulator leaves
        # unanswered holds it for one request timeout (the peering test shortens it).
        with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
            await asyncio.wait_for(task, timeout=15)
        await _finish_orphans(before)


async def _finish_orphans(before: set[asyncio.Task]) -> None:
    """Cancel, until they end, the kopf tasks that outlived the operator.

    kopf returns while a timer whose sync handler still runs in its thread pool is only
    cancelling ("did not exit in time, leaving it orphaned"): its cancellation waits for
    the thread. Left to the test's event loop to close, it can wait forever (the handler
    talking to an emulator that is gone); here the emulator is still live, so the
    handler's call returns and the next cancellation takes."""
    orphans = {task for task in asyncio.all_tasks() - before
               if "/kopf/" in getattr(getattr(task.get_coro(), "cr_code", None), "co_filename", "")}
    deadline = asyncio.get_running_loop().time() + 30
    while orphans and asyncio.get_running_loop().time() < deadline:
        for task in orphans:
            task.cancel()
        _, orphans = await asyncio.wait(orphans, timeout=2)
    assert not orphans, f"kopf tasks still running after the operator stopped: {orphans}"


async def eventually(check: Callable[[], Any], timeout: float = 10.0,
                     message: str = "condition") -> Any:
    """Poll `check` until it returns something truthy (and return it) or fail."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            result = check()
        except (KeyError, TypeError, IndexError):
            result = None
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(0.05)
