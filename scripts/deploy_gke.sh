#!/usr/bin/env bash
# Deploys k8s/overlays/<overlay> to the current kubectl context with the images from this
# project's Artifact Registry, each pinned to the digest its tag points at.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/deploy_gke.sh --project PROJECT_ID [options]

Renders k8s/overlays/OVERLAY with every image set to
REGION-docker.pkg.dev/PROJECT_ID/kvcache/NAME@DIGEST (the digest TAG points at), applies it to
the current kubectl context, waits for the rollouts and prints the gateway's address.

Options:
  --project ID       GCP project of the Artifact Registry repository (required)
  --region REGION    registry region (default: us-central1)
  --tag TAG          image tag pushed by scripts/build_images.sh (default: git short SHA)
  --overlay NAME     cpu (default) or gpu; must match infra's enable_gpu
  --namespace NS     deploy into NS instead of kvcache
  --membership MODE  heartbeat (default) or kubernetes: the coordinator takes its workers from
                     their EndpointSlices (k8s/components/kubernetes-membership, with its RBAC)
  --dry-run          print the rendered manifests with tags instead of digests; no gcloud,
                     no kubectl apply
  -h, --help         show this help

Needs kubectl (with kustomize) and, unless --dry-run, gcloud authenticated for the project.
USAGE
}

die() {
  printf 'deploy_gke.sh: %s\n' "$*" >&2
  exit 1
}

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
readonly IMAGES_CPU=(coordinator gateway worker)
readonly IMAGES_GPU=(coordinator gateway worker-cuda)

project=""
region="us-central1"
tag=""
overlay="cpu"
namespace=""
membership="heartbeat"
dry_run=false

while (($# > 0)); do
  case "$1" in
    --project) project="${2:?--project needs a value}"; shift 2 ;;
    --region) region="${2:?--region needs a value}"; shift 2 ;;
    --tag) tag="${2:?--tag needs a value}"; shift 2 ;;
    --overlay) overlay="${2:?--overlay needs a value}"; shift 2 ;;
    --namespace) namespace="${2:?--namespace needs a value}"; shift 2 ;;
    --membership) membership="${2:?--membership needs a value}"; shift 2 ;;
    --dry-run) dry_run=true; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

[[ -n "${project}" ]] || { usage >&2; die "--project is required"; }
[[ "${overlay}" == cpu || "${overlay}" == gpu ]] || die "--overlay must be cpu or gpu"
[[ "${membership}" == heartbeat || "${membership}" == kubernetes ]] \
  || die "--membership must be heartbeat or kubernetes"
[[ -z "${namespace}" || "${namespace}" =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]] \
  || die "--namespace must be a DNS label"
if [[ -z "${tag}" ]]; then
  tag="$(git -C "${REPO_ROOT}" rev-parse --short HEAD 2>/dev/null)" || die "--tag is required outside a git checkout"
fi
command -v kubectl >/dev/null || die "kubectl not found"
if [[ "${dry_run}" == false ]]; then
  command -v gcloud >/dev/null || die "gcloud not found"
fi

readonly registry="${region}-docker.pkg.dev/${project}/kvcache"
if [[ "${overlay}" == gpu ]]; then
  images=("${IMAGES_GPU[@]}")
else
  images=("${IMAGES_CPU[@]}")
fi

# kustomize only accepts relative paths to other kustomizations: work inside k8s/.
workdir="$(mktemp -d "${REPO_ROOT}/k8s/.deploy-XXXXXX")"
trap 'rm -rf -- "${workdir}"' EXIT

image_entry() {
  local name="$1" ref
  if [[ "${dry_run}" == true ]]; then
    printf '  - name: kvcache/%s\n    newName: %s/%s\n    newTag: "%s"\n' \
      "${name}" "${registry}" "${name}" "${tag}"
    return
  fi
  ref="$(gcloud artifacts docker images describe "${registry}/${name}:${tag}" \
    --project "${project}" --format='value(image_summary.digest)')" \
    || die "no image ${registry}/${name}:${tag}; run scripts/build_images.sh --push first"
  [[ "${ref}" == sha256:* ]] || die "unexpected digest for ${name}:${tag}: ${ref}"
  printf '  - name: kvcache/%s\n    newName: %s/%s\n    digest: %s\n' \
    "${name}" "${registry}" "${name}" "${ref}"
}

{
  printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n'
  if [[ -n "${namespace}" ]]; then
    printf 'namespace: %s\n' "${namespace}"
  fi
  printf 'resources:\n  - ../overlays/%s\n' "${overlay}"
  if [[ "${membership}" == kubernetes ]]; then
    printf 'components:\n  - ../components/kubernetes-membership\n'
  fi
  printf 'images:\n'
  for name in "${images[@]}"; do
    image_entry "${name}"
  done
} >"${workdir}/kustomization.yaml"

if [[ "${dry_run}" == true ]]; then
  kubectl kustomize "${workdir}"
  exit 0
fi

ns="${namespace:-kvcache}"
echo "Deploying overlay ${overlay} (tag ${tag}) to namespace ${ns} of $(kubectl config current-context)"
# The Secret shared by workers, coordinator and Redis (infra/DEPLOYMENT.md, step 6): created
# once with random values if missing, never stored in git.
kubectl create namespace "${ns}" --dry-run=client -o yaml | kubectl apply -f -
if ! kubectl -n "${ns}" get secret kvcache-secrets >/dev/null 2>&1; then
  kubectl -n "${ns}" create secret generic kvcache-secrets \
    --from-literal=redis-password="$(openssl rand -hex 24)" \
    --from-literal=internal-token="$(openssl rand -hex 32)" \
    --from-literal=gateway-api-keys="$(openssl rand -hex 24)"
  echo "Created Secret kvcache-secrets. The gateway's API key (Authorization: Bearer <key>):"
  echo "  kubectl -n ${ns} get secret kvcache-secrets -o jsonpath='{.data.gateway-api-keys}' | base64 -d"
fi
kubectl apply -k "${workdir}"
kubectl -n "${ns}" rollout status statefulset/redis --timeout=5m
kubectl -n "${ns}" rollout status deployment/coordinator --timeout=5m
kubectl -n "${ns}" rollout status statefulset/worker --timeout=20m
kubectl -n "${ns}" rollout status deployment/gateway --timeout=5m

echo "Waiting for the gateway's load balancer address..."
address=""
for _ in $(seq 1 60); do
  address="$(kubectl -n "${ns}" get service gateway \
    -o jsonpath='{.status.loadBalancer.ingress[0].ip}{.status.loadBalancer.ingress[0].hostname}')"
  [[ -n "${address}" ]] && break
  sleep 5
done
[[ -n "${address}" ]] || die "the gateway Service has no external address yet: kubectl -n ${ns} get service gateway -w"

cat <<EOF_DONE
Gateway: http://${address}
  curl -sS http://${address}/generate -H 'content-type: application/json' \\
    -d '{"prompt": "The capital of France is", "max_tokens": 20, "stream": false, "seq_id": "demo-1"}'
EOF_DONE
