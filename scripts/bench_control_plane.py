"""Control-plane scale: the real coordinator and gateway processes, N simulated workers speaking the
real registration protocol (services/worker/registration.py's Registration: register, heartbeats
with load, drain), all on loopback. Prints a table and writes JSON.

    python scripts/bench_control_plane.py --workers 100 500 1000 2000 --churn-s 60

Per N: registration time (simultaneous start: every worker's first register at once; staggered:
spread over 5 s), change propagation to the gateway (join, drain; crash: from the victim's last
heartbeat plus the TTL, so it includes up to one 1 s sweep), CPU and peak RSS of each service, the
longest event-loop stall of each (their kvcache_*_event_loop_stall_max_seconds gauge), per-request
placement time (the gateway's own code, in this process, on the coordinator's state), and churn:
10% of workers drain and rejoin every 10 s, gateway lag p50/p99 (from the coordinator's answer to
a wave's last call to the gateway's epoch reaching it).
"""

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.schemas import RingState  # noqa: E402
from services.common.settings import SERVER_KEEP_ALIVE_S  # noqa: E402
from services.gateway.placement import Placer  # noqa: E402
from services.gateway.ring_view import RingView  # noqa: E402
from services.worker.registration import Registration  # noqa: E402

TOKEN = "bench-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
TTL_S = 10.0
HEARTBEAT_S = 2.0
# The simulated workers run in --sim-procs processes, each with one httpx client (one process's
# client tops out near 220 requests a second here: it was the registration storm's bottleneck).
# All of them share the machine's 2 cores with the services, so the heartbeat interval grows with
# N (1000 workers beating every 2 s would be 500 requests a second): the simulators, not the
# coordinator, would otherwise be what falls behind.
MAX_BEATS_PER_S = 200
CRASH_SAMPLES = 3  # the crash victims run in the bench's own process (it stops their heartbeats)

# The simulated workers' clients. Idle connections expire before the coordinator closes them, as a
# worker's client does (services/common/http.py): at the same 5 s, a heartbeat every 5 s raced the
# close (ReadError, then a re-registration).
SIM_LIMITS = httpx.Limits(max_connections=64, max_keepalive_connections=64, keepalive_expiry=SERVER_KEEP_ALIVE_S - 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(module: str, env: dict, log_path: Path | None = None) -> subprocess.Popen:
    """`log_path`: where its output goes (else nowhere)."""
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    try:
        return subprocess.Popen([sys.executable, "-m", module], cwd=ROOT, env=os.environ | env,
                                stdout=out, stderr=subprocess.STDOUT)
    finally:
        if log_path:
            out.close()


def proc_stats(pid: int) -> tuple[float, float]:
    """(CPU seconds so far, RSS MiB)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS"))
    return cpu_s, int(rss.split()[1]) / 1024


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


class Cluster:
    def __init__(self, ttl_s: float = TTL_S, stall_log_ms: float = 0.0, log_dir: Path | None = None) -> None:
        self.ttl_s = ttl_s
        self.stall_log_ms, self.log_dir = stall_log_ms, log_dir
        self.coord_url = self.gw_url = ""
        self.procs: list[subprocess.Popen] = []
        self.stalls: dict[str, float] = {}
        self.peak_rss = {"coordinator": 0.0, "gateway": 0.0}

    async def __aenter__(self) -> "Cluster":
        cport, gport = free_port(), free_port()
        self.coord_url, self.gw_url = f"http://127.0.0.1:{cport}", f"http://127.0.0.1:{gport}"
        logs = {name: self.log_dir / f"{name}.log" if self.log_dir else None for name in ("coordinator", "gateway")}
        self.procs.append(start("services.coordinator", {"COORDINATOR_PORT": str(cport),
                                                        "COORDINATOR_INTERNAL_TOKEN": TOKEN,
                                                        "COORDINATOR_TTL_S": str(self.ttl_s),
                                                        "COORDINATOR_LOOP_STALL_LOG_MS": str(self.stall_log_ms)},
                                logs["coordinator"]))
        self.procs.append(start("services.gateway", {"GATEWAY_PORT": str(gport), "GATEWAY_INTERNAL_TOKEN": TOKEN,
                                                    "GATEWAY_COORDINATOR_URL": self.coord_url,
                                                    "GATEWAY_LOOP_STALL_LOG_MS": str(self.stall_log_ms)},
                                logs["gateway"]))
        async with httpx.AsyncClient() as client:
            for url in (self.coord_url, self.gw_url):
                for _ in range(300):
                    try:
                        if (await client.get(url + "/health")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(0.1)
        return self

    async def __aexit__(self, *exc) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(10)

    def stats(self) -> dict:
        return {name: proc_stats(p.pid) for name, p in zip(("coordinator", "gateway"), self.procs)}

    async def watch_rss(self) -> None:
        while all(p.poll() is None for p in self.procs):
            for name, (_, rss) in self.stats().items():
                self.peak_rss[name] = max(self.peak_rss[name], rss)
            await asyncio.sleep(0.05)

    async def read_stalls(self, client: httpx.AsyncClient) -> None:
        for name, url in (("coordinator", self.coord_url), ("gateway", self.gw_url)):
            for kind in ("", "busy_"):
                self.stalls[kind + name] = await metric(client, url, f"kvcache_{name}_event_loop_{kind}stall_max_seconds")

    async def gateway_epoch(self, client: httpx.AsyncClient) -> tuple[int, int]:
        ring = (await client.get(self.gw_url + "/health")).json()["ring"]
        return ring["epoch"] or 0, ring["active_workers"]


def heartbeat_s(n: int) -> float:
    return max(HEARTBEAT_S, n / MAX_BEATS_PER_S)


def register_body(i: int) -> dict:
    return {"worker_id": f"sim-{i}", "address": f"http://10.{i // 62500}.{i // 250 % 250}.{i % 250}:8000",
            "model_name": "sim", "draining": False}


def worker(client: httpx.AsyncClient, coord_url: str, i: int, rng: random.Random, n: int = 1) -> Registration:
    body = register_body(i)
    return Registration(client, coord_url, body["worker_id"], body["address"], body["model_name"],
                        heartbeat_s(n), HEADERS, load=lambda: rng.randrange(4))


class Simulators:
    """Workers `first`..n-1 in `procs` processes (this script with --simulate): each builds its
    Registrations, says `ready`, starts them all on `go` and stops when its stdin closes."""

    def __init__(self, coord_url: str, first: int, n: int, procs: int, stagger_s: float, nice: int) -> None:
        bounds = [first + (n - first) * k // procs for k in range(procs + 1)]
        self.procs = [subprocess.Popen([sys.executable, __file__, "--simulate", coord_url, str(a), str(b), str(n),
                                        str(stagger_s)],
                                       cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                      for a, b in zip(bounds, bounds[1:]) if b > a]
        self.nice = nice
        for proc in self.procs:  # before it starts any thread (they inherit it)
            os.setpriority(os.PRIO_PROCESS, proc.pid, nice)
        for proc in self.procs:
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a simulator did not start")

    def go(self) -> None:
        for proc in self.procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()

    def stop(self) -> None:
        for proc in self.procs:
            proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


async def simulate(coord_url: str, first: str, end: str, n: str, stagger_s: str) -> None:
    rng = random.Random(int(first))
    async with httpx.AsyncClient(limits=SIM_LIMITS, timeout=30) as client:
        regs = [worker(client, coord_url, i, rng, int(n)) for i in range(int(first), int(end))]
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        tasks = []
        for reg in regs:
            tasks.append(asyncio.create_task(reg.run()))
            if float(stagger_s):
                await asyncio.sleep(float(stagger_s) / len(regs))
        await asyncio.to_thread(sys.stdin.read)  # until the bench closes it
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def wait_gateway(client: httpx.AsyncClient, cluster: Cluster, epoch: int, timeout_s: float = 60) -> float:
    """Seconds until the gateway's epoch reaches `epoch`."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if (await cluster.gateway_epoch(client))[0] >= epoch:
            return time.perf_counter() - t0
        await asyncio.sleep(0.005)
    return float("inf")


async def settle(client: httpx.AsyncClient, cluster: Cluster, n: int, timeout_s: float,
                 poll_s: float = 0.05) -> float:
    """Seconds until the gateway routes to `n` workers."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if (await cluster.gateway_epoch(client))[1] >= n:
            return time.perf_counter() - t0
        await asyncio.sleep(poll_s)
    return float("inf")


async def registered_all(client: httpx.AsyncClient, cluster: Cluster, n: int) -> float:
    """When the coordinator had all `n` registered (perf_counter). Read from its /metrics: the
    /workers listing costs the coordinator milliseconds a call at a thousand workers."""
    while await metric(client, cluster.coord_url, "kvcache_coordinator_registered_workers") < n:
        await asyncio.sleep(0.05)
    return time.perf_counter()


async def metric(client: httpx.AsyncClient, url: str, name: str) -> float:
    lines = (await client.get(url + "/metrics")).text.splitlines()
    return float(next(line for line in lines if line.startswith(name + " ")).split()[-1])


async def propagation(client, cluster, regs, rng, samples: int) -> dict:
    joins, drains = [], []
    for k in range(samples):
        reg = worker(client, cluster.coord_url, 100_000 + k, rng)
        t0 = time.perf_counter()
        active = (await cluster.gateway_epoch(client))[1]
        await client.post(cluster.coord_url + "/register", json=reg.body, headers=HEADERS)
        await settle(client, cluster, active + 1, timeout_s=60, poll_s=0.005)  # routable: points built
        joins.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        body = {"worker_id": reg.body["worker_id"]}
        epoch = (await client.post(cluster.coord_url + "/drain", json=body, headers=HEADERS)).json()["epoch"]
        await wait_gateway(client, cluster, epoch)
        drains.append(time.perf_counter() - t0)
        await client.post(cluster.coord_url + "/deregister", json=body, headers=HEADERS)
    return {"join_ms": [x * 1000 for x in joins], "drain_ms": [x * 1000 for x in drains]}


async def crash(client, cluster, tasks, regs, samples: int) -> list[float]:
    """Stops the heartbeats of `samples` workers, one at a time; each lag is from its last
    heartbeat plus the TTL to the gateway's epoch passing its expiry (the coordinator's epoch
    once the victim is gone from its list)."""
    lags = []
    for i in range(samples):
        regs[i].stopped = True
        tasks[i].cancel()
        await asyncio.sleep(1)  # a heartbeat already sent when it was cancelled lands first
        t0 = time.perf_counter()
        worker_id = regs[i].body["worker_id"]
        age = (await client.get(cluster.coord_url + "/workers")).json()[worker_id]["last_heartbeat_age_s"]
        await wait_gateway(client, cluster, await removal_epoch(client, cluster, worker_id))
        lags.append((time.perf_counter() - t0 - (cluster.ttl_s - age)) * 1000)
    return lags


async def removal_epoch(client, cluster, worker_id: str) -> int:
    """The coordinator's epoch once it has removed the worker, long-polling its /ring deltas as a
    gateway does (polling /workers, a thousand-worker listing every 20 ms, was most of the
    coordinator's work in this phase)."""
    state = (await client.get(cluster.coord_url + "/ring")).json()
    if worker_id not in {w["worker_id"] for w in state["workers"]}:
        return state["epoch"]
    while True:  # without load_after, load reports do not end a poll
        params = {"after": state["version"], "seq": state["next_seq"], "instance": state["instance"], "wait_s": 5}
        state = (await client.get(cluster.coord_url + "/ring", params=params)).json()
        if worker_id in state["removed"]:
            return state["epoch"]


async def expiries(client, cluster) -> float:
    """Workers the coordinator expired so far (a simulated worker whose heartbeats came late)."""
    text = (await client.get(cluster.coord_url + "/metrics")).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("kvcache_coordinator_ring_changes_total") and 'change="expire"' in line)


async def churn(client, cluster, n: int, rng, seconds: float) -> dict:
    """10% of the workers drain and rejoin every 10 s; lag: from the coordinator's answer to the
    last call of a wave to the gateway's epoch reaching it."""
    lags = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        wave = rng.sample(range(n), max(1, n // 10))
        answers = await asyncio.gather(*(client.post(cluster.coord_url + "/drain", headers=HEADERS,
                                                     json={"worker_id": f"sim-{i}"}) for i in wave))
        epoch = max(a.json()["epoch"] for a in answers if a.status_code == 200)
        lags.append(await wait_gateway(client, cluster, epoch) * 1000)
        answers = await asyncio.gather(*(client.post(cluster.coord_url + "/register", headers=HEADERS,
                                                     json=register_body(i)) for i in wave))
        epoch = max(a.json()["epoch"] for a in answers if a.status_code == 200)
        lags.append(await wait_gateway(client, cluster, epoch) * 1000)
        await asyncio.sleep(max(0.0, 10 - (time.perf_counter() % 10)))
    return {"lag_ms": lags}


async def noop(value):
    return value


async def placement_us(client, cluster) -> float:
    state = RingState.model_validate((await client.get(cluster.coord_url + "/ring")).json())
    view = await asyncio.to_thread(RingView.of, state)
    placer = Placer("affinity", 1.25)
    keys = [f"conv-{i}" for i in range(5000)]
    t0 = time.perf_counter()
    for key in keys:
        placer.place(view, key)
    return (time.perf_counter() - t0) / len(keys) * 1e6


async def run_n(n: int, args: argparse.Namespace, rng: random.Random) -> dict:
    # The crash victims share a client here; the bench's own calls and probes have their own, so
    # a queue of heartbeats never delays a measurement.
    log_dir = args.service_logs / f"n{n}" if args.service_logs else None
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    async with Cluster(max(TTL_S, 3 * heartbeat_s(n)), args.stall_log_ms, log_dir) as cluster, \
            httpx.AsyncClient(limits=SIM_LIMITS, timeout=30) as workers_client, httpx.AsyncClient(timeout=60) as client:
        cpu0 = cluster.stats()
        watcher = asyncio.create_task(cluster.watch_rss())
        regs = [worker(workers_client, cluster.coord_url, i, rng, n) for i in range(min(n, CRASH_SAMPLES))]
        sims = await asyncio.to_thread(Simulators, cluster.coord_url, len(regs), n, args.sim_procs,
                                     5.0 if args.staggered else 0.0, args.sim_nice)
        try:
            return await measure(n, args.churn_s, args.staggered, rng, cluster, client, regs, sims, cpu0, watcher)
        finally:
            sims.stop()


async def measure(n, churn_s, staggered, rng, cluster, client, regs, sims, cpu0, watcher) -> dict:
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(reg.run()) for reg in regs]
    sims.go()  # staggered: each simulator spreads its workers' starts over 5 s
    registered = asyncio.create_task(registered_all(client, cluster, n))
    settled = await settle(client, cluster, n, timeout_s=120)
    out_registered_s = (await registered) - t0
    out = {"workers": n, "heartbeat_s": heartbeat_s(n), "ttl_s": cluster.ttl_s, "settle_s": time.perf_counter() - t0 if settled != float("inf") else settled,
           "registered_s": out_registered_s, "sim_procs": len(sims.procs),
           "sim_nice": sims.nice}
    await asyncio.sleep(2)
    await cluster.read_stalls(client)  # the maxima so far: those of the registration storm
    out["storm_stall_ms"] = {k: v * 1000 for k, v in cluster.stalls.items()}
    phases = {"propagation": lambda: propagation(client, cluster, regs, rng, samples=10),
              "placement": lambda: placement_us(client, cluster),
              "churn": lambda: churn(client, cluster, n, rng, churn_s) if churn_s else noop({"lag_ms": []}),
              "expiries": lambda: expiries(client, cluster),
              "crash": lambda: crash(client, cluster, tasks, regs, samples=len(regs))}
    out["stall_ms_after"] = {}  # the maxima after each phase (JSON only): which one set them
    for phase, run in phases.items():
        result = await run()
        out |= result if isinstance(result, dict) else {phase: result}
        await cluster.read_stalls(client)
        out["stall_ms_after"][phase] = {k: round(v * 1000, 1) for k, v in cluster.stalls.items()}
    out["placement_us"], out["flapped"], out["crash_ms"] = out.pop("placement"), out.pop("expiries"), out.pop("crash")
    cpu1 = cluster.stats()
    watcher.cancel()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, watcher, return_exceptions=True)
    out["cpu_s"] = {k: cpu1[k][0] - cpu0[k][0] for k in cpu1}
    out["rss_mib"] = {k: cpu1[k][1] for k in cpu1}
    out["peak_rss_mib"] = dict(cluster.peak_rss)
    out["longest_stall_ms"] = {k: v * 1000 for k, v in cluster.stalls.items()}
    return out


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def stalls(ms: dict) -> str:
    """Coordinator / gateway wall-clock stall (of it on a CPU) in ms."""
    return " / ".join(f"{ms[name]:.0f} ({ms['busy_' + name]:.0f})" for name in ("coordinator", "gateway"))


def row(r: dict) -> str:
    def p(values, q):
        v = pct(values, q)
        return "-" if v is None else f"{v:.0f}"
    return (f"| {r['workers']} | {r['heartbeat_s']:g} / {r['ttl_s']:g} s | {r['mode']} | {r['registered_s']:.1f} / {r['settle_s']:.1f} s | {p(r['join_ms'], 50)} / {p(r['join_ms'], 99)} | "
            f"{p(r['drain_ms'], 50)} / {p(r['drain_ms'], 99)} | {p(r['crash_ms'], 50)} / {p(r['crash_ms'], 99)} | "
            f"{r['flapped']:.0f} | "
            f"{p(r['lag_ms'], 50)} / {p(r['lag_ms'], 99)} | "
            f"{r['peak_rss_mib']['coordinator']:.0f} / {r['peak_rss_mib']['gateway']:.0f} | "
            f"{r['cpu_s']['coordinator']:.0f} / {r['cpu_s']['gateway']:.0f} | "
            f"{stalls(r['storm_stall_ms'])} | {stalls(r['longest_stall_ms'])} | "
            f"{r['placement_us']:.0f} | {r['load_average']} |")


HEADER = ("| N | heartbeat / TTL | start | registered / routed by the gateway | join p50/p99 ms | drain p50/p99 ms | crash-TTL p50/p99 ms | expired early "
          "| churn lag p50/p99 ms "
          "| peak RSS coord/gw MiB | CPU s coord/gw | longest loop stall in the start, coord/gw ms (of it on a CPU) "
          "| longest loop stall in the whole run "
          "| placement µs | load avg |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[100, 500, 1000, 2000])
    parser.add_argument("--churn-s", type=float, default=60.0)
    parser.add_argument("--staggered", action="store_true", help="spread the start over 5 s")
    parser.add_argument("--sim-procs", type=int, default=4, help="processes running the simulated workers")
    parser.add_argument("--sim-nice", type=int, default=10,
                        help="niceness of the simulator processes: they stand for other machines, so the "
                             "services come first for the shared cores (0: compete as equals)")
    parser.add_argument("--stall-log-ms", type=float, default=0.0,
                        help="the services log their event loop's stack when it is held this long "
                             "(*_LOOP_STALL_LOG_MS); see --service-logs")
    parser.add_argument("--service-logs", type=Path, help="write the services' logs here (N<n>/<service>.log)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "control_plane.json")
    parser.add_argument("--simulate", nargs=5, metavar=("COORD_URL", "FIRST", "END", "N", "STAGGER_S"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.simulate:
        asyncio.run(simulate(*args.simulate))
        return
    rng = random.Random(0)
    results = []
    print(HEADER, flush=True)
    for n in args.workers:
        r = asyncio.run(run_n(n, args, rng))
        r["mode"] = "staggered" if args.staggered else "simultaneous"
        r["load_average"] = load_average()  # of the machine (2 shared cores) at the end of the run
        results.append(r)
        print(row(r), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
