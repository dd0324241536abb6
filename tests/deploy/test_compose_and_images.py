"""docker-compose.yml and the Dockerfiles agree with the code and with the k8s manifests."""

import os
import re
import subprocess
import tomllib
from unittest import mock
from urllib.parse import urlsplit

from tests.deploy.manifests import (
    GENERIC_ENV, REPO_ROOT, SETTINGS, default_port, find_workload, interpolate_compose, load_compose,
    only_container, raw_base, serves, settings_env_names, workloads,
)

HEALTHCHECK_URL = re.compile(r"http://127\.0\.0\.1:(\d+)(/[\w/]*)")


def service_kind(name: str) -> str:
    return "worker" if name.startswith("worker") else name


def compose_env(service: dict) -> dict[str, str]:
    return {k: interpolate_compose(str(v)) for k, v in service.get("environment", {}).items()}


def k8s_env_names() -> dict[str, set[str]]:
    return {w["metadata"]["name"]: {e["name"] for e in only_container(w).get("env", [])}
            for w in workloads(raw_base())}


def project_services() -> dict[str, dict]:
    """Compose services built from this repo (Redis is a stock image)."""
    return {n: s for n, s in load_compose()["services"].items() if "build" in s}


def test_compose_runs_every_service_with_two_workers():
    services = project_services()
    assert {"coordinator", "gateway"} <= set(services)
    assert len([name for name in services if service_kind(name) == "worker"]) >= 2
    for name, service in services.items():
        assert service["build"]["target"] == service_kind(name)


def test_compose_env_vars_are_settings_named_as_in_the_manifests():
    k8s_names = k8s_env_names()
    for name, service in project_services().items():
        kind = service_kind(name)
        env = compose_env(service)
        allowed = settings_env_names(SETTINGS[kind]) | GENERIC_ENV
        assert set(env) <= allowed, f"{name}: not settings: {sorted(set(env) - allowed)}"
        compose_only = {f"{kind.upper()}_INTERNAL_TOKEN_FILE"}  # Kubernetes has a Secret instead
        # The sweep budget of a directory shared tier; Kubernetes' shared tier is a Redis,
        # whose budget is its own --maxmemory.
        compose_only.add("WORKER_KV_SHARED_BYTES")
        assert set(env) - compose_only <= k8s_names[kind], \
            f"{name}: not in the manifests: {sorted(set(env) - compose_only - k8s_names[kind])}"
        env.pop(f"{kind.upper()}_INTERNAL_TOKEN_FILE")  # written by the internal-token service
        with mock.patch.dict(os.environ, env, clear=True):
            settings = SETTINGS[kind]()
        assert settings.host == "0.0.0.0" and settings.port == default_port(kind)


def test_compose_workers_advertise_their_service_names():
    services = load_compose()["services"]
    coordinator_port = default_port("coordinator")
    for name, service in services.items():
        env = compose_env(service)
        if service_kind(name) == "worker":
            assert env["WORKER_ID"] == name
            assert env["WORKER_ADVERTISE_ADDRESS"] == f"http://{name}:{default_port('worker')}"
        for key, value in env.items():
            if key.endswith("_COORDINATOR_URL"):
                assert (urlsplit(value).hostname, urlsplit(value).port) == ("coordinator", coordinator_port)


def duration_s(value: str) -> float:
    """Compose's durations as used here: 45s, 1m30s."""
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", value)
    assert parts and value, value
    return 60 * int(parts.group(1) or 0) + int(parts.group(2) or 0)


def test_compose_workers_share_the_redis_session_store():
    services = load_compose()["services"]
    store = services["redis"]
    command = store["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    assert any(volume.endswith(":/data") for volume in store["volumes"])
    password = interpolate_compose(command[command.index("--requirepass") + 1])
    assert interpolate_compose(store["environment"]["REDISCLI_AUTH"]) == password
    # The Kubernetes readiness probe's PONG check ($$ is Compose's escaped $).
    probe = only_container(find_workload(raw_base(), "redis"))["readinessProbe"]["exec"]["command"]
    assert [arg.replace("$$", "$") for arg in store["healthcheck"]["test"]] == ["CMD", *probe]
    for name, service in project_services().items():
        if service_kind(name) == "worker":
            env = compose_env(service)
            assert env["WORKER_SESSION_STORE_URL"] == f"redis://:{password}@redis:6379/0"
            assert service["depends_on"]["redis"]["condition"] == "service_healthy"
            # Compose sends SIGTERM, the worker drains, then exits before the SIGKILL.
            assert duration_s(service["stop_grace_period"]) > float(env["WORKER_DRAIN_TIMEOUT_S"]) + 5


def volume_at(service: dict, target: str) -> str:
    """The named volume a compose service mounts at `target` (short syntax SOURCE:TARGET)."""
    [source] = [v.split(":")[0] for v in service["volumes"] if isinstance(v, str) and v.split(":")[1] == target]
    return source


def test_compose_workers_share_a_kv_directory_and_each_has_its_own_disk_tier():
    compose = load_compose()
    workers = {n: s for n, s in project_services().items() if service_kind(n) == "worker"}
    shared, disks = set(), set()
    for name, service in workers.items():
        env = compose_env(service)
        env.pop("WORKER_INTERNAL_TOKEN_FILE")  # written by the internal-token service
        with mock.patch.dict(os.environ, env, clear=True):
            settings = SETTINGS["worker"]()
        assert "://" not in settings.kv_shared_url, "a directory: the workers of one host"
        shared.add(volume_at(service, settings.kv_shared_url))
        disks.add(volume_at(service, settings.kv_disk_dir))
        assert settings.kv_disk_bytes > 0 and settings.kv_shared_bytes > 0
    assert len(shared) == 1 and len(disks) == len(workers), (shared, disks)
    assert shared | disks <= set(compose["volumes"])
    # A new volume takes the ownership of the image's directory it is mounted on: the worker
    # image must have both, owned by the user it runs as (uid 10001), or the tiers cannot write.
    runtime = " ".join(dockerfile_stages(REPO_ROOT / "Dockerfile")["runtime"])
    [mkdir] = re.findall(r"mkdir -p ([^&]+)&& chown kvcache:kvcache ([^&]+?)(?:&&|$)", runtime)
    for path in (settings.kv_shared_url, settings.kv_disk_dir):
        assert path in mkdir[0].split() and path in mkdir[1].split(), path


def test_compose_makes_one_internal_token_for_every_service():
    services = load_compose()["services"]
    token_file = compose_env(services["coordinator"])["COORDINATOR_INTERNAL_TOKEN_FILE"]
    for name, service in project_services().items():  # one token, one file, for all of them
        prefix = service_kind(name).upper()
        env = compose_env(service)
        assert env[f"{prefix}_INTERNAL_TOKEN"] == ""  # unless $KVCACHE_INTERNAL_TOKEN is given
        assert env[f"{prefix}_INTERNAL_TOKEN_FILE"] == token_file
        mount = next(v for v in service["volumes"] if isinstance(v, dict) and v["source"] == "kvcache-secrets")
        assert mount["read_only"] and token_file.startswith(mount["target"] + "/")
        assert service["depends_on"]["internal-token"]["condition"] == "service_completed_successfully"
    maker = services["internal-token"]
    assert maker["volumes"] == [f"kvcache-secrets:{mount['target']}"]
    assert f"f={token_file};" in maker["command"][-1]


def test_the_compose_token_script_writes_one_random_token_and_keeps_it(tmp_path):
    """The internal-token service's shell script, run here by sh (chown aside: not root here)."""
    script = load_compose()["services"]["internal-token"]["command"][-1].replace("$$", "$")
    script = script.replace("/run/kvcache-secrets", str(tmp_path)).replace("chown 10001:10001", "true")
    for _ in range(2):
        subprocess.run(["sh", "-c", script], check=True, timeout=30)
    token = (tmp_path / "internal-token").read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token), token
    assert (tmp_path / "internal-token").stat().st_mode & 0o777 == 0o600
    (tmp_path / "internal-token").unlink()
    subprocess.run(["sh", "-c", script], check=True, timeout=30)
    assert (tmp_path / "internal-token").read_text() != token  # random each time it is made


def test_compose_healthchecks_hit_real_routes():
    for name, service in project_services().items():
        kind = service_kind(name)
        port, path = HEALTHCHECK_URL.search(" ".join(service["healthcheck"]["test"])).groups()
        assert int(port) == default_port(kind)
        assert serves(kind, path)
        for published in service.get("ports", []):
            assert published.endswith(f":{default_port(kind)}")


def dockerfile_stages(path):
    """{stage name: [instruction lines]}, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    stages, current = {}, None
    for line in text.splitlines():
        line = line.strip()
        if match := re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE):
            current = stages.setdefault(match.group(1), [])
        elif line and not line.startswith("#") and current is not None:
            current.append(line)
    return stages


def test_dockerfile_targets_match_settings_and_console_scripts():
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    targets = dockerfile_stages(REPO_ROOT / "Dockerfile")
    targets["worker-cuda"] = dockerfile_stages(REPO_ROOT / "Dockerfile.cuda")["worker"]
    for target, lines in targets.items():
        if target in ("builder", "runtime"):
            continue
        kind = service_kind(target)
        port = default_port(kind)
        assert f"EXPOSE {port}" in lines, target
        [healthcheck] = [line for line in lines if line.startswith("HEALTHCHECK")]
        assert HEALTHCHECK_URL.search(healthcheck).groups() == (str(port), "/health")
        [cmd] = [line for line in lines if line.startswith("CMD")]
        assert scripts[cmd.split('"')[1]] == f"services.{kind}.__main__:main"
    assert {"coordinator", "gateway", "worker"} <= set(targets)


def test_k8s_images_are_built_by_the_dockerfiles():
    targets = set(dockerfile_stages(REPO_ROOT / "Dockerfile"))
    for workload in workloads(raw_base()):
        image = only_container(workload)["image"]
        assert image.split(":")[0] == f"kvcache/{workload['metadata']['name']}"
        assert workload["metadata"]["name"] in targets
