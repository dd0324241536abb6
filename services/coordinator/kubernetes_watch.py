"""Lists, then watches, the worker Service's EndpointSlices, and hands the workers they list to the
membership (COORDINATOR_MEMBERSHIP=kubernetes). Runs as a lifespan task of the coordinator.

The Kubernetes list/watch protocol: a LIST gives the slices and a resourceVersion; a watch from
that version streams one JSON event a line (ADDED, MODIFIED, DELETED, BOOKMARK with a newer
version, ERROR with a Status) until the server ends it after timeoutSeconds, when the watch
resumes from the last version. A version the server no longer keeps gets 410 Gone (as the
response, or as an ERROR event): list again. Anything else that fails (the API server
unreachable, 401/403) is retried after a growing pause, resuming from the last version.

Folding an event is microseconds; a list's JSON is parsed in a thread (a thousand workers'
slices are about half a megabyte).
"""

import asyncio
import json
import logging
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from services.common.http import make_client
from services.coordinator.endpoint_slices import AddressForm, Endpoint, SliceSet, WatchError, label_selector
from services.coordinator.settings import CoordinatorSettings

log = logging.getLogger(__name__)

OnListed = Callable[[Mapping[str, Endpoint]], None]
RESTART_REASONS = ("expired", "error", "failed")  # metrics.WATCH_RESTART_REASONS
MIN_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0


class ApiError(RuntimeError):
    """The API server answered with an error status (its Status message is kept)."""


class EndpointSliceWatcher:
    def __init__(self, client: httpx.AsyncClient, api_url: str, form: AddressForm, on_listed: OnListed, *,
                 token_file: Path | None = None, watch_timeout_s: int = 300,
                 min_backoff_s: float = MIN_BACKOFF_S, max_backoff_s: float = MAX_BACKOFF_S,
                 on_restart: Callable[[str], None] = lambda _reason: None):
        """`on_listed` gets {worker id: Endpoint} after the list and after every event that changed
        it; `on_restart` a reason of RESTART_REASONS each time the watch starts over."""
        self.slices = SliceSet(form)
        self.client = client
        self._url = f"{api_url.rstrip('/')}/apis/discovery.k8s.io/v1/namespaces/{form.namespace}/endpointslices"
        self._selector = label_selector(form.service)
        self._on_listed = on_listed
        self._on_restart = on_restart
        self._token_file = token_file
        self.watch_timeout_s = watch_timeout_s
        self.min_backoff_s, self.max_backoff_s = min_backoff_s, max_backoff_s

    async def run(self) -> None:
        delay, listed = self.min_backoff_s, False
        while True:
            try:
                if not listed:
                    await self._list()
                    listed = True
                if await self._watch():
                    delay = self.min_backoff_s
                    continue  # the server ended the watch: resume at once
                # It ended without a line: pause, so a server that ends watches at once is not spun on.
            except WatchError as exc:
                listed = False
                self._on_restart("expired" if exc.code == 410 else "error")
                log.info("EndpointSlice watch starts over: %s", exc)
                if exc.code == 410:
                    continue
            except (httpx.HTTPError, ApiError, ValueError, KeyError, TypeError) as exc:
                self._on_restart("failed")
                log.warning("EndpointSlice list/watch failed (retrying in %.1f s): %r", delay, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_backoff_s)

    async def _list(self) -> None:
        resp = await self.client.get(self._url, params={"labelSelector": self._selector}, headers=self._headers())
        _check(resp)
        self.slices.list(await asyncio.to_thread(json.loads, resp.content))
        log.info("EndpointSlices listed at version %s: %d workers", self.slices.resource_version,
                 len(self.slices.desired()))
        self._on_listed(self.slices.desired())

    async def _watch(self) -> int:
        """Streams events until the server ends the watch; returns how many came."""
        params = {"labelSelector": self._selector, "watch": "1", "allowWatchBookmarks": "true",
                  "resourceVersion": self.slices.resource_version, "timeoutSeconds": str(self.watch_timeout_s)}
        # A quiet watch sends nothing for up to timeoutSeconds (bookmarks are not promised sooner).
        timeout = httpx.Timeout(10.0, read=self.watch_timeout_s + 30.0)
        num_events = 0
        async with self.client.stream("GET", self._url, params=params, headers=self._headers(),
                                       timeout=timeout) as resp:
            if resp.status_code != 200:
                await resp.aread()
                _check(resp)
            async for line in resp.aiter_lines():
                if not line.strip():
                    continue
                num_events += 1
                if self.slices.apply(json.loads(line)):
                    self._on_listed(self.slices.desired())
        return num_events

    def _headers(self) -> dict[str, str]:
        """Read at every request: the kubelet replaces the projected token before it expires."""
        if self._token_file is None or not self._token_file.exists():
            return {}
        return {"Authorization": f"Bearer {self._token_file.read_text().strip()}"}


def _check(resp: httpx.Response) -> None:
    if resp.status_code == 200:
        return
    try:
        status: Any = resp.json()
        message = status.get("message") if isinstance(status, dict) else None
    except ValueError:
        message = None
    if resp.status_code == 410:
        raise WatchError(f"410 Gone: {message}", 410)
    raise ApiError(f"{resp.request.method} {resp.request.url.path}: {resp.status_code} {message or resp.reason_phrase}")


def namespace_of(settings: CoordinatorSettings) -> str:
    """The workers' namespace: the setting, else this pod's own (its service-account files)."""
    if settings.k8s_namespace:
        return settings.k8s_namespace
    path = Path(settings.k8s_serviceaccount_dir) / "namespace"
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise SystemExit(f"COORDINATOR_MEMBERSHIP=kubernetes: set COORDINATOR_K8S_NAMESPACE, or run in a pod "
                         f"with its service-account token mounted ({path}: {exc.strerror})") from None


def make_kubernetes_client(settings: CoordinatorSettings) -> httpx.AsyncClient:
    """The coordinator's one HTTP client: it trusts the cluster's CA when the pod has it."""
    ca_file = Path(settings.k8s_serviceaccount_dir) / "ca.crt"
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca_file)) if ca_file.exists() else True
    return make_client(connect_timeout_s=5.0, read_timeout_s=30.0, max_connections=4, verify=verify)


def make_watcher(settings: CoordinatorSettings, on_listed: OnListed,
                 on_restart: Callable[[str], None]) -> EndpointSliceWatcher:
    """With its own client (the caller closes `watcher.client`)."""
    form = AddressForm(service=settings.k8s_service, namespace=namespace_of(settings),
                       port_name=settings.k8s_port_name, mode=settings.k8s_address,
                       cluster_domain=settings.k8s_cluster_domain)
    return EndpointSliceWatcher(make_kubernetes_client(settings), settings.k8s_api_url, form, on_listed,
                                token_file=Path(settings.k8s_serviceaccount_dir) / "token",
                                watch_timeout_s=settings.k8s_watch_timeout_s, on_restart=on_restart)
