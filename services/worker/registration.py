"""Keeps this worker registered with the coordinator: register, heartbeat, re-register on 404."""

import asyncio
import logging

import httpx

logger = logging.getLogger(__name__)


class Registration:
    def __init__(self, client: httpx.AsyncClient, coordinator_url: str, worker_id: str,
                 address: str, model_name: str, interval_s: float):
        self.client = client
        self.base = coordinator_url.rstrip("/")
        self.body = {"worker_id": worker_id, "address": address, "model_name": model_name}
        self.interval_s = interval_s
        self.registered = False

    async def run(self) -> None:
        while True:
            try:
                await self._beat()
            except httpx.HTTPError as exc:
                if self.registered:
                    logger.warning("coordinator unreachable: %s", exc)
                self.registered = False
            await asyncio.sleep(self.interval_s)

    async def _beat(self) -> None:
        if self.registered:
            resp = await self.client.post(f"{self.base}/heartbeat", json={"worker_id": self.body["worker_id"]})
            if resp.status_code != 404:
                resp.raise_for_status()
                return
            logger.info("coordinator does not know this worker (restarted?): registering again")
        resp = await self.client.post(f"{self.base}/register", json=self.body)
        resp.raise_for_status()
        self.registered = True
        logger.info("registered with %s as %s at %s", self.base, self.body["worker_id"], self.body["address"])

    async def deregister(self) -> None:
        try:
            await self.client.post(f"{self.base}/deregister", json={"worker_id": self.body["worker_id"]},
                                   timeout=2.0)
        except httpx.HTTPError as exc:
            logger.warning("deregister failed: %s", exc)
