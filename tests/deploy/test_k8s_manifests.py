"""The Kubernetes manifests agree with the code: settings, ports, routes, worker DNS."""

import json
import os
import re
import shutil
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path
from unittest import mock
from urllib.parse import urlsplit

import pytest
import redis
import yaml

from services.localcluster import free_port
from tests.deploy.manifests import (
    GENERIC_ENV, K8S_DIR, NAMESPACE, REPO_ROOT, SECRET_KEYS, SECRET_NAME, SETTINGS, SUBSTITUTION_ONLY_ENV,
    default_port, find, find_workload, load_docs, manifest_sets, only_container, pod_spec, quantity_bytes,
    redis_bytes, render_kustomization, rendered_overlays, resolve_env, sample_pod_name, selects, serves, settings_env_names, workloads,
)
from services.worker.kv.tiers import RedisStore, open_shared_store

SETS = manifest_sets()
DASHBOARD_CONFIGMAP = "kvcache-grafana-dashboard"
WORKER_DNS = re.compile(r"^http://worker-\d+\.worker\.[a-z0-9-]+\.svc\.cluster\.local:8082$")
UVICORN_GRACEFUL_SHUTDOWN_S = 10


@pytest.fixture(params=sorted(SETS), ids=lambda name: f"manifests={name}")
def docs(request):
    return SETS[request.param]


def settings_from_env(cls, env):
    with mock.patch.dict(os.environ, env, clear=True):
        return cls()


def container_port(container, port):
    if isinstance(port, int):
        return port
    matches = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert matches, f"no container port named {port}"
    return matches[0]


def test_every_service_has_a_workload(docs):
    names = {w["metadata"]["name"] for w in workloads(docs)}
    assert names == set(SETTINGS)
    for workload in workloads(docs):
        assert only_container(workload)["name"] == workload["metadata"]["name"]


def test_env_vars_are_settings_of_their_service(docs):
    for workload in workloads(docs):
        service = workload["metadata"]["name"]
        container = only_container(workload)
        allowed = settings_env_names(SETTINGS[service]) | GENERIC_ENV | SUBSTITUTION_ONLY_ENV
        env = resolve_env(container, docs, sample_pod_name(workload))
        assert set(env) <= allowed, f"{service}: not settings: {sorted(set(env) - allowed)}"
        raw_values = " ".join(str(e.get("value", "")) for e in container.get("env", []))
        for name in SUBSTITUTION_ONLY_ENV & set(env):
            assert f"$({name})" in raw_values, f"{service}: {name} is set but never used"


def test_env_values_validate_as_settings(docs):
    for workload in workloads(docs):
        service = workload["metadata"]["name"]
        env = resolve_env(only_container(workload), docs, sample_pod_name(workload))
        settings = settings_from_env(SETTINGS[service], env)
        assert settings.host == "0.0.0.0", f"{service} must listen on all interfaces in a pod"


def test_container_port_is_the_settings_port(docs):
    for workload in workloads(docs):
        service = workload["metadata"]["name"]
        container = only_container(workload)
        env = resolve_env(container, docs, sample_pod_name(workload))
        port = settings_from_env(SETTINGS[service], env).port
        assert port == default_port(service)
        assert [p["containerPort"] for p in container["ports"]] == [port]


def test_probes_hit_real_routes_on_the_service_port(docs):
    readiness = {"coordinator": "/health", "gateway": "/health", "worker": "/ready"}
    for workload in workloads(docs):
        service = workload["metadata"]["name"]
        container = only_container(workload)
        probes = {kind: container[kind] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
        for kind, probe in probes.items():
            assert serves(service, probe["httpGet"]["path"]), f"{service} {kind}: no such route"
            assert container_port(container, probe["httpGet"]["port"]) == default_port(service)
        assert probes["livenessProbe"]["httpGet"]["path"] == "/health"
        assert probes["readinessProbe"]["httpGet"]["path"] == readiness[service]


def test_pods_are_annotated_for_prometheus_on_their_metrics_route(docs):
    for workload in workloads(docs):
        service = workload["metadata"]["name"]
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", service
        assert annotations["prometheus.io/port"] == str(default_port(service)), service
        assert serves(service, annotations["prometheus.io/path"]), service


def test_grafana_dashboard_is_a_configmap_for_the_sidecar():
    """The configMapGenerator ships k8s/base/dashboards/kvcache.json, labelled for Grafana's
    sidecar, under a fixed name; rendered, the ConfigMap holds the file as it is."""
    kustomization = load_docs(K8S_DIR / "base" / "kustomization.yaml")[0]
    [generator] = [g for g in kustomization["configMapGenerator"] if g["name"] == DASHBOARD_CONFIGMAP]
    assert generator["options"]["labels"]["grafana_dashboard"] == "1"
    assert generator["options"]["disableNameSuffixHash"] is True
    [path] = generator["files"]
    text = (K8S_DIR / "base" / path).read_text()
    assert json.loads(text)["uid"] == "kvcache-overview"
    for docs in (rendered_overlays() or {}).values():
        configmap = find(docs, "ConfigMap", DASHBOARD_CONFIGMAP)
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert configmap["data"] == {Path(path).name: text}


def test_prometheus_scrape_component_admits_only_the_monitoring_namespace_to_metrics_ports():
    component = K8S_DIR / "components" / "prometheus-scrape"
    assert load_docs(component / "kustomization.yaml")[0]["kind"] == "Component"
    policies = load_docs(component / "networkpolicies.yaml")
    assert {p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for p in policies} == \
        {"coordinator", "worker"}  # the gateway is open to all already
    for policy in policies:
        service = policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
        assert policy["metadata"]["namespace"] == NAMESPACE
        assert policy["spec"]["ingress"] == [{
            "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
            "ports": [{"protocol": "TCP", "port": default_port(service)}]}]


def test_route_matching_tells_routes_apart():
    assert serves("worker", "/ready") and serves("coordinator", "/route/seq-1")
    assert not serves("gateway", "/ready")
    assert not serves("worker", "/health", method="POST")


def test_worker_startup_probe_allows_model_loading(docs):
    probe = only_container(find(docs, "StatefulSet", "worker"))["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 300


def test_shutdown_leaves_time_to_deregister_and_drain(docs):
    for workload in workloads(docs):
        spec = pod_spec(workload)
        pre_stop = only_container(workload).get("lifecycle", {}).get("preStop", {})
        sleep_s = pre_stop.get("sleep", {}).get("seconds", 0)
        grace_s = spec.get("terminationGracePeriodSeconds", 30)
        assert grace_s > sleep_s + UVICORN_GRACEFUL_SHUTDOWN_S, workload["metadata"]["name"]
    assert only_container(find(docs, "StatefulSet", "worker"))["lifecycle"]["preStop"]


def test_services_select_pods_and_target_their_ports(docs):
    for service in (d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] in SETTINGS):
        name = service["metadata"]["name"]
        workload = next(w for w in workloads(docs)
                        if selects(service["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"]))
        assert workload["metadata"]["name"] == name
        for port in service["spec"]["ports"]:
            assert container_port(only_container(workload), port["targetPort"]) == default_port(name)


def test_gateway_is_a_load_balancer_on_port_80(docs):
    service = find(docs, "Service", "gateway")
    assert service["spec"]["type"] == "LoadBalancer"
    assert [p["port"] for p in service["spec"]["ports"]] == [80]
    assert find(docs, "Service", "coordinator")["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_coordinator_url_is_the_coordinator_service(docs):
    service = find(docs, "Service", "coordinator")
    for workload in workloads(docs):
        env = resolve_env(only_container(workload), docs, sample_pod_name(workload))
        for name, value in env.items():
            if name.endswith("_COORDINATOR_URL"):
                url = urlsplit(value)
                assert url.hostname in ("coordinator", f"coordinator.{NAMESPACE}.svc.cluster.local")
                assert url.port in [p["port"] for p in service["spec"]["ports"]]


def test_single_coordinator_replaced_not_rolled(docs):
    deployment = find(docs, "Deployment", "coordinator")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"


def test_worker_advertises_its_headless_service_dns_name(docs):
    statefulset = find(docs, "StatefulSet", "worker")
    service = find(docs, "Service", "worker")
    assert statefulset["spec"]["serviceName"] == "worker"
    assert service["spec"]["clusterIP"] == "None"
    assert selects(service["spec"]["selector"], statefulset["spec"]["template"]["metadata"]["labels"])
    container = only_container(statefulset)
    env_list = container["env"]
    names = [e["name"] for e in env_list]
    by_name = {e["name"]: e for e in env_list}
    assert by_name["WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert by_name["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert by_name["WORKER_ADVERTISE_ADDRESS"]["value"] == (
        "http://$(WORKER_ID).worker.$(POD_NAMESPACE).svc.cluster.local:8082")
    assert names.index("WORKER_ADVERTISE_ADDRESS") > max(names.index("WORKER_ID"), names.index("POD_NAMESPACE"))
    for ordinal in range(statefulset["spec"]["replicas"] + 1):
        pod = f"worker-{ordinal}"
        settings = settings_from_env(SETTINGS["worker"], resolve_env(container, docs, pod))
        assert settings.worker_id == pod
        assert settings.advertise_address == f"http://{pod}.worker.{NAMESPACE}.svc.cluster.local:{settings.port}"
        assert WORKER_DNS.match(settings.advertise_address)


def test_worker_model_cache_and_hf_home_are_on_writable_volumes(docs):
    statefulset = find(docs, "StatefulSet", "worker")
    container = only_container(statefulset)
    volumes = {v["name"]: v for v in pod_spec(statefulset)["volumes"]}
    mounts = [m["mountPath"] for m in container["volumeMounts"]
              if "emptyDir" in volumes[m["name"]] or "persistentVolumeClaim" in volumes[m["name"]]]
    env = resolve_env(container, docs, "worker-0")
    settings = settings_from_env(SETTINGS["worker"], env)
    for path in (str(settings.model_cache_dir), env["HF_HOME"]):
        assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts), path


def test_containers_are_locked_down(docs):
    for workload in workloads(docs):
        name = workload["metadata"]["name"]
        spec = pod_spec(workload)
        container = only_container(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["automountServiceAccountToken"] is False, name
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, name
        assert security["allowPrivilegeEscalation"] is False, name
        assert security["capabilities"]["drop"] == ["ALL"], name
        assert "/tmp" in [m["mountPath"] for m in container["volumeMounts"]], name
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][bound]), (name, bound)


def test_gateway_autoscales_on_cpu(docs):
    hpa = find(docs, "HorizontalPodAutoscaler", "gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}


def test_every_workload_has_a_disruption_budget(docs):
    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    for workload in workloads(docs):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert any(selects(b["spec"]["selector"]["matchLabels"], labels) for b in budgets), \
            workload["metadata"]["name"]


def test_network_policies_expose_only_the_gateway(docs):
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert any(p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]
               and p["spec"]["policyTypes"] == ["Ingress"] for p in policies), "no default deny"
    for workload in workloads(docs):
        name = workload["metadata"]["name"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        rules = [rule for p in policies if p["spec"]["podSelector"]
                 and selects(p["spec"]["podSelector"]["matchLabels"], labels)
                 for rule in p["spec"].get("ingress", [])]
        assert rules, f"nothing may reach {name}"
        for rule in rules:
            assert [p["port"] for p in rule["ports"]] == [default_port(name)]
            if name == "gateway":
                assert "from" not in rule
            else:  # workers: requests and KV pulls; coordinator: routes, register, heartbeat
                assert rule["from"] == [pods_named("gateway"), pods_named("worker")], rule


def pods_named(name: str) -> dict:
    return {"podSelector": {"matchLabels": {"app.kubernetes.io/name": name}}}


def test_only_workers_reach_the_session_store(docs):
    store = find_workload(docs, "redis")
    labels = store["spec"]["template"]["metadata"]["labels"]
    rules = [rule for p in docs if p["kind"] == "NetworkPolicy" and p["spec"]["podSelector"]
             and selects(p["spec"]["podSelector"]["matchLabels"], labels) for rule in p["spec"]["ingress"]]
    assert rules == [{"from": [pods_named("worker")], "ports": [{"protocol": "TCP", "port": 6379}]}]


def test_session_store_is_durable_private_and_unprivileged(docs):
    store = find_workload(docs, "redis")
    container = only_container(store)
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "everysec"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    password = next(e for e in container["env"] if e["name"] == "REDIS_PASSWORD")
    assert password["valueFrom"]["secretKeyRef"] == {"name": "kvcache-secrets", "key": "redis-password"}
    [claim] = store["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"  # never drop a conversation
    assert container["livenessProbe"] and container["readinessProbe"]
    spec = pod_spec(store)
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    service = find(docs, "Service", "redis")
    assert [p["port"] for p in service["spec"]["ports"]] == [6379]
    labels = store["spec"]["template"]["metadata"]["labels"]
    assert selects(service["spec"]["selector"], labels)
    assert any(selects(b["spec"]["selector"]["matchLabels"], labels)
               for b in docs if b["kind"] == "PodDisruptionBudget")


def require_redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not on PATH: Redis tests are mandatory in CI")
        pytest.skip("redis-server is not on PATH (apt-get install redis-server)")
    return path


def start_redis_as_in_the_manifest(container, env, port, data_dir) -> subprocess.Popen:
    """The container's own command line, on a loopback port, in a temporary directory (its --dir
    if it has one)."""
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg) for arg in container["args"]]
    data_dir.mkdir()
    if "--dir" in args:
        args[args.index("--dir") + 1] = str(data_dir)
    command = [require_redis_server(), *args, "--port", str(port), "--bind", "127.0.0.1"]
    assert container["command"] == ["redis-server"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=data_dir)
    deadline = time.monotonic() + 10
    while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).returncode != 0:
        assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.05)
    return proc


def test_session_store_runs_as_configured_and_workers_can_log_in(docs, tmp_path):
    """Runs the Redis container's command line on a real redis-server, then its readiness probe
    and the workers' session store URL against it."""
    redis_workload = find_workload(docs, "redis")
    container = only_container(redis_workload)
    env = resolve_env(container, docs, "redis-0")
    port = free_port()
    proc = start_redis_as_in_the_manifest(container, env, port, tmp_path / "data")
    try:
        shim = tmp_path / "bin"  # the probe's redis-cli, pointed at this port
        shim.mkdir()
        (shim / "redis-cli").write_text(f'#!/bin/sh\nexec {shutil.which("redis-cli")} -p {port} "$@"\n')
        (shim / "redis-cli").chmod(0o755)
        probe = container["readinessProbe"]["exec"]["command"]
        probe_env = {**env, "PATH": f"{shim}:/usr/bin:/bin"}
        assert subprocess.run(probe, env=probe_env).returncode == 0
        assert subprocess.run(probe, env={**probe_env, "REDISCLI_AUTH": "wrong"}).returncode != 0

        worker = settings_from_env(SETTINGS["worker"],
                                   resolve_env(only_container(find_workload(docs, "worker")), docs, "worker-0"))
        url = urlsplit(worker.session_store_url)
        assert url.hostname.split(".")[0] == find(docs, "Service", "redis")["metadata"]["name"]
        with redis.Redis.from_url(url._replace(netloc=f":{url.password}@127.0.0.1:{port}").geturl()) as client:
            assert client.ping()
            config = client.config_get("*")
        assert (config["appendonly"], config["appendfsync"]) == ("yes", "everysec")
        assert config["maxmemory-policy"] == "noeviction" and int(config["maxmemory"]) > 0
        with redis.Redis(port=port) as anonymous, pytest.raises(redis.AuthenticationError):
            anonymous.ping()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


KV_STORE = "redis-kv"
# RAM of a worker process beyond its KV (torch, the model, a CUDA context): the memory request
# must hold the KV kept in RAM plus this.
WORKER_PROCESS_RAM = 2 * 2**30


def worker_settings(docs, pod: str = "worker-0"):
    return settings_from_env(SETTINGS["worker"], resolve_env(only_container(find_workload(docs, "worker")), docs, pod))


def test_only_workers_reach_the_kv_store_and_it_is_not_the_session_store(docs):
    store = find_workload(docs, KV_STORE)
    labels = store["spec"]["template"]["metadata"]["labels"]
    rules = [rule for p in docs if p["kind"] == "NetworkPolicy" and p["spec"]["podSelector"]
             and selects(p["spec"]["podSelector"]["matchLabels"], labels) for rule in p["spec"]["ingress"]]
    assert rules == [{"from": [pods_named("worker")], "ports": [{"protocol": "TCP", "port": 6379}]}]
    session_labels = find_workload(docs, "redis")["spec"]["template"]["metadata"]["labels"]
    assert not selects(find(docs, "Service", KV_STORE)["spec"]["selector"], session_labels)
    assert not selects(find(docs, "Service", "redis")["spec"]["selector"], labels)
    settings = worker_settings(docs)
    kv_url, session_url = urlsplit(settings.kv_shared_url), urlsplit(settings.session_store_url)
    assert kv_url.scheme == "redis" and kv_url.hostname.split(".")[0] == KV_STORE
    assert kv_url.hostname != session_url.hostname  # never KV in the noeviction session store


def test_kv_store_is_a_bounded_cache_private_and_unprivileged(docs):
    store = find_workload(docs, KV_STORE)
    container = only_container(store)
    args = container["args"]
    assert (args[args.index("--save") + 1], args[args.index("--appendonly") + 1]) == ("", "no")
    assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    password = next(e for e in container["env"] if e["name"] == "REDIS_PASSWORD")
    assert password["valueFrom"]["secretKeyRef"] == {"name": SECRET_NAME, "key": "redis-password"}
    limit = quantity_bytes(container["resources"]["limits"]["memory"])
    # Headroom for fragmentation and the buffers of multi-MB values: never OOM-killed for data.
    assert 0 < redis_bytes(args[args.index("--maxmemory") + 1]) <= 0.8 * limit
    assert quantity_bytes(container["resources"]["requests"]["memory"]) == limit
    assert not pod_spec(store).get("volumes") and not container.get("volumeMounts")  # nothing persisted
    assert container["livenessProbe"] and container["readinessProbe"]
    spec = pod_spec(store)
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    labels = store["spec"]["template"]["metadata"]["labels"]
    service = find(docs, "Service", KV_STORE)
    assert [p["port"] for p in service["spec"]["ports"]] == [6379] and selects(service["spec"]["selector"], labels)
    assert any(selects(b["spec"]["selector"]["matchLabels"], labels)
               for b in docs if b["kind"] == "PodDisruptionBudget")


def test_kv_store_runs_as_configured_and_evicts_chunks_rather_than_refusing_them(docs, tmp_path):
    """The KV Redis's command line on a real redis-server, written to by the worker's own shared
    store at the worker's WORKER_KV_SHARED_URL: chunks expire after the TTL, and a full store
    drops the least recently used instead of failing the write (as the session store would)."""
    container = only_container(find_workload(docs, KV_STORE))
    env = resolve_env(container, docs, "redis-kv-0")
    port = free_port()
    proc = start_redis_as_in_the_manifest(container, env, port, tmp_path / "data")
    try:
        settings = worker_settings(docs)
        url = urlsplit(settings.kv_shared_url)
        local_url = url._replace(netloc=f":{url.password}@127.0.0.1:{port}").geturl()
        store = open_shared_store(local_url, settings.kv_shared_ttl_s, settings.kv_shared_bytes)
        assert isinstance(store, RedisStore)
        chunk = os.urandom(2**20)
        keys = [f"{i:032x}" for i in range(40)]
        store.put(keys[0], chunk)
        assert store.get(keys[0]) == chunk
        with redis.Redis.from_url(local_url) as client:
            config = client.config_get("*")
            args = container["args"]
            assert (config["save"], config["appendonly"]) == ("", "no")
            assert config["maxmemory-policy"] == "allkeys-lru"
            assert int(config["maxmemory"]) == redis_bytes(args[args.index("--maxmemory") + 1])
            assert 0 < client.ttl(RedisStore.PREFIX + keys[0]) <= settings.kv_shared_ttl_s
            # Fill it: room for about 16 chunks beyond what it holds now.
            client.config_set("maxmemory", client.info("memory")["used_memory"] + 16 * 2**20)
            for key in keys[1:]:
                store.put(key, chunk)  # raises on an OOM error reply (noeviction)
            assert client.info("stats")["evicted_keys"] > 0
        held = store.contains(keys)  # Redis's LRU is sampled: which older chunks went varies
        assert held[-1] and sum(held) < len(keys)
        with redis.Redis(port=port) as anonymous, pytest.raises(redis.AuthenticationError):
            anonymous.ping()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_worker_disk_tier_has_a_bounded_volume_of_its_own(docs):
    statefulset = find(docs, "StatefulSet", "worker")
    container = only_container(statefulset)
    volumes = {v["name"]: v for v in pod_spec(statefulset)["volumes"]}
    settings = worker_settings(docs)
    env = resolve_env(container, docs, "worker-0")

    def under(path: str, mount: dict) -> bool:
        return path == mount["mountPath"] or path.startswith(mount["mountPath"].rstrip("/") + "/")

    [mount] = [m for m in container["volumeMounts"] if under(settings.kv_disk_dir, m)]
    others = (str(settings.model_cache_dir), env["HF_HOME"], "/tmp")
    assert not any(under(path, mount) for path in others), "the tier's volume must hold the tier alone"
    # The budget plus a chunk being written fits: over its sizeLimit the kubelet evicts the pod.
    size_limit = quantity_bytes(volumes[mount["name"]]["emptyDir"]["sizeLimit"])
    assert 0 < settings.kv_disk_bytes <= size_limit - 2**26
    resources = container["resources"]
    size_limits = sum(quantity_bytes(v["emptyDir"]["sizeLimit"]) for v in volumes.values() if "emptyDir" in v)
    assert size_limits <= quantity_bytes(resources["limits"]["ephemeral-storage"])
    assert settings.kv_disk_bytes < quantity_bytes(resources["requests"]["ephemeral-storage"])


def test_worker_memory_request_holds_the_kv_kept_in_ram(docs):
    container = only_container(find(docs, "StatefulSet", "worker"))
    settings = worker_settings(docs)
    if settings.device.startswith("cuda"):
        # -1 would be a quarter of the node's RAM whatever the pod's limit, pinned (unreclaimable).
        assert settings.kv_host_bytes >= 0
        in_ram = settings.kv_host_bytes
    else:
        # Device KV is RAM (0 would be a fraction of the node's); the host tier only stages.
        assert settings.kv_cache_bytes > 0 and settings.kv_host_bytes == -1
        in_ram = settings.kv_cache_bytes
    request = quantity_bytes(container["resources"]["requests"]["memory"])
    assert in_ram + WORKER_PROCESS_RAM <= request <= quantity_bytes(container["resources"]["limits"]["memory"])


def terraform_variable_default(name: str) -> str:
    variables_tf = (REPO_ROOT / "infra" / "variables.tf").read_text()
    return re.search(rf'variable "{name}" {{.*?default\s*=\s*"?([^"\n]+)"?\n', variables_tf, re.S).group(1)


def test_kv_bucket_is_granted_to_the_workers_service_account_only(docs):
    """infra/kv_bucket.tf names the workers' Kubernetes service account and namespace as its
    Workload Identity principal; its lifecycle rule's age is the workers' TTL."""
    bucket_tf = (REPO_ROOT / "infra" / "kv_bucket.tf").read_text()
    variable_default = terraform_variable_default
    [account] = re.findall(r'kv_worker_service_account\s*=\s*"([^"]+)"', bucket_tf)
    [member] = re.findall(r'member\s*=\s*"([^"]+)"', bucket_tf)
    assert member.endswith("/subject/ns/${var.k8s_namespace}/sa/${local.kv_worker_service_account}")
    assert variable_default("k8s_namespace") == NAMESPACE
    assert re.findall(r'role\s*=\s*"([^"]+)"', bucket_tf) == ["roles/storage.objectUser"]
    statefulset = find(docs, "StatefulSet", "worker")
    assert pod_spec(statefulset)["serviceAccountName"] == account
    assert find(docs, "ServiceAccount", account)["automountServiceAccountToken"] is False
    runs_as = [w["metadata"]["name"] for w in docs if w["kind"] in ("Deployment", "StatefulSet")
               and pod_spec(w).get("serviceAccountName") == account]
    assert runs_as == ["worker"]
    assert re.search(r"condition\s*{\s*age\s*=\s*var\.kv_ttl_days\s*}", bucket_tf)
    assert int(variable_default("kv_ttl_days")) * 86400 == worker_settings(docs).kv_shared_ttl_s


def test_documented_bucket_overlay_points_the_workers_at_the_bucket():
    """The kustomization in DEPLOYMENT.md's "KV tiers", rendered as a user would (from a
    directory under k8s/): the workers' shared tier is a gs:// URL in the form of Terraform's
    kv_shared_url output, with the bucket's TTL, and the cache Redis is gone."""
    if shutil.which("kubectl") is None and shutil.which("kustomize") is None:
        pytest.skip("needs kubectl or kustomize")
    guide = (REPO_ROOT / "infra" / "DEPLOYMENT.md").read_text()
    section = guide[guide.index("\n## KV tiers"):guide.index("\n## Troubleshooting")]
    [block] = re.findall(r"```yaml\n(.*?)```", section, re.S)
    workdir = Path(tempfile.mkdtemp(prefix=".deploy-test-", dir=K8S_DIR))  # git-ignored
    try:
        (workdir / "kustomization.yaml").write_text(textwrap.dedent(block))
        docs = [d for d in yaml.safe_load_all(render_kustomization(workdir)) if d]
    finally:
        shutil.rmtree(workdir)
    assert not [d for d in docs if d["metadata"]["name"] == KV_STORE and d["kind"] in ("Deployment", "Service")]
    settings = worker_settings(docs)
    outputs_tf = (REPO_ROOT / "infra" / "outputs.tf").read_text()
    [output] = re.findall(r'"(gs://\$\{google_storage_bucket\.kv\[0\]\.name\}[^"]*)"', outputs_tf)
    url = urlsplit(settings.kv_shared_url)
    assert (url.scheme, url.path) == ("gs", urlsplit(output.replace("${google_storage_bucket.kv[0].name}", "b")).path)
    assert settings.kv_shared_bytes > 0
    assert settings.kv_shared_ttl_s == int(terraform_variable_default("kv_ttl_days")) * 86400


def test_memorystore_session_store_never_evicts():
    """Memorystore defaults to volatile-lru, which would drop sessions (all have a TTL) when full."""
    memorystore_tf = (REPO_ROOT / "infra" / "memorystore.tf").read_text()
    assert re.findall(r'"maxmemory-policy"\s*=\s*"([^"]+)"', memorystore_tf) == ["noeviction"]


def test_secret_keys_are_created_as_documented_and_never_committed(docs):
    refs = {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for w in docs if w["kind"] in ("Deployment", "StatefulSet")
            for c in pod_spec(w)["containers"] for e in c.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})}
    assert refs == {(SECRET_NAME, key) for key in SECRET_KEYS}
    guide = (REPO_ROOT / "infra" / "DEPLOYMENT.md").read_text()
    [create] = re.findall(rf"create secret generic {SECRET_NAME}((?:.*\\\n)*.*)", guide)
    assert set(re.findall(r"--from-literal=([\w-]+)=", create)) == SECRET_KEYS
    assert not [d for d in docs if d["kind"] == "Secret"], "secret values must not be in the manifests"


def test_gateway_takes_its_api_keys_from_the_secret_if_there(docs):
    container = only_container(find_workload(docs, "gateway"))
    [entry] = [e for e in container["env"] if e["name"] == "GATEWAY_API_KEYS"]
    assert entry["valueFrom"]["secretKeyRef"]["optional"] is True  # a Secret without it: open gateway
    settings = settings_from_env(SETTINGS["gateway"], resolve_env(container, docs, "gateway-0"))
    assert settings.api_keys.get_secret_value() == "stand-in-gateway-api-keys"


def test_workers_use_the_session_store_and_drain_within_their_grace_period(docs):
    worker = find_workload(docs, "worker")
    container = only_container(worker)
    settings = settings_from_env(SETTINGS["worker"], resolve_env(container, docs, "worker-0"))
    assert settings.session_store_url == \
        "redis://:stand-in-redis-password@redis.kvcache.svc.cluster.local:6379/0"
    assert settings.internal_token.get_secret_value() == "stand-in-internal-token"
    coordinator = settings_from_env(SETTINGS["coordinator"],
                                    resolve_env(only_container(find_workload(docs, "coordinator")), docs,
                                                "coordinator-0"))
    assert coordinator.internal_token.get_secret_value() == "stand-in-internal-token"  # the same key
    gateway = settings_from_env(SETTINGS["gateway"], resolve_env(only_container(find_workload(docs, "gateway")),
                                                                 docs, "gateway-0"))
    assert gateway.internal_token.get_secret_value() == "stand-in-internal-token"
    assert pod_spec(worker)["terminationGracePeriodSeconds"] > settings.drain_timeout_s + 5
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["python", "-m", "services.worker.prestop"]
    assert serves("worker", "/internal/drain", "POST")


@pytest.mark.skipif(rendered_overlays() is None, reason="needs kubectl/kustomize or KVCACHE_RENDERED_DIR")
def test_gpu_overlay_puts_workers_on_gpus():
    for overlay, docs in rendered_overlays().items():
        statefulset = find(docs, "StatefulSet", "worker")
        container = only_container(statefulset)
        spec = pod_spec(statefulset)
        env = resolve_env(container, docs, "worker-0")
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        if overlay == "gpu":
            assert gpus == 1
            assert spec["nodeSelector"]["cloud.google.com/gke-accelerator"] == "nvidia-tesla-t4"
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
            assert env["WORKER_DEVICE"] == "cuda"
            assert container["image"].split(":")[0].endswith("/worker-cuda")
        else:
            assert gpus is None and "tolerations" not in spec
            assert env["WORKER_DEVICE"] == "cpu"
        assert spec["nodeSelector"]["kvcache-pool"] == "worker"
        for name in ("coordinator", "gateway"):
            assert pod_spec(find(docs, "Deployment", name))["nodeSelector"] == {"kvcache-pool": "general"}


def test_raw_yaml_files_parse_and_kustomizations_resolve():
    files = sorted(K8S_DIR.rglob("*.yaml"))
    assert files
    for path in files:
        docs = load_docs(path)
        assert docs and all("apiVersion" in d and "kind" in d for d in docs), path
        for doc in docs:
            if doc["kind"] in ("Kustomization", "Component"):
                refs = doc.get("resources", []) + doc.get("components", [])
                refs += [p["path"] for p in doc.get("patches", []) if "path" in p]
                for ref in refs:
                    assert (path.parent / ref).exists(), f"{path}: missing {ref}"


def test_overlay_patches_set_only_settings():
    for path in sorted((K8S_DIR / "overlays").rglob("*.yaml")) + sorted((K8S_DIR / "components").rglob("*.yaml")):
        for doc in load_docs(path):
            template = doc.get("spec", {}).get("template", {}).get("spec", {})
            for container in template.get("containers", []):
                allowed = settings_env_names(SETTINGS[container["name"]]) | GENERIC_ENV
                names = {e["name"] for e in container.get("env", [])}
                assert names <= allowed, f"{path}: {sorted(names - allowed)}"


def render_with_component(component: str) -> list:
    """k8s/overlays/cpu with the component added, rendered as a user would (from under k8s/)."""
    if shutil.which("kubectl") is None and shutil.which("kustomize") is None:
        pytest.skip("needs kubectl or kustomize")
    workdir = Path(tempfile.mkdtemp(prefix=".deploy-test-", dir=K8S_DIR))  # git-ignored
    try:
        (workdir / "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            f"resources:\n  - ../overlays/cpu\ncomponents:\n  - ../components/{component}\n")
        return [d for d in yaml.safe_load_all(render_kustomization(workdir)) if d]
    finally:
        shutil.rmtree(workdir)


def test_kubernetes_membership_component_lets_only_the_coordinator_watch_worker_endpointslices():
    """The coordinator alone runs as an account bound to a read-only Role on EndpointSlices in
    its namespace, with its token mounted, and watches the worker Service by the names the
    workers' Service and DNS use."""
    docs = render_with_component("kubernetes-membership")
    coordinator = find_workload(docs, "coordinator")
    spec = pod_spec(coordinator)
    account = spec["serviceAccountName"]
    assert spec["automountServiceAccountToken"] is True
    assert find(docs, "ServiceAccount", account)["automountServiceAccountToken"] is False
    [binding] = [d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")
                 and {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE} in d["subjects"]]
    assert binding["kind"] == "RoleBinding" and binding["roleRef"]["kind"] == "Role"
    role = find(docs, "Role", binding["roleRef"]["name"])
    assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                              "verbs": ["get", "list", "watch"]}]
    others = [w for w in docs if w["kind"] in ("Deployment", "StatefulSet") and w is not coordinator]
    assert all(pod_spec(w).get("serviceAccountName") != account for w in others)
    assert all(pod_spec(w)["automountServiceAccountToken"] is False for w in others)
    env = resolve_env(only_container(coordinator), docs, sample_pod_name(coordinator))
    settings = settings_from_env(SETTINGS["coordinator"], env)
    assert settings.membership == "kubernetes"
    service = find(docs, "Service", settings.k8s_service)
    assert service["spec"]["clusterIP"] == "None"
    assert settings.k8s_port_name in [p["name"] for p in service["spec"]["ports"]]
    # Addresses are formed as the workers advertise themselves (`dns`, cluster.local).
    worker_env = resolve_env(only_container(find_workload(docs, "worker")), docs, "worker-0")
    assert (settings.k8s_address, settings.k8s_cluster_domain) == ("dns", "cluster.local")
    assert worker_env["WORKER_ADVERTISE_ADDRESS"] == \
        f"http://worker-0.{settings.k8s_service}.{NAMESPACE}.svc.cluster.local:{service['spec']['ports'][0]['port']}"
