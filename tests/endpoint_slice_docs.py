"""EndpointSlice documents (discovery.k8s.io/v1) as the API server sends them for the worker
Service of k8s/base/worker.yaml: a headless Service with publishNotReadyAddresses, whose
endpoints the EndpointSlice controller writes from the StatefulSet's pods."""

import hashlib

NAMESPACE = "kvcache"
SERVICE = "worker"
PORT = 8082


def _uid(name: str) -> str:
    h = hashlib.md5(name.encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def endpoint(pod: str, ip: str, *, serving: bool = True, terminating: bool = False,
             publish_not_ready: bool = True) -> dict:
    """As the controller writes it: `ready` is forced true when the Service publishes not-ready
    addresses; `serving` is the pod's Ready condition; `hostname` is set for StatefulSet pods."""
    ready = publish_not_ready or (serving and not terminating)
    return {
        "addresses": [ip],
        "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
        "hostname": pod,
        "targetRef": {"kind": "Pod", "namespace": NAMESPACE, "name": pod, "uid": _uid(pod)},
        "nodeName": "gke-kvcache-worker-pool-3f9a1c2e-x7kq",
        "zone": "us-central1-a",
    }


def endpoint_slice(name: str, endpoints: list[dict], resource_version: str, *,
                   address_type: str = "IPv4", port_name: str = "http") -> dict:
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name,
            "generateName": f"{SERVICE}-",
            "namespace": NAMESPACE,
            "uid": _uid(name),
            "resourceVersion": resource_version,
            "generation": 1,
            "creationTimestamp": "2026-12-01T10:00:00Z",
            "labels": {
                "app.kubernetes.io/name": "worker",
                "app.kubernetes.io/part-of": "kvcache",
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": SERVICE,
                "service.kubernetes.io/headless": "",
            },
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-12-01T10:00:00Z"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": SERVICE, "uid": _uid(SERVICE),
                                 "controller": True, "blockOwnerDeletion": True}],
        },
        "addressType": address_type,
        # The API server writes an empty list as null.
        "endpoints": endpoints or None,
        "ports": [{"name": port_name, "protocol": "TCP", "port": PORT}],
    }


def slice_list(slices: list[dict], resource_version: str) -> dict:
    """A LIST answer: its items carry no kind or apiVersion."""
    items = [{k: v for k, v in s.items() if k not in ("kind", "apiVersion")} for s in slices]
    return {"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"resourceVersion": resource_version}, "items": items}


def event(kind: str, obj: dict) -> dict:
    return {"type": kind, "object": obj}


def bookmark(resource_version: str) -> dict:
    """Only the resource version is meaningful in a bookmark's object."""
    return event("BOOKMARK", {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
                              "metadata": {"resourceVersion": resource_version}})


def gone(old_version: str, current_version: str) -> dict:
    """What the API server sends when a watch asks for a version it no longer keeps."""
    return event("ERROR", {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                           "message": f"too old resource version: {old_version} ({current_version})",
                           "reason": "Expired", "code": 410})


def dns_address(pod: str) -> str:
    """What a worker advertises itself as (WORKER_ADVERTISE_ADDRESS in k8s/base/worker.yaml)."""
    return f"http://{pod}.{SERVICE}.{NAMESPACE}.svc.cluster.local:{PORT}"
