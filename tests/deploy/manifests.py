"""Loading the deployment files and resolving what each container will see.

Rendered manifests come from, in order: the directory in KVCACHE_RENDERED_DIR (written by
scripts/check_deploy.sh), `kubectl kustomize` or `kustomize build` when one is installed,
or else nothing, and the tests fall back to the raw files of k8s/base.
"""

import functools
import importlib
import math
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings
from starlette.routing import Match

from services.coordinator.settings import CoordinatorSettings
from services.gateway.settings import GatewaySettings
from services.worker.settings import WorkerSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "k8s"
OVERLAYS = ("cpu", "gpu")
SETTINGS: dict[str, type[BaseSettings]] = {
    "coordinator": CoordinatorSettings,
    "gateway": GatewaySettings,
    "worker": WorkerSettings,
}
# Variables that are not settings: read by Python or Hugging Face, or only substituted into
# another variable's value.
GENERIC_ENV = {"PYTHONUNBUFFERED", "HF_HOME"}
SUBSTITUTION_ONLY_ENV = {"POD_NAME", "POD_NAMESPACE", "REDIS_PASSWORD"}
# Secrets are created out of band (infra/DEPLOYMENT.md); tests see this stand-in for each value.
SECRET_NAME = "kvcache-secrets"
SECRET_KEYS = {"redis-password", "internal-token", "gateway-api-keys"}
NAMESPACE = "kvcache"

Doc = dict[str, Any]


def load_docs(path: Path) -> list[Doc]:
    with path.open() as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc]


def settings_env_names(cls: type[BaseSettings]) -> set[str]:
    prefix = cls.model_config.get("env_prefix", "")
    names = set()
    for field_name, field in cls.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {choice.upper() for choice in alias.choices if isinstance(choice, str)}
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add(f"{prefix}{field_name}".upper())
    return names


def default_port(service: str) -> int:
    return SETTINGS[service].model_fields["port"].default


def render_kustomization(directory: Path) -> str | None:
    """`kubectl kustomize DIR` (or `kustomize build DIR`); None when neither is installed."""
    for command in (["kubectl", "kustomize"], ["kustomize", "build"]):
        if shutil.which(command[0]):
            proc = subprocess.run([*command, str(directory)],
                                  capture_output=True, text=True, timeout=60, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} {directory} failed:\n{proc.stderr}")
            return proc.stdout
    return None


def _render_with_tool(overlay: str) -> str | None:
    return render_kustomization(K8S_DIR / "overlays" / overlay)


@functools.cache
def rendered_overlays() -> dict[str, list[Doc]] | None:
    """{"cpu": docs, "gpu": docs}, or None when no renderer is available."""
    rendered_dir = os.environ.get("KVCACHE_RENDERED_DIR")
    if rendered_dir:
        return {name: load_docs(Path(rendered_dir) / f"{name}.yaml") for name in OVERLAYS}
    texts = {name: _render_with_tool(name) for name in OVERLAYS}
    if any(text is None for text in texts.values()):
        return None
    return {name: [d for d in yaml.safe_load_all(text) if d] for name, text in texts.items()}


@functools.cache
def raw_base() -> list[Doc]:
    kustomization = load_docs(K8S_DIR / "base" / "kustomization.yaml")[0]
    docs = []
    for resource in kustomization["resources"]:
        docs.extend(load_docs(K8S_DIR / "base" / resource))
    return docs


def manifest_sets() -> dict[str, list[Doc]]:
    """The manifests the Kubernetes tests run against: rendered overlays, else the raw base."""
    return rendered_overlays() or {"base": raw_base()}


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def workloads(docs: list[Doc]) -> list[Doc]:
    """The project's own services (coordinator, gateway, worker); Redis is not one of them."""
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"] in SETTINGS]


def find_workload(docs: list[Doc], name: str) -> Doc:
    return next(d for d in docs if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"] == name)


def pod_spec(workload: Doc) -> Doc:
    return workload["spec"]["template"]["spec"]


def only_container(workload: Doc) -> Doc:
    containers = pod_spec(workload)["containers"]
    assert len(containers) == 1, workload["metadata"]["name"]
    return containers[0]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def _substitute(value: str, resolved: dict[str, str]) -> str:
    # Kubernetes expands $(VAR) from variables defined earlier in the same list.
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: resolved.get(m.group(1), m.group(0)), value)


_QUANTITY_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                   "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity_bytes(quantity: str | int) -> int:
    """A Kubernetes memory or storage quantity ("5Gi", "512Mi", "4G", 1024) in bytes."""
    match = re.fullmatch(r"(\d+)([kMGT]i?)?", str(quantity))
    assert match, f"unsupported quantity: {quantity}"
    return int(match.group(1)) * _QUANTITY_UNITS[match.group(2) or ""]


def redis_bytes(value: str) -> int:
    """redis.conf's memory units: 1gb = 2**30 bytes, 1g = 10**9 (case-insensitive)."""
    match = re.fullmatch(r"(\d+)(k|kb|m|mb|g|gb)?", value.lower())
    assert match, f"unsupported redis size: {value}"
    unit = match.group(2) or ""
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(unit[:1], 1)
    return int(match.group(1)) * (2 ** (10 * "kmg".index(unit[0]) + 10) if unit.endswith("b") else scale)


def _cpu_count(quantity: str) -> str:
    cores = float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)
    return str(math.ceil(cores))


def _value_from(source: Doc, docs: list[Doc], pod_name: str, namespace: str,
                container: Doc) -> str:
    if "configMapKeyRef" in source:
        ref = source["configMapKeyRef"]
        return find(docs, "ConfigMap", ref["name"])["data"][ref["key"]]
    if "fieldRef" in source:
        return {"metadata.name": pod_name,
                "metadata.namespace": namespace}[source["fieldRef"]["fieldPath"]]
    if "secretKeyRef" in source:
        ref = source["secretKeyRef"]
        assert ref["name"] == SECRET_NAME and ref["key"] in SECRET_KEYS, ref
        return f"stand-in-{ref['key']}"
    if "resourceFieldRef" in source:
        ref = source["resourceFieldRef"]
        assert ref["resource"] == "limits.cpu" and str(ref.get("divisor", "1")) == "1", ref
        return _cpu_count(str(container["resources"]["limits"]["cpu"]))
    raise AssertionError(f"unsupported valueFrom: {source}")


def resolve_env(container: Doc, docs: list[Doc], pod_name: str,
                namespace: str = NAMESPACE) -> dict[str, str]:
    """What the container's process sees: envFrom ConfigMaps, then env in order."""
    resolved: dict[str, str] = {}
    for source in container.get("envFrom", []):
        resolved.update(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for entry in container.get("env", []):
        if "valueFrom" in entry:
            resolved[entry["name"]] = _value_from(entry["valueFrom"], docs, pod_name, namespace,
                                                  container)
        else:
            resolved[entry["name"]] = _substitute(str(entry.get("value", "")), resolved)
    return resolved


def sample_pod_name(workload: Doc, ordinal: int = 0) -> str:
    name = workload["metadata"]["name"]
    return f"{name}-{ordinal}" if workload["kind"] == "StatefulSet" else f"{name}-7d9f8b6c5-x2x4z"


@functools.cache
def _app(service: str):
    """The real app of `service`, built but not started (no model is loaded)."""
    module = importlib.import_module(f"services.{service}.app")
    return module.create_app(SETTINGS[service]())


def serves(service: str, path: str, method: str = "GET") -> bool:
    """Whether the service's app has a route for `method path` (the router's own matching)."""
    scope = {"type": "http", "method": method, "path": path, "root_path": "",
             "query_string": b"", "headers": []}
    return any(route.matches(scope)[0] == Match.FULL for route in _app(service).router.routes)


def load_compose() -> Doc:
    with (REPO_ROOT / "docker-compose.yml").open() as fh:
        return yaml.safe_load(fh)


def interpolate_compose(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR} with an empty environment."""
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}",
                  lambda m: m.group(2) or "", value)
