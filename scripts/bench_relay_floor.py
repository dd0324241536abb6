#!/usr/bin/env python3
"""The floor under scenario 10's routing tax on this machine: what the least a relay can do costs,
measured in the same rounds as the gateway. Four paths to one worker, in rounds (each first in
turn, the same idle gap before each request as scenario 10):

  gateway  the project's gateway (placement, exactly-once turn id, limits, metrics, SSE relay)
  direct   straight to the worker (the baseline every tax is taken against)
  raw      a raw TCP relay on uvloop: bytes copied both ways, no HTTP at all
  asgi     the least an ASGI gateway on the project's libraries can do: uvicorn (httptools,
           uvloop) and one aiohttp ClientSession, the body posted to the worker and its response
           relayed chunk by chunk, no validation, no placement, no middleware

Each tax is the median of the per-round differences (path minus direct), as scenario 10's.

    PYTHONPATH=. .venv/bin/python scripts/bench_relay_floor.py --rounds 200
"""

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_elastic import percentile  # noqa: E402
from bench_routing import TAX_GAP_S, TAX_MODEL, _env, _timed, ring_of, same_owner  # noqa: E402
from services.common.body_limit import read_body  # noqa: E402
from services.localcluster import LocalCluster, answers_200, free_port  # noqa: E402
from services.worker.model.presets import resolve_model_path  # noqa: E402

WARMUP = 20


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
    finally:
        writer.close()


async def serve_raw(port: int, target_port: int) -> None:
    async def relay(client_reader, client_writer):
        reader, writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(_pipe(client_reader, writer), _pipe(reader, client_writer), return_exceptions=True)

    server = await asyncio.start_server(relay, "127.0.0.1", port)
    await server.serve_forever()


def asgi_relay(target: str, token: str):
    import aiohttp
    session: list[aiohttp.ClientSession] = []

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            await receive()
            session.append(aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}))
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await session[0].close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        body, _ = await read_body(receive)
        if scope["method"] != "POST":  # the readiness probe
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        async with session[0].post(target + scope["path"], data=body,
                                   headers={"Content-Type": "application/json"}) as response:
            await send({"type": "http.response.start", "status": response.status,
                        "headers": [(b"content-type", response.content_type.encode())]})
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    return app


def serve(kind: str, port: int, target_port: int, token: str) -> None:
    import uvloop
    if kind == "raw":
        uvloop.run(serve_raw(port, target_port))
        return
    import uvicorn
    uvicorn.run(asgi_relay(f"http://127.0.0.1:{target_port}", token), host="127.0.0.1", port=port,
                loop="uvloop", http="httptools", log_level="warning", access_log=False)


def start_relay(kind: str, target_port: int, token: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, str(port), str(target_port), token])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not answers_200(url + "/health"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the {kind} relay did not start")
        time.sleep(0.1)
    return proc, url


def measure(rounds: int, model_cache_dir: Path, log_dir: Path) -> dict[str, list[float]]:
    resolve_model_path(TAX_MODEL, model_cache_dir)
    with LocalCluster(num_workers=2, log_dir=log_dir, worker_env=_env(model_cache_dir, TAX_MODEL)) as cluster:
        ring = ring_of(cluster)
        worker = cluster.worker_names[0]  # the relays all go to this one
        relays = [start_relay(kind, cluster.worker_ports[0], cluster.internal_token) for kind in ("raw", "asgi")]
        paths = [("gateway", cluster.gateway_url), ("direct", cluster.worker_urls[0]),
                 ("raw", relays[0][1]), ("asgi", relays[1][1])]
        times: dict[str, list[float]] = {name: [] for name, _ in paths}
        try:
            with httpx.Client(timeout=60, headers=cluster.internal_headers) as client:
                done = 0
                while done < WARMUP + rounds:
                    seq, owner = same_owner(ring, [name for name, _ in paths], "floor")
                    if owner != worker:
                        continue
                    turn = done % len(paths)
                    for name, url in paths[turn:] + paths[:turn]:  # each first in turn
                        time.sleep(TAX_GAP_S)
                        elapsed = _timed(client, url, f"{seq}-{name}")
                        if done >= WARMUP:
                            times[name].append(elapsed)
                    done += 1
        finally:
            for proc, _ in relays:
                proc.terminate()
                proc.wait(timeout=10)
    return times


def report(times: dict[str, list[float]]) -> str:
    direct = times["direct"]
    lines = [f"{len(direct)} rounds; request p50 direct {statistics.median(direct) * 1000:.2f} ms"]
    for name in ("raw", "asgi", "gateway"):
        tax = percentile([a - b for a, b in zip(times[name], direct)], 50)
        lines.append(f"  {name:8s} tax p50 {tax * 1000:.2f} ms (request p50 {statistics.median(times[name]) * 1000:.2f} ms)")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        kind, port, target_port, token = sys.argv[2:6]
        serve(kind, int(port), int(target_port), token)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--runs", type=int, default=1, help="clusters, one after the other")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "relay-floor")
    parser.add_argument("--model-cache-dir", type=Path, default=Path.home() / ".cache" / "kvcache" / "models")
    args = parser.parse_args()
    for run in range(args.runs):
        print(f"run {run + 1}: " + report(measure(args.rounds, args.model_cache_dir, args.out / f"run{run}" / "logs")),
              flush=True)


if __name__ == "__main__":
    main()
