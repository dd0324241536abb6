#!/usr/bin/env bash
# From an empty GCP project to a running kvcache behind a load balancer (infra/DEPLOYMENT.md
# walks through the same steps one by one).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/quickstart_gke.sh --project PROJECT_ID [options]

1. points gcloud at the project and enables the APIs the cluster needs;
2. terraform apply in infra/ (network, zonal GKE cluster, node pools, Artifact Registry);
3. fetches cluster credentials and lets docker push to Artifact Registry;
4. builds and pushes the images (scripts/build_images.sh);
5. deploys the matching k8s overlay (scripts/deploy_gke.sh) and prints a curl command.

Options:
  --project ID     GCP project (required; billing must be enabled)
  --region REGION  default: us-central1
  --zone ZONE      default: us-central1-a
  --gpu            workers on NVIDIA T4 nodes (infra enable_gpu=true, k8s gpu overlay)
  --tag TAG        image tag (default: git short SHA)
  --yes            apply the Terraform plan without asking
  -h, --help       show this help

Needs gcloud (logged in: gcloud auth login && gcloud auth application-default login),
terraform >= 1.5, kubectl and docker.
USAGE
}

die() {
  printf 'quickstart_gke.sh: %s\n' "$*" >&2
  exit 1
}

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
readonly APIS=(
  compute.googleapis.com
  container.googleapis.com
  artifactregistry.googleapis.com
  iam.googleapis.com
  cloudresourcemanager.googleapis.com
  binaryauthorization.googleapis.com
)

project=""
region="us-central1"
zone="us-central1-a"
gpu=false
tag=""
auto_approve=()

while (($# > 0)); do
  case "$1" in
    --project) project="${2:?--project needs a value}"; shift 2 ;;
    --region) region="${2:?--region needs a value}"; shift 2 ;;
    --zone) zone="${2:?--zone needs a value}"; shift 2 ;;
    --gpu) gpu=true; shift ;;
    --tag) tag="${2:?--tag needs a value}"; shift 2 ;;
    --yes) auto_approve=(-auto-approve); shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

[[ -n "${project}" ]] || { usage >&2; die "--project is required"; }
for tool in gcloud terraform kubectl docker; do
  command -v "${tool}" >/dev/null || die "${tool} not found (see infra/DEPLOYMENT.md, Prerequisites)"
done
if [[ -z "${tag}" ]]; then
  tag="$(git -C "${REPO_ROOT}" rev-parse --short HEAD 2>/dev/null || echo dev)"
fi
overlay="cpu"
cuda_flag=()
if [[ "${gpu}" == true ]]; then
  overlay="gpu"
  cuda_flag=(--cuda)
fi

echo "==> 1/5 project ${project}: enabling APIs"
gcloud config set project "${project}"
gcloud services enable "${APIS[@]}" --project "${project}"

echo "==> 2/5 terraform apply (infra/)"
tf_vars=(
  -var "project_id=${project}"
  -var "region=${region}"
  -var "zone=${zone}"
  -var "enable_gpu=${gpu}"
)
terraform -chdir="${REPO_ROOT}/infra" init -input=false
terraform -chdir="${REPO_ROOT}/infra" apply -input=false "${tf_vars[@]}" ${auto_approve[@]+"${auto_approve[@]}"}
cluster="$(terraform -chdir="${REPO_ROOT}/infra" output -raw cluster_name)"
registry="$(terraform -chdir="${REPO_ROOT}/infra" output -raw image_registry)"

echo "==> 3/5 credentials for cluster ${cluster} and registry ${registry}"
gcloud container clusters get-credentials "${cluster}" --zone "${zone}" --project "${project}"
gcloud auth configure-docker "${region}-docker.pkg.dev" --quiet

echo "==> 4/5 build and push images (tag ${tag})"
"${REPO_ROOT}/scripts/build_images.sh" --registry "${registry}" --tag "${tag}" --push ${cuda_flag[@]+"${cuda_flag[@]}"}

echo "==> 5/5 deploy overlay ${overlay}"
"${REPO_ROOT}/scripts/deploy_gke.sh" --project "${project}" --region "${region}" --tag "${tag}" \
  --overlay "${overlay}"
