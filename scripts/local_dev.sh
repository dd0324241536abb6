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

case "${1:-start}" in
  -h|--help) usage; exit 0 ;;
  stop)
    if [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      kill -TERM "$(cat "$pidfile")"
      echo "stopping cluster (pid $(cat "$pidfile"))"
    else
      echo "no running cluster found"
    fi
    exit 0 ;;
  scale)
    if [[ ! "${2:-}" =~ ^[1-9][0-9]*$ ]]; then
      echo "scale needs a positive number of workers, e.g. scripts/local_dev.sh scale 3" >&2
      exit 2
    fi
    if [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      echo "$2" > .local/scale
      kill -HUP "$(cat "$pidfile")"
      echo "scaling to $2 workers (see the cluster's output)"
    else
      echo "no running cluster found" >&2
      exit 1
    fi
    exit 0 ;;
  start) shift || true ;;
  --*) ;;
  *) usage; exit 2 ;;
esac

# shellcheck source=scripts/ensure_venv.sh
source "$root/scripts/ensure_venv.sh"
mkdir -p .local
.venv/bin/python -m services.localcluster "$@" &
echo $! > "$pidfile"
# A background job of a script ignores SIGINT, so Ctrl-C is forwarded as SIGTERM.
trap 'kill -TERM "$(cat "$pidfile")" 2>/dev/null || true' INT TERM
wait "$(cat "$pidfile")" || true
wait "$(cat "$pidfile")" 2>/dev/null || true
rm -f "$pidfile"
