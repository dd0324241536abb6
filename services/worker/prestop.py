"""Kubernetes preStop hook: `python -m services.worker.prestop`.

Asks the worker in this pod to drain (POST /internal/drain) and waits until it has drained or the
drain timeout has passed, so the SIGTERM that follows finds nothing left to do. Reads the
worker's own settings (WORKER_PORT, WORKER_INTERNAL_TOKEN, WORKER_DRAIN_TIMEOUT_S).
"""

import sys
import time

import httpx

from services.common.auth import bearer_headers
from services.worker.settings import WorkerSettings

GRACE_S = 5.0


def main() -> int:
    settings = WorkerSettings()
    base = f"http://127.0.0.1:{settings.port}/internal/drain"
    headers = bearer_headers(settings.internal_token)
    deadline = time.monotonic() + settings.drain_timeout_s + GRACE_S
    try:
        httpx.post(base, headers=headers, timeout=5).raise_for_status()
        while time.monotonic() < deadline:
            if httpx.get(base, headers=headers, timeout=5).json().get("drained"):
                return 0
            time.sleep(0.5)
    except httpx.HTTPError as exc:  # the worker is gone already (it exits once drained)
        print(f"prestop: {exc}", file=sys.stderr)
        return 0
    print("prestop: drain did not finish in time", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
