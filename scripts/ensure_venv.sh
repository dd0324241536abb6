#!/usr/bin/env bash
# Sourced by the other scripts: create .venv and install the project (with dev extras) if needed.
# Re-installs when pyproject.toml changes.
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_python="${PYTHON:-python3}"
if [[ ! -x "$_root/.venv/bin/python" ]]; then
  echo "creating .venv with $("$_python" --version)"
  "$_python" -m venv "$_root/.venv"
fi
_stamp="$_root/.venv/.kvcache-installed"
if [[ ! -f "$_stamp" || "$_root/pyproject.toml" -nt "$_stamp" ]]; then
  echo "installing kvcache and its dependencies into .venv (first run: a few minutes)"
  "$_root/.venv/bin/python" -m pip install --quiet --upgrade pip
  "$_root/.venv/bin/python" -m pip install --quiet -e "${_root}[dev]"
  touch "$_stamp"
fi
