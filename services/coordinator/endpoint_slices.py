"""The workers Kubernetes lists, folded from the worker Service's EndpointSlices
(discovery.k8s.io/v1). Pure: no I/O, no framework; the watcher (kubernetes_watch.py) feeds it.

A pod's readiness is the endpoint's `serving` condition, not `ready`: the worker Service publishes
not-ready addresses (so a pod's DNS name resolves before it is ready), and for such a Service the
EndpointSlice controller reports every endpoint `ready`. What each endpoint becomes:

  serving, not terminating   -> active (on the ring)
  terminating                -> draining (off the ring, still a KV source until its pod is gone:
                                its /ready fails as soon as it drains, yet it serves KV pulls for
                                the rest of its drain, so `serving` is no test of it)
  not serving, not terminating (starting, crashed, failing its probe), or absent -> not listed

A Service's endpoints may be split over several slices, and one pod may sit in two of them for a
moment while the controller moves it (or in one slice per address family): a pod listed twice is
draining if any slice says it terminates (termination never reverses), else active.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

EndpointState = Literal["active", "draining"]
AddressMode = Literal["dns", "ip"]
Doc = Mapping[str, Any]

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


class WatchError(RuntimeError):
    """The watch must start again from a fresh list (an ERROR event: 410 Gone, or any other)."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Endpoint:
    address: str
    state: EndpointState


@dataclass(frozen=True)
class AddressForm:
    """How a listed pod's address is written. `dns`: the pod's name through the headless Service
    (http://worker-0.worker.NS.svc.cluster.local:8082, what workers advertise themselves); `ip`:
    the endpoint's first address. The port is the slice's port named `port_name`."""
    service: str
    namespace: str
    port_name: str = "http"
    mode: AddressMode = "dns"
    cluster_domain: str = "cluster.local"

    def address(self, endpoint: Doc, port: int) -> str | None:
        if self.mode == "dns":
            host = endpoint.get("hostname") or endpoint["targetRef"]["name"]
            return f"http://{host}.{self.service}.{self.namespace}.svc.{self.cluster_domain}:{port}"
        addresses = endpoint.get("addresses") or []
        if not addresses:
            return None
        host = addresses[0]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def endpoint_state(conditions: Doc | None) -> EndpointState | None:
    """None: not listed. Nil conditions read as the API documents: ready and serving true,
    terminating false; a controller that leaves `serving` nil means `ready`."""
    conditions = conditions or {}
    ready = conditions.get("ready")
    serving = conditions.get("serving")
    serving = (ready is not False) if serving is None else serving
    if conditions.get("terminating"):
        return "draining"
    return "active" if serving else None


def fold_slice(slice_doc: Doc, form: AddressForm) -> dict[str, Endpoint]:
    """One EndpointSlice's pods: {pod name: Endpoint}. Endpoints that are not pods, and slices
    without the named port, list nothing."""
    ports = [p for p in slice_doc.get("ports") or [] if p.get("name", "") == form.port_name]
    if not ports or ports[0].get("port") is None:
        return {}
    port = int(ports[0]["port"])
    pods: dict[str, Endpoint] = {}
    for endpoint in slice_doc.get("endpoints") or []:
        ref = endpoint.get("targetRef") or {}
        if ref.get("kind") != "Pod" or not ref.get("name"):
            continue
        state = endpoint_state(endpoint.get("conditions"))
        address = form.address(endpoint, port) if state else None
        if state and address:
            pods[ref["name"]] = _stronger(pods.get(ref["name"]), Endpoint(address, state))
    return pods


def _stronger(old: Endpoint | None, new: Endpoint) -> Endpoint:
    if old is None or (new.state == "draining" and old.state == "active"):
        return new
    return old


class SliceSet:
    """The Service's slices as last seen, by slice name; `resource_version` is where a watch
    resumes. list() replaces everything; apply() takes one watch event."""

    def __init__(self, form: AddressForm):
        self.form = form
        self.resource_version = ""
        self._slices: dict[str, dict[str, Endpoint]] = {}

    def list(self, slice_list: Doc) -> None:
        """An EndpointSliceList (a LIST answer): the slices now, and the version to watch from."""
        self._slices = {item["metadata"]["name"]: fold_slice(item, self.form)
                        for item in slice_list.get("items") or []}
        self.resource_version = slice_list["metadata"]["resourceVersion"]

    def apply(self, event: Doc) -> bool:
        """One watch event; returns whether the listed pods may have changed. Raises WatchError
        for an ERROR event (its object is a Status: 410 when the version is too old)."""
        kind, obj = event["type"], event["object"]
        if kind == "ERROR":
            raise WatchError(f"watch error: {obj.get('reason')}: {obj.get('message')}", obj.get("code"))
        self.resource_version = obj["metadata"]["resourceVersion"]
        if kind == "BOOKMARK":
            return False
        name = obj["metadata"]["name"]
        if kind == "DELETED":
            return self._slices.pop(name, None) is not None
        if kind not in ("ADDED", "MODIFIED"):
            raise WatchError(f"unknown watch event type {kind!r}")
        pods = fold_slice(obj, self.form)
        changed = self._slices.get(name) != pods
        self._slices[name] = pods
        return changed

    def desired(self) -> dict[str, Endpoint]:
        """{worker id (pod name): Endpoint} over every slice."""
        merged: dict[str, Endpoint] = {}
        for pods in self._slices.values():
            for name, endpoint in pods.items():
                merged[name] = _stronger(merged.get(name), endpoint)
        return merged


def label_selector(service: str) -> str:
    return f"{SERVICE_NAME_LABEL}={service}"

