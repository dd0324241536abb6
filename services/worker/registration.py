"""Keeps this worker registered with the coordinator: register, heartbeat, re-register on 404,
and the drain/deregister calls of a graceful exit."""

import asyncio
import logging
from collections.abc import Callable

import httpx

logger = logging.getLogger(__name__)


class Registration:
    def __init__(self, client: httpx.AsyncClient, coordinator_url: str, worker_id: str,
                 address: str, model_name: str, interval_s: float, headers: dict[str, str],
                 load: Callable[[], int] = lambda: 0):
        self.client = client
        self.base = coordinator_url.rstrip("/")
        self.body = {"worker_id": worker_id, "address": address, "model_name": model_name,
                     "draining": False}
        self.interval_s = interval_s
        self.headers = headers  # the bearer token, when one is configured
        self.load = load  # requests in progress, reported on each heartbeat
        self.registered = False
        self.stopped = False  # deregistered: no more heartbeats

    def describe_model(self, served_model_names: list[str], max_model_len: int) -> None:
        """What the gateway's /v1/models lists (known once the model is loaded, before run)."""
        self.body |= {"served_model_names": served_model_names, "max_model_len": max_model_len}

    async def run(self) -> None:
        while not self.stopped:
            try:
                await self._beat()
            except httpx.HTTPError as exc:
                if self.registered:
                    logger.warning("coordinator unreachable: %s %s", type(exc).__name__, exc)  # a timeout says nothing itself
                self.registered = False
            await asyncio.sleep(self.interval_s)

    async def _beat(self) -> None:
        if self.registered:
            resp = await self._post("/heartbeat", {"worker_id": self.body["worker_id"], "load": self.load()})
            if resp.status_code != 404:
                resp.raise_for_status()
                return
            logger.info("coordinator does not know this worker (restarted?): registering again")
        resp = await self._post("/register", self.body)
        resp.raise_for_status()
        self.registered = True
        logger.info("registered with %s as %s at %s", self.base, self.body["worker_id"], self.body["address"])

    async def drain(self) -> int | None:
        """Leave the ring now, stay listed as a KV source. Returns the number of workers left on
        the ring (None if the coordinator could not be told)."""
        self.body["draining"] = True  # a re-registration keeps it off the ring
        try:
            resp = await self._post("/drain", {"worker_id": self.body["worker_id"]})
            resp.raise_for_status()
            return int(resp.json().get("active_workers", 0))
        except (httpx.HTTPError, ValueError) as exc:
            logger.warning("could not tell the coordinator that this worker drains: %s", exc)
            return None

    async def deregister(self) -> None:
        self.stopped = True
        try:
            await self._post("/deregister", {"worker_id": self.body["worker_id"]}, timeout=2.0)
        except httpx.HTTPError as exc:
            logger.warning("deregister failed: %s", exc)

    async def _post(self, path: str, body: dict, timeout: float | None = None) -> httpx.Response:
        kwargs = {"timeout": timeout} if timeout else {}
        return await self.client.post(self.base + path, json=body, headers=self.headers, **kwargs)
