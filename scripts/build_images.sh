#!/usr/bin/env bash
# Builds the service images (and pushes them with --push).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/build_images.sh [options]

Builds REGISTRY/coordinator, REGISTRY/gateway and REGISTRY/worker from Dockerfile (one target
each) and, with --cuda, REGISTRY/worker-cuda from Dockerfile.cuda, all for linux/amd64.

Options:
  --registry PREFIX  image name prefix (default: kvcache, giving kvcache/coordinator, ...);
                     for GKE: REGION-docker.pkg.dev/PROJECT_ID/kvcache
  --tag TAG          image tag (default: git short SHA, or "dev" outside git)
  --cuda             also build the CUDA worker image
  --only NAME        build one image: coordinator, gateway, worker or worker-cuda
  --push             push the images after building (run
                     `gcloud auth configure-docker REGION-docker.pkg.dev` once first)
  -h, --help         show this help
USAGE
}

die() {
  printf 'build_images.sh: %s\n' "$*" >&2
  exit 1
}

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT

registry="kvcache"
tag=""
cuda=false
only=""
push=false

while (($# > 0)); do
  case "$1" in
    --registry) registry="${2:?--registry needs a value}"; shift 2 ;;
    --tag) tag="${2:?--tag needs a value}"; shift 2 ;;
    --cuda) cuda=true; shift ;;
    --only) only="${2:?--only needs a value}"; shift 2 ;;
    --push) push=true; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

if [[ -z "${tag}" ]]; then
  tag="$(git -C "${REPO_ROOT}" rev-parse --short HEAD 2>/dev/null || echo dev)"
fi
registry="${registry%/}"
command -v docker >/dev/null || die "docker not found"

names=(coordinator gateway worker)
if [[ "${cuda}" == true ]]; then
  names+=(worker-cuda)
fi
if [[ -n "${only}" ]]; then
  case "${only}" in
    coordinator | gateway | worker | worker-cuda) names=("${only}") ;;
    *) die "--only takes coordinator, gateway, worker or worker-cuda" ;;
  esac
fi

build() {
  local name="$1" image="${registry}/$1:${tag}"
  echo "==> ${image}"
  if [[ "${name}" == worker-cuda ]]; then
    docker build --platform linux/amd64 -f "${REPO_ROOT}/Dockerfile.cuda" -t "${image}" "${REPO_ROOT}"
  else
    docker build --platform linux/amd64 -f "${REPO_ROOT}/Dockerfile" --target "${name}" \
      -t "${image}" "${REPO_ROOT}"
  fi
  if [[ "${push}" == true ]]; then
    docker push "${image}"
  fi
}

for name in "${names[@]}"; do
  build "${name}"
done
echo "Built ${#names[@]} image(s) with tag ${tag}."
