"""A Kubernetes API server's list/watch protocol for one namespace's EndpointSlices, as a raw ASGI
app for tests/loopback.py: LIST answers an EndpointSliceList at the current resourceVersion; a
watch from a version replays the kept events after it, then streams new ones a JSON line each,
until end_watches(); a watch from a version older than what is kept gets an ERROR event with
410 Gone (as the real server does after its watch cache moved on). Not a real API server: no
field or label selection beyond checking the Service's label, no timeoutSeconds of its own.
"""

import asyncio
import json
from urllib.parse import parse_qsl

from tests.endpoint_slice_docs import NAMESPACE, SERVICE, bookmark, endpoint_slice, event, gone, slice_list


class FakeKubeApi:
    def __init__(self, namespace: str = NAMESPACE) -> None:
        self.path = f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
        self.version = 100
        self.slices: dict[str, dict] = {}
        self.history: list[tuple[int, dict]] = []  # (resourceVersion, event)
        self.oldest = 0  # a watch from a version below this gets 410 Gone
        self.requests: list[tuple[str, dict[str, str], str]] = []  # (list|watch, query, Authorization)
        self.fail_lists: list[int] = []    # statuses the next LISTs answer with
        self.fail_watches: list[int] = []  # statuses the next watches answer with
        self._streams: set[asyncio.Queue] = set()

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    def kinds(self) -> list[str]:
        return [kind for kind, _, _ in self.requests]

    def put(self, name: str, endpoints: list[dict]) -> None:
        self.version += 1
        doc = endpoint_slice(name, endpoints, str(self.version))
        self._publish(event("MODIFIED" if name in self.slices else "ADDED", doc))
        self.slices[name] = doc

    def delete(self, name: str) -> None:
        self.version += 1
        doc = self.slices.pop(name)
        doc = doc | {"metadata": doc["metadata"] | {"resourceVersion": str(self.version)}}
        self._publish(event("DELETED", doc))

    def bookmark(self) -> None:
        self.version += 1
        for queue in self._streams:
            queue.put_nowait(bookmark(str(self.version)))

    def compact(self) -> None:
        """Forgets the events so far: watches from before now get 410."""
        self.history.clear()
        self.oldest = self.version

    def end_watches(self) -> None:
        for queue in self._streams:
            queue.put_nowait(None)

    def _publish(self, ev: dict) -> None:
        self.history.append((self.version, ev))
        for queue in self._streams:
            queue.put_nowait(ev)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        query = dict(parse_qsl(scope["query_string"].decode()))
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        watching = query.get("watch") in ("1", "true")
        self.requests.append(("watch" if watching else "list", query, headers.get("authorization", "")))
        failures = self.fail_watches if watching else self.fail_lists
        if scope["path"] != self.path or query.get("labelSelector") != f"kubernetes.io/service-name={SERVICE}":
            await _json(send, 404, _status(404, "NotFound", "no such path or selector"))
        elif failures:
            code = failures.pop(0)
            await _json(send, code, _status(code, "Expired" if code == 410 else "Forbidden", f"failing with {code}"))
        elif not watching:
            await _json(send, 200, slice_list(list(self.slices.values()), str(self.version)))
        else:
            await self._watch(int(query["resourceVersion"]), send)

    async def _watch(self, since: int, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        if since < self.oldest:
            await _line(send, gone(str(since), str(self.version)))
            await send({"type": "http.response.body", "body": b""})
            return
        queue: asyncio.Queue = asyncio.Queue()
        self._streams.add(queue)
        for version, ev in self.history:  # no await before: nothing is published in between
            if version > since:
                queue.put_nowait(ev)
        try:
            while (ev := await queue.get()) is not None:
                await _line(send, ev)
            await send({"type": "http.response.body", "body": b""})
        finally:
            self._streams.discard(queue)


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


async def _json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


async def _line(send, ev: dict) -> None:
    await send({"type": "http.response.body", "body": json.dumps(ev).encode() + b"\n", "more_body": True})
