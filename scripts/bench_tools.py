"""Benchmark a running cluster with the standard tools: NVIDIA AIPerf 0.13.0 and GuideLLM 0.8.1
(the vLLM project's), offline, then check that their token counts equal the server's.

The tools live in a venv of their own (not the project's):

    python3 -m venv /work/venv-tools && /work/venv-tools/bin/pip install aiperf==0.13.0 guidellm==0.8.1

Start a cluster (scripts/local_dev.sh), then:

    .venv/bin/python scripts/bench_tools.py                       # every run, both tools
    .venv/bin/python scripts/bench_tools.py --tools aiperf --runs chat-c1 completions

Runs (synthetic prompts of --input-tokens, --output-tokens generated per request, every request
streamed): chat-c1, chat-c4, chat-c16 (/v1/chat/completions at concurrency 1, 4 and 16),
multiturn (conversations of --turns turns at concurrency 4, each turn resending the history) and
completions (/v1/completions at concurrency 4). AIPerf resets the prefix cache before each run
(`--reset-kv-cache`: POST /reset_prefix_cache).

Offline: the tokenizer is the preset's saved directory (built here if missing, or --tokenizer),
and nothing asks a model hub. Against another deployment (GKE), pass its gateway's --url (and
--api-key with GATEWAY_API_KEYS).

Checks, per run: the tool saw 0 errors, and its output tokens equal the tokens the server
generated in that time (the workers' `generated_tokens`, summed by the gateway's /stats: the sum
of every response's usage.completion_tokens). Prompt tokens are printed beside the server's: a
chat's usage counts the chat template's tags too, which the tools (counting the messages' text)
do not. Figures go to the console and to <out>/summary.json; each tool's own reports stay in
<out>/<tool>-<run>/.
"""

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

RUNS = ("chat-c1", "chat-c4", "chat-c16", "multiturn", "completions")
TOOLS = ("aiperf", "guidellm")
SETTLE_S = 1.0  # the last response's tokens are counted by the workers just before it ends


@dataclass(frozen=True)
class Scenario:
    name: str
    endpoint: str          # "chat" or "completions"
    concurrency: int
    num_requests: int      # requests (a conversation's turns count one each)
    turns: int = 1


@dataclass
class Figures:
    """One run's figures, in the tool's own measurement."""

    tool: str
    run: str
    requests: int
    errors: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    output_tokens_per_s: float
    requests_per_s: float
    tool_output_tokens: int
    tool_input_tokens: int
    server_output_tokens: int = 0
    server_prompt_tokens: int = 0
    server_requests: int = 0  # requests the workers started (a tool may drop one it saw end)
    first_error: str = ""  # the tool's, if any request failed

    @property
    def tokens_match(self) -> bool:
        return self.tool_output_tokens == self.server_output_tokens


def scenarios(requests_per_stream: int, turns: int) -> dict[str, Scenario]:
    def chat(c: int) -> Scenario:
        return Scenario(f"chat-c{c}", "chat", c, max(8, requests_per_stream * c))

    conversations = 8
    return {s.name: s for s in (
        chat(1), chat(4), chat(16),
        Scenario("multiturn", "chat", 4, conversations * turns, turns),
        Scenario("completions", "completions", 4, 4 * requests_per_stream))}


# --- the tools' command lines ------------------------------------------------------------------

def aiperf_command(args, s: Scenario, out: Path) -> list[str]:
    command = [
        str(args.tools_venv / "bin" / "aiperf"), "profile", "--model", args.model, "--url", args.url,
        "--endpoint-type", s.endpoint, "--streaming", "--tokenizer", str(args.tokenizer),
        "--concurrency", str(s.concurrency), "--request-count", str(s.num_requests),
        "--prompt-input-tokens-mean", str(args.input_tokens), "--prompt-input-tokens-stddev", "0",
        "--prompt-output-tokens-mean", str(args.output_tokens), "--prompt-output-tokens-stddev", "0",
        "--random-seed", "7", "--reset-kv-cache", "--ui-type", "none", "--output-artifact-dir", str(out)]
    if s.turns > 1:
        command += ["--conversation-num", str(s.num_requests // s.turns), "--conversation-turn-mean",
                    str(s.turns), "--conversation-turn-stddev", "0"]
    if args.api_key:
        command += ["--api-key", args.api_key]
    return command


def guidellm_command(args, s: Scenario, out: Path) -> list[str]:
    route = "/v1/chat/completions" if s.endpoint == "chat" else "/v1/completions"
    data = {"kind": "synthetic_text", "prompt_tokens": args.input_tokens, "output_tokens": args.output_tokens,
            "turns": s.turns}
    backend = {"kind": "openai_http", "target": args.url, "model": args.model, "request_format": route,
               "stream": True, **({"api_key": args.api_key} if args.api_key else {})}
    return [
        str(args.tools_venv / "bin" / "guidellm"), "run",
        "--backend", json.dumps(backend), "--profile", json.dumps({"kind": "concurrent", "streams": [s.concurrency]}),
        "--data", json.dumps(data), "--tokenizer", json.dumps({"kind": "hf_auto", "model": str(args.tokenizer)}),
        "--constraint", json.dumps({"kind": "max_requests", "count": s.num_requests}),
        "--seed", json.dumps({"kind": "static", "value": 7}),
        "--output", json.dumps({"kind": "json", "path": str(out / "benchmarks.json")}),
        "--disable-console-interactive"]


# --- the tools' reports ------------------------------------------------------------------------

def aiperf_figures(s: Scenario, out: Path) -> Figures:
    report = json.loads((out / "profile_export_aiperf.json").read_text())

    def stat(tag: str, key: str = "avg") -> float:
        return float((report.get(tag) or {}).get(key) or 0)

    error_summary = report.get("error_summary") or []
    return Figures(
        "aiperf", s.name, requests=int(stat("request_count")), first_error=str(error_summary[:1]),
        errors=int(stat("error_request_count")) + sum(e.get("count", 1) for e in error_summary),
        ttft_p50_ms=stat("time_to_first_token", "p50"), ttft_p99_ms=stat("time_to_first_token", "p99"),
        itl_p50_ms=stat("inter_token_latency", "p50"), itl_p99_ms=stat("inter_token_latency", "p99"),
        output_tokens_per_s=stat("output_token_throughput"), requests_per_s=stat("request_throughput"),
        tool_output_tokens=int(stat("total_osl")), tool_input_tokens=int(stat("total_isl")))


def guidellm_figures(s: Scenario, out: Path) -> Figures:
    report = json.loads((out / "benchmarks.json").read_text())
    [benchmark] = report["benchmarks"]
    metrics = benchmark["metrics"]
    totals = metrics["request_totals"]
    errored = benchmark["requests"].get("errored") or [{}]

    def dist(name: str, stat: str, status: str = "successful") -> float:
        values = metrics[name][status]
        return float(values["percentiles"][stat] if stat.startswith("p") else values[stat])

    return Figures(
        "guidellm", s.name, requests=int(totals["successful"]), errors=int(totals["errored"]),
        first_error=str(errored[0].get("error") or "")[:300],
        ttft_p50_ms=dist("time_to_first_token_ms", "p50"), ttft_p99_ms=dist("time_to_first_token_ms", "p99"),
        itl_p50_ms=dist("inter_token_latency_ms", "p50"), itl_p99_ms=dist("inter_token_latency_ms", "p99"),
        output_tokens_per_s=dist("output_tokens_per_second", "mean"),
        requests_per_s=dist("requests_per_second", "mean"),
        tool_output_tokens=int(dist("output_token_count", "total_sum")),
        tool_input_tokens=int(dist("prompt_token_count", "total_sum")))


COMMANDS = {"aiperf": aiperf_command, "guidellm": guidellm_command}
FIGURES = {"aiperf": aiperf_figures, "guidellm": guidellm_figures}


# --- running ---------------------------------------------------------------------------------

def server_counters(args) -> dict[str, int]:
    """The workers' counters, summed by the gateway."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    totals = httpx.get(f"{args.url}/stats", headers=headers, timeout=10).raise_for_status().json()["totals"]
    return {key: int(totals.get(key, 0)) for key in ("generated_tokens", "prompt_tokens", "requests")}


def run_one(args, tool: str, s: Scenario) -> Figures:
    out = args.out / f"{tool}-{s.name}"
    out.mkdir(parents=True, exist_ok=True)
    before = server_counters(args)
    with open(out / "tool.log", "w") as log:
        done = subprocess.run(COMMANDS[tool](args, s, out), stdout=log, stderr=subprocess.STDOUT,
                              timeout=args.timeout_s, check=False)
    time.sleep(SETTLE_S)
    after = server_counters(args)
    if done.returncode != 0:
        raise RuntimeError(f"{tool} {s.name} exited {done.returncode}: see {out / 'tool.log'}")
    figures = FIGURES[tool](s, out)
    figures.server_output_tokens = after["generated_tokens"] - before["generated_tokens"]
    figures.server_prompt_tokens = after["prompt_tokens"] - before["prompt_tokens"]
    figures.server_requests = after["requests"] - before["requests"]
    return figures


def render(results: list[Figures]) -> str:
    lines = [f"{'tool':9}{'run':13}{'req':>5}{'err':>5}{'TTFT p50':>10}{'p99':>8}{'ITL p50':>9}{'p99':>7}"
             f"{'out tok/s':>11}{'req/s':>7}{'out tok tool/server':>22}{'in tok tool/server':>20}"]
    for r in results:
        lines.append(
            f"{r.tool:9}{r.run:13}{r.requests:>5}{r.errors:>5}{r.ttft_p50_ms:>8.0f}ms{r.ttft_p99_ms:>6.0f}ms"
            f"{r.itl_p50_ms:>7.1f}ms{r.itl_p99_ms:>5.0f}ms{r.output_tokens_per_s:>11.1f}{r.requests_per_s:>7.2f}"
            f"{f'{r.tool_output_tokens}/{r.server_output_tokens}':>20}{' ' if r.tokens_match else ' !'}"
            f"{f'{r.tool_input_tokens}/{r.server_prompt_tokens}':>20}")
    return "\n".join(lines)


def default_tokenizer(args) -> Path:
    """The saved directory of the preset the model name stands for (its `root` in /v1/models),
    built here if missing: a tokenizer that from_pretrained loads offline."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from services.worker.model.presets import resolve_model_path  # torch: imported only when needed

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    model = httpx.get(f"{args.url}/v1/models/{args.model}", headers=headers, timeout=10).raise_for_status().json()
    return Path(resolve_model_path(model["root"], Path.home() / ".cache" / "kvcache" / "models"))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway")
    parser.add_argument("--model", default="gpt2-small-random", help="a name in the gateway's /v1/models")
    parser.add_argument("--tokenizer", type=Path, help="a saved tokenizer directory (default: the preset's)")
    parser.add_argument("--api-key", default="", help="with GATEWAY_API_KEYS")
    parser.add_argument("--tools-venv", type=Path, default=Path("/work/venv-tools"))
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--input-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--requests-per-stream", type=int, default=4,
                        help="requests per concurrent stream (at least 8 a run)")
    parser.add_argument("--turns", type=int, default=3, help="turns per conversation in `multiturn`")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per tool run")
    parser.add_argument("--out", type=Path, default=Path(".local/bench_tools"))
    args = parser.parse_args()
    args.url = args.url.rstrip("/")
    args.tokenizer = args.tokenizer or default_tokenizer(args)
    return args


def main() -> int:
    args = parse_args()
    plan = scenarios(args.requests_per_stream, args.turns)
    results, failures = [], []
    for tool in args.tools:
        for name in args.runs:
            print(f"{tool} {name} ...", flush=True)
            try:
                results.append(run_one(args, tool, plan[name]))
            except (RuntimeError, OSError, ValueError, KeyError, StopIteration, subprocess.TimeoutExpired) as exc:
                failures.append(f"{tool} {name}: {type(exc).__name__}: {exc}")
    print(render(results))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(
        {"results": [asdict(r) | {"tokens_match": r.tokens_match} for r in results], "failures": failures},
        indent=2))
    for failure in failures:
        print("FAILED", failure)
    bad = [r for r in results if r.errors or not r.tokens_match]
    for r in bad:
        print(f"CHECK FAILED {r.tool} {r.run}: {r.errors} errors, output tokens tool {r.tool_output_tokens} "
              f"vs server {r.server_output_tokens}, requests tool {r.requests} vs server {r.server_requests} "
              f"{r.first_error}")
    return 1 if failures or bad else 0


if __name__ == "__main__":
    sys.exit(main())
