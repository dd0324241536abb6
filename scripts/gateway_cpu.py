#!/usr/bin/env python3
"""The gateway's CPU per relayed request: scenario 10's request (tiny-gpt2, prompt "hi there",
max_tokens 1, streamed, a new seq_id each) sent one at a time through a gateway in front of a local
2-worker cluster, and the gateway process's CPU time (user + system, /proc/<pid>/stat) read before
and after each block of requests. The gateway's idle CPU (its ring poll, its loop-stall monitor),
measured first, is subtracted per second of the block.

Latency on a shared 2-core VM moves with whatever else runs; CPU per request moves much less. To
compare two gateways (two trees, or one tree with other settings), give several --gateway: each
runs as its own process in front of the same workers, and blocks alternate between them (A B B A
...), so that the machine's drift hits all alike.

    PYTHONPATH=. .venv/bin/python scripts/gateway_cpu.py                          # this tree, 6 blocks of 500
    PYTHONPATH=. .venv/bin/python scripts/gateway_cpu.py --gateway main=/work/main --gateway new=.
    PYTHONPATH=. .venv/bin/python scripts/gateway_cpu.py --gateway log=. --gateway quiet=. \\
        --gateway-env quiet:GATEWAY_LOG_LEVEL=warning
    PYTHONPATH=. .venv/bin/python scripts/gateway_cpu.py --py-spy gateway.svg     # and a flame graph

With --py-spy, py-spy (from PATH or the venv) records the first gateway during one more block (its
sampling costs the gateway CPU: that block's figure is not reported).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_elastic import turn  # noqa: E402
from bench_routing import TAX_MODEL, _env  # noqa: E402
from services.localcluster import LocalCluster, answers_200, free_port  # noqa: E402
from services.worker.model.presets import resolve_model_path  # noqa: E402

CLOCK_TICKS_S = os.sysconf("SC_CLK_TCK")
IDLE_S = 3.0


@dataclass
class Gateway:
    label: str
    tree: Path
    env: dict[str, str]
    port: int = 0
    proc: subprocess.Popen | None = None
    idle_cpu_per_s: float = 0.0
    blocks: list[dict] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def cpu_s(pid: int) -> tuple[float, float]:
    """The process's user and system CPU time so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLOCK_TICKS_S, int(fields[12]) / CLOCK_TICKS_S  # utime, stime (fields 14, 15)


def send(client: httpx.Client, url: str, num_requests: int) -> None:
    for _ in range(num_requests):
        result = turn(url, client=client, prompt="hi there", seq_id=f"cpu-{uuid.uuid4().hex[:12]}",
                      max_tokens=1, temperature=0)
        if not result["ok"]:
            raise RuntimeError(result["error"])


def measured_block(client: httpx.Client, gateway: Gateway, num_requests: int) -> dict:
    pid = gateway.proc.pid
    (user0, sys0), t0 = cpu_s(pid), time.perf_counter()
    send(client, gateway.url, num_requests)
    (user1, sys1), t1 = cpu_s(pid), time.perf_counter()
    busy_s = user1 - user0 + sys1 - sys0 - gateway.idle_cpu_per_s * (t1 - t0)
    return {"cpu_us_per_request": busy_s / num_requests * 1e6,
            "system_share": (sys1 - sys0) / max(user1 - user0 + sys1 - sys0, 1e-9),
            "wall_ms_per_request": (t1 - t0) / num_requests * 1e3}


def idle_rate(pid: int) -> float:
    cpu0 = sum(cpu_s(pid))
    time.sleep(IDLE_S)
    return (sum(cpu_s(pid)) - cpu0) / IDLE_S


def start_gateway(cluster: LocalCluster, gateway: Gateway, log_dir: Path) -> None:
    """The gateway of `gateway.tree` (its own `services`), in front of the cluster's workers."""
    gateway.port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(gateway.tree.resolve()),
           "GATEWAY_PORT": str(gateway.port), "GATEWAY_COORDINATOR_URL": cluster.coordinator_url,
           "GATEWAY_INTERNAL_TOKEN": cluster.internal_token, **gateway.env}
    with open(log_dir / f"gateway-{gateway.label}.log", "a") as log:
        gateway.proc = subprocess.Popen([sys.executable, "-m", "services.gateway"], cwd=gateway.tree, env=env,
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while not answers_200(f"{gateway.url}/health"):
        if gateway.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"gateway {gateway.label} did not start (see {log_dir})")
        time.sleep(0.2)


def profile_block(client: httpx.Client, gateway: Gateway, num_requests: int, out: Path) -> None:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    fmt = {".json": "speedscope", ".txt": "raw"}.get(out.suffix, "flamegraph")
    recorder = subprocess.Popen([py_spy, "record", "--pid", str(gateway.proc.pid), "--rate", "250", "--format", fmt,
                                 "--output", str(out), "--nonblocking"])
    time.sleep(1.0)  # py-spy attaches
    try:
        send(client, gateway.url, num_requests)
    finally:
        recorder.send_signal(2)  # SIGINT: py-spy writes its file and exits
        recorder.wait(timeout=60)


def gateways_of(args: argparse.Namespace) -> list[Gateway]:
    specs = args.gateway or [f"this={ROOT}"]
    gateways = [Gateway(label, Path(tree), {}) for label, tree in (spec.split("=", 1) for spec in specs)]
    by_label = {g.label: g for g in gateways}
    for item in args.gateway_env:
        label, assignment = item.split(":", 1)
        name, value = assignment.split("=", 1)
        by_label[label].env[name] = value
    return gateways


def run(args: argparse.Namespace, gateways: list[Gateway]) -> None:
    log_dir = args.out / "logs"
    with LocalCluster(num_workers=2, log_dir=log_dir, worker_env=_env(args.model_cache_dir, TAX_MODEL),
                      start_gateway=False) as cluster, httpx.Client(timeout=60) as client:
        try:
            for gateway in gateways:
                start_gateway(cluster, gateway, log_dir)
                send(client, gateway.url, args.warmup)
            for gateway in gateways:
                gateway.idle_cpu_per_s = idle_rate(gateway.proc.pid)
            for block in range(args.blocks):
                order = gateways if block % 2 == 0 else gateways[::-1]  # A B, B A, ...
                for gateway in order:
                    gateway.blocks.append(measured_block(client, gateway, args.requests))
            if args.py_spy is not None:
                profile_block(client, gateways[0], args.requests, args.py_spy)
        finally:
            for gateway in gateways:
                if gateway.proc is not None:
                    gateway.proc.terminate()
                    gateway.proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", action="append", default=[], metavar="LABEL=TREE",
                        help="a gateway to measure: a label and the tree it runs from (repeatable; default this tree)")
    parser.add_argument("--gateway-env", action="append", default=[], metavar="LABEL:NAME=VALUE",
                        help="an environment variable of one gateway (repeatable), e.g. b:GATEWAY_LOG_LEVEL=warning")
    parser.add_argument("--requests", type=int, default=500, help="requests per block")
    parser.add_argument("--blocks", type=int, default=6, help="measured blocks per gateway")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--py-spy", type=Path, default=None,
                        help="also record a profile to this file (.svg flame graph, .json speedscope, .txt raw)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "gateway-cpu")
    parser.add_argument("--model-cache-dir", type=Path, default=Path.home() / ".cache" / "kvcache" / "models")
    args = parser.parse_args()
    resolve_model_path(TAX_MODEL, args.model_cache_dir)
    gateways = gateways_of(args)
    run(args, gateways)
    results = {g.label: {"tree": str(g.tree), "env": g.env, "idle_cpu_per_s": g.idle_cpu_per_s, "blocks": g.blocks}
               for g in gateways}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    for g in gateways:
        cpu = [b["cpu_us_per_request"] for b in g.blocks]
        system = statistics.median(b["system_share"] for b in g.blocks)
        print(f"{g.label}: gateway CPU per relayed request min {min(cpu):.0f} / median {statistics.median(cpu):.0f} / "
              f"max {max(cpu):.0f} us ({len(cpu)} blocks of {args.requests}; {system:.0%} system; "
              f"idle {g.idle_cpu_per_s * 1e3:.1f} ms/s subtracted)")


if __name__ == "__main__":
    main()
