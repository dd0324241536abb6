#!/usr/bin/env bash
# Runs once after the dev container is created, in the workspace folder: installs the project
# with its dev extras into .venv (CPU torch) and prints the tool versions.
set -euo pipefail

readonly TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"

cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet --index-url "${TORCH_INDEX_URL}" torch==2.13.0
.venv/bin/pip install --quiet -e '.[dev]'

.venv/bin/python --version
gcloud --version | head -n 1
kubectl version --client | head -n 1
terraform version | head -n 1
echo "Ready: .venv/bin/pytest runs the tests; scripts/check_deploy.sh checks the deployment files."
