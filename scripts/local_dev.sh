#!/usr/bin/env bash
# Run the whole system locally (no Docker): coordinator, N workers and the gateway on loopback.
# First use creates .venv and installs the project. Ctrl-C (or `scripts/local_dev.sh stop`)
# ends every process it started. Logs go to .local/logs/.
set -euo pipefail

usage() {
  cat <<USAGE
usage: scripts/local_dev.sh [start] [--workers N]   start the cluster (default 2 workers)
       scripts/local_dev.sh scale N                  add workers to, or gracefully drain workers
                                                     from, the running cluster until it has N
       scripts/local_dev.sh stop                     stop a cluster started from another shell
A crashed process (worker, coordinator, gateway) is restarted with the same id and port.
Environment: any WORKER_*, GATEWAY_*, COORDINATOR_* setting (see README), e.g.
       WORKER_MODEL_NAME=gpt2 scripts/local_dev.sh
USAGE
}

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
pidfile=".local/cluster.pid"

# The runner's pid, if the one in the pid file is still this project's runner (not a reused pid).
runner_pid() {
  local pid
  [[ -f "$pidfile" ]] || return 1
  pid="$(cat "$pidfile")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  if command -v ps >/dev/null 2>&1; then
    [[ "$(ps -p "$pid" -o args=)" == *services.localcluster* ]] || return 1
  fi
  echo "$pid"
}

case "${1:-start}" in
  -h|--help) usage; exit 0 ;;
  stop)
    if pid="$(runner_pid)"; then
      kill -TERM "$pid"
      echo "stopping cluster (pid $pid)"
    else
      echo "no running cluster found"
    fi
    exit 0 ;;
  scale)
    if [[ ! "${2:-}" =~ ^[1-9][0-9]*$ ]]; then
      echo "scale needs a positive number of workers, e.g. scripts/local_dev.sh scale 3" >&2
      exit 2
    fi
    if ! pid="$(runner_pid)"; then
      echo "no running cluster found (start one with scripts/local_dev.sh)" >&2
      exit 1
    fi
    echo "$2" > .local/scale
    kill -HUP "$pid"
    echo "scaling to $2 workers (pid $pid; see the cluster's output)"
    exit 0 ;;
  start) shift || true ;;
  --*) ;;
  *) usage; exit 2 ;;
esac

if pid="$(runner_pid)"; then
  echo "a cluster is already running (pid $pid); scripts/local_dev.sh stop stops it" >&2
  exit 1
fi

# shellcheck source=scripts/ensure_venv.sh
source "$root/scripts/ensure_venv.sh"
mkdir -p .local
.venv/bin/python -m services.localcluster "$@" &
echo $! > "$pidfile"
# A background job of a script ignores SIGINT, so Ctrl-C is forwarded as SIGTERM; so is a
# hang-up (closing the terminal), since the runner takes SIGHUP as `scale`.
trap 'kill -TERM "$(cat "$pidfile")" 2>/dev/null || true' INT TERM HUP
wait "$(cat "$pidfile")" || true
wait "$(cat "$pidfile")" 2>/dev/null || true
rm -f "$pidfile"
