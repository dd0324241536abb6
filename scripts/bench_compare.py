#!/usr/bin/env python3
"""Before/after benchmark: scripts/bench.py's classic scenarios (and scenario 10) on a baseline revision and on this tree.

Checks out the baseline revision (any git revision) as a detached `git worktree` in a temporary
directory and runs each tree's own scripts/bench.py, with that tree as the working directory (so
the clusters' worker and gateway subprocesses import that tree's `services`), with the same
interpreter, one after the other on this machine. Each round runs both trees, the baseline first in
odd rounds and the current tree first in even ones (ABBA), so the machine's drift hits both alike.
Run it on an otherwise idle machine:

    .venv/bin/python scripts/bench_compare.py --baseline a477e49            # scenarios 1,3,4, 5 reps, 2 rounds
    .venv/bin/python scripts/bench_compare.py --baseline HEAD~3 --scenarios 4 --reps 3 --rounds 3
    .venv/bin/python scripts/bench_compare.py --baseline a477e49 --current HEAD   # both from worktrees
    .venv/bin/python scripts/bench_compare.py --baseline HEAD~1 --scenarios 10 --s10-pairs 300 --rounds 4

Headline metrics (the value of a tree is the median of its per-round medians; the per-round
values follow in brackets): 1 cached continuation TTFT (ms) and the recompute/cached ratio,
2 cached continuation end to end (ms), 3 concurrent tokens/s and the concurrent/sequential speedup,
4 engine decode step (ms) and its overhead over a bare transformers forward (%), 5 the engine's
1024/128-context step time ratio, 10 the routing tax: gateway minus direct p50 and p99 (ms),
p99(gateway) - p99(direct) (ms) and the noise floor's p99 (direct minus direct). The change column is current vs baseline in % (in percentage
points for the overhead); the "better" column says which direction is an improvement.

Writes <out>/<baseline|current>-round<k>/ (bench.py's results.json, results.md, logs) and
<out>/compare.md, <out>/compare.json (the table, the commits and the raw per-round numbers).
The worktree is removed at the end, also on an error or Ctrl-C.
"""

import argparse
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPARABLE = (1, 2, 3, 4, 5, 10)
LABELS = ("baseline", "current")

# (row, scenario key, better direction, value from that scenario's summaries, change in points?)
METRICS = [
    ("s1 cached TTFT (ms)", "s1", "lower", lambda s: s["cached"]["median"] * 1000, False),
    ("s1 recompute/cached ratio", "s1", "higher", lambda s: s["recompute"]["median"] / s["cached"]["median"], False),
    ("s2 cached end to end (ms)", "s2", "lower", lambda s: s["cached"]["median"] * 1000, False),
    ("s3 concurrent tok/s", "s3", "higher", lambda s: s["concurrent_tok_s"]["median"], False),
    ("s3 speedup", "s3", "higher", lambda s: s["speedup"]["median"], False),
    ("s4 engine step (ms)", "s4", "lower", lambda s: s["engine_step_s"]["median"] * 1000, False),
    ("s4 overhead (%)", "s4", "lower", lambda s: s["overhead"]["median"] * 100, True),
    ("s5 engine 1024/128 step ratio", "s5", "lower", lambda s: s["engine_ratio"]["median"], False),
    ("s10 routing tax p50 (ms)", "s10", "lower", lambda s: s["tax_p50_s"] * 1000, False),
    ("s10 routing tax p99 (ms)", "s10", "lower", lambda s: s["tax_p99_s"] * 1000, False),
    ("s10 p99 gateway - p99 direct (ms)", "s10", "lower", lambda s: (s["gateway_p99_s"] - s["direct_p99_s"]) * 1000,
     False),
    ("s10 noise floor p99 (ms)", "s10", "lower", lambda s: s["noise_p99_s"] * 1000, False),
]


def parse_scenarios(value: str) -> list[int]:
    try:
        chosen = sorted({int(x) for x in value.split(",") if x.strip()})
    except ValueError:
        chosen = []
    if not chosen or not set(chosen) <= set(COMPARABLE):
        raise argparse.ArgumentTypeError("comma-separated scenario numbers, 1 to 5 or 10")
    return chosen


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def commit_of(rev: str) -> str:
    try:
        return git("rev-parse", "--verify", f"{rev}^{{commit}}")
    except subprocess.CalledProcessError:
        sys.exit(f"not a git revision: {rev}")


def describe_trees(baseline: str, current: str | None) -> dict:
    """The baseline's commit, the current one (--current, or HEAD) and whether the measured
    current tree differs from it (never, for --current: a worktree of the commit)."""
    info = {"baseline_rev": baseline, "baseline_commit": commit_of(baseline)}
    if current is not None:
        return {**info, "head_commit": commit_of(current), "dirty": False, "changed_files": 0, "untracked_files": 0}
    status = git("status", "--porcelain").splitlines()
    untracked = sum(line.startswith("??") for line in status)
    return {**info, "head_commit": git("rev-parse", "HEAD"), "dirty": bool(status),
            "changed_files": len(status) - untracked, "untracked_files": untracked}


def add_worktree(commit: str, label: str) -> tuple[Path, Path]:
    """(temporary directory, the commit's detached worktree inside it)."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    tree = tmp / label
    git("worktree", "add", "--detach", str(tree), commit)
    return tmp, tree


def remove_worktree(tmp: Path, tree: Path) -> None:
    if tree.exists():
        result = subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT,
                                capture_output=True, text=True)
        if result.returncode:
            print(f"git worktree remove failed: {result.stderr.strip()}", file=sys.stderr)
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(["git", "worktree", "prune"], cwd=ROOT, check=False)


def stream_output(proc: subprocess.Popen, prefix: str) -> None:
    for line in proc.stdout:
        print(f"{prefix} {line}", end="", flush=True)


def stop(proc: subprocess.Popen) -> None:
    """Interrupted: one SIGINT lets bench.py stop its clusters (it has no SIGTERM handler); SIGKILL after 120 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            print(f"bench.py (pid {proc.pid}) killed; its clusters may still run", file=sys.stderr)


def run_bench(tree: Path, out: Path, label: str, rnd: int, args: argparse.Namespace) -> dict:
    """One scripts/bench.py run of `tree` (cwd = tree, so its subprocesses import that tree's code)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").unlink(missing_ok=True)  # bench.py would keep an earlier run's other scenarios
    cmd = [sys.executable, "scripts/bench.py", "--scenarios", ",".join(map(str, args.scenarios)),
           "--reps", str(args.reps), "--out", str(out), "--model-cache-dir", str(args.model_cache_dir)]
    if args.s10_pairs is not None:
        cmd += ["--s10-pairs", str(args.s10_pairs)]
    pythonpath = os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath}
    print(f"\n=== round {rnd}: {label} ({tree}) ===\n$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    # Its own session: a Ctrl-C reaches only us, and stop() hands bench.py exactly one SIGINT.
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        stream_output(proc, f"[{label} r{rnd}]")
        proc.wait()
    finally:
        stop(proc)
    if proc.returncode:
        raise RuntimeError(f"{label} round {rnd}: bench.py exited with {proc.returncode}")
    print(f"=== round {rnd}: {label} done in {time.perf_counter() - t0:.0f} s ===", flush=True)
    return json.loads((out / "results.json").read_text())


def run_rounds(trees: dict[str, Path], args: argparse.Namespace) -> dict[str, list[dict]]:
    """{label: [results.json of each round]}, the order alternating per round (ABBA)."""
    runs = {label: [] for label in LABELS}
    for rnd in range(1, args.rounds + 1):
        order = LABELS if rnd % 2 else LABELS[::-1]
        for label in order:
            runs[label].append(run_bench(trees[label], args.out / f"{label}-round{rnd}", label, rnd, args))
    return runs


def metric_rows(runs: dict[str, list[dict]], scenarios: list[int]) -> list[dict]:
    rows = []
    for name, key, better, value, points in METRICS:
        if int(key[1:]) not in scenarios:
            continue
        row = {"metric": name, "better": better, "change_unit": "pp" if points else "%"}
        for label in LABELS:
            per_round = [value(r[key]) for r in runs[label]]
            row[label] = {"median": statistics.median(per_round), "rounds": per_round}
        base, cur = row["baseline"]["median"], row["current"]["median"]
        row["change"] = cur - base if points else (cur / base - 1) * 100 if base else float("nan")
        rows.append(row)
    return rows


def number(x: float) -> str:
    return f"{x:.2f}" if abs(x) < 100 else f"{x:.0f}"


def fmt_value(v: dict) -> str:
    return f"{number(v['median'])} ({', '.join(number(x) for x in v['rounds'])})"


def tree_state(info: dict) -> str:
    if not info["dirty"]:
        return "clean"
    return f"dirty ({info['changed_files']} changed, {info['untracked_files']} untracked files)"


def markdown(rows: list[dict], info: dict, args: argparse.Namespace) -> str:
    head = (f"Baseline {info['baseline_rev']} = {info['baseline_commit']}; current HEAD {info['head_commit']}, "
            f"working tree {tree_state(info)}.\nScenarios {','.join(map(str, args.scenarios))}, {args.reps} reps, "
            f"{args.rounds} rounds (ABBA); values: median of the per-round medians (per round).\n")
    lines = ["| metric | baseline | current | change | better |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['metric']} | {fmt_value(r['baseline'])} | {fmt_value(r['current'])} | "
                     f"{r['change']:+.1f} {r['change_unit']} | {r['better']} |")
    return head + "\n" + "\n".join(lines) + "\n"


def write_report(rows: list[dict], runs: dict, info: dict, args: argparse.Namespace) -> str:
    md = markdown(rows, info, args)
    (args.out / "compare.md").write_text(md)
    raw = {label: [{k: r[k] for k in r if k in {f"s{i}" for i in args.scenarios}} for r in runs[label]]
           for label in LABELS}
    first = [LABELS[0] if k % 2 else LABELS[1] for k in range(1, args.rounds + 1)]
    report = {**info, "measured_at": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": runs["current"][0].get("machine"), "scenarios": args.scenarios, "reps": args.reps,
              "rounds": args.rounds, "first_in_round": first, "metrics": rows, "runs": raw}
    (args.out / "compare.json").write_text(json.dumps(report, indent=2))
    return md


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="git revision to compare against (e.g. a commit hash)")
    parser.add_argument("--scenarios", type=parse_scenarios, default=[1, 3, 4],
                        help="comma-separated scenarios of bench.py, 1 to 5 or 10 (default 1,3,4)")
    parser.add_argument("--s10-pairs", type=int, default=None, help="bench.py's --s10-pairs (default: bench.py's)")
    parser.add_argument("--reps", type=int, default=5, help="bench.py's --reps (default 5)")
    parser.add_argument("--current", default=None,
                        help="measure this revision (a worktree) instead of the working tree, which can then change")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each running both trees (default 2)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "compare")
    parser.add_argument("--model-cache-dir", type=Path, default=Path.home() / ".cache" / "kvcache" / "models")
    args = parser.parse_args()
    if args.reps < 1 or args.rounds < 1:
        parser.error("--reps and --rounds must be at least 1")
    args.out = args.out.expanduser().resolve()  # the runs' working directories differ from ours
    args.model_cache_dir = args.model_cache_dir.expanduser().resolve()
    return args


def main() -> None:
    args = parse_args()
    info = describe_trees(args.baseline, args.current)
    print(f"baseline: {args.baseline} = {info['baseline_commit']}\ncurrent: HEAD {info['head_commit']}, "
          f"working tree {tree_state(info)}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    worktrees = [add_worktree(info["baseline_commit"], "baseline")]
    try:
        if args.current is not None:
            worktrees.append(add_worktree(info["head_commit"], "current"))
        current = worktrees[1][1] if args.current is not None else ROOT
        runs = run_rounds({"baseline": worktrees[0][1], "current": current}, args)
    finally:
        for tmp, tree in worktrees:
            remove_worktree(tmp, tree)
    md = write_report(metric_rows(runs, args.scenarios), runs, info, args)
    print(f"\n{md}\nwritten: {args.out}/{{compare.md,compare.json}}; total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
