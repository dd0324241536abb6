#!/usr/bin/env python3
"""KV tensor API latency: client-side time of /kv calls through the gateway (loopback HTTP
included), for GPT-2-small-shaped layers (12 heads x 64), in each encoding.

Starts a coordinator, one tiny-gpt2 worker and a gateway on loopback (or uses --url, a gateway),
then per encoding: puts of a layer of --positions positions, appends of one position, gets of
the layer and length calls; prints min/median/max ms of each.

    .venv/bin/python scripts/kv_tensor_bench.py                  # ~20 s
    .venv/bin/python scripts/kv_tensor_bench.py --reps 100 --positions 512 --json out.json
"""

import argparse
import base64
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch
from pydantic_core import to_json

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.localcluster import LocalCluster  # noqa: E402
from services.worker.model.presets import resolve_model_path  # noqa: E402

HEADS, HEAD_DIM = 12, 64


def wire(tensor: torch.Tensor, encoding: str) -> dict:
    if encoding == "raw":
        raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    else:
        buffer = io.BytesIO()
        torch.save(tensor, buffer)
        raw = buffer.getvalue()
    return {"data": base64.b64encode(raw).decode(), "shape": list(tensor.shape), "dtype": str(tensor.dtype),
            "encoding": encoding}


def timed_ms(call: Callable[[], httpx.Response], reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        response = call()
        times.append((time.perf_counter() - t0) * 1000)
        response.raise_for_status()
    return times


def measure(url: str, encoding: str, positions: int, reps: int) -> dict[str, list[float]]:
    seq_id = f"bench-{encoding}"
    layer = {"k": wire(torch.randn(positions, HEADS, HEAD_DIM), encoding),
             "v": wire(torch.randn(positions, HEADS, HEAD_DIM), encoding)}
    one = {"k": wire(torch.randn(1, HEADS, HEAD_DIM), encoding), "v": wire(torch.randn(1, HEADS, HEAD_DIM), encoding)}
    # Bodies encoded once, up front: the figures are the cluster's, not the client's JSON encoder's.
    put_body, append_body = (to_json({"seq_id": seq_id, "layer": 0, **tensors}) for tensors in (layer, one))
    with httpx.Client(base_url=url, timeout=60, headers={"Content-Type": "application/json"}) as client:
        put = timed_ms(lambda: client.post("/kv/put", content=put_body), reps)
        append = timed_ms(lambda: client.post("/kv/append", content=append_body), reps)
        get = timed_ms(lambda: client.post("/kv/get", json={"seq_id": seq_id, "layer": 0, "encoding": encoding}),
                       reps)
        length = timed_ms(lambda: client.get(f"/kv/{seq_id}/0/length"), reps)
        client.delete(f"/kv/{seq_id}")
    return {"put": put, "append_1": append, "get": get, "length": length}


def report(results: dict[str, dict[str, list[float]]], positions: int) -> str:
    layer_kib = positions * HEADS * HEAD_DIM * 4 / 1024
    lines = [f"float32 layer of {positions} positions: {layer_kib:.0f} KiB per K or V tensor", "",
             f"{'encoding':<9}{'call':<10}{'min ms':>9}{'median ms':>11}{'max ms':>9}"]
    for encoding, calls in results.items():
        for call, times in calls.items():
            lines.append(f"{encoding:<9}{call:<10}{min(times):>9.2f}{statistics.median(times):>11.2f}"
                         f"{max(times):>9.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running gateway (default: start a local cluster)")
    parser.add_argument("--positions", type=int, default=256, help="positions of the layer put and got")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--model-cache-dir", type=Path, default=Path.home() / ".cache" / "kvcache" / "models")
    args = parser.parse_args()

    def run(url: str) -> dict:
        return {encoding: measure(url, encoding, args.positions, args.reps) for encoding in ("raw", "torch")}

    if args.url:
        results = run(args.url)
    else:
        resolve_model_path("tiny-gpt2", args.model_cache_dir)
        env = {"WORKER_MODEL_NAME": "tiny-gpt2", "WORKER_MODEL_CACHE_DIR": str(args.model_cache_dir)}
        with LocalCluster(num_workers=1, log_dir=ROOT / "bench_results" / "logs-kv-tensor", worker_env=env) as cluster:
            results = run(cluster.gateway_url)
    print(report(results, args.positions))
    if args.json:
        args.json.write_text(json.dumps({"positions": args.positions, "results": results}, indent=2))


if __name__ == "__main__":
    main()
