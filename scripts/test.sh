#!/usr/bin/env bash
# The test command: installs into .venv on first use, then runs the whole pytest suite
# (unit, in-process service tests, end-to-end tests with real processes on loopback).
# Extra arguments go to pytest, e.g. scripts/test.sh tests/unit -q
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/ensure_venv.sh
source "$root/scripts/ensure_venv.sh"
exec .venv/bin/python -m pytest "$@"
