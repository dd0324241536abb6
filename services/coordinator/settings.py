from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import StallWatchedSettings
from services.common.hash_ring import DEFAULT_VNODES


class CoordinatorSettings(StallWatchedSettings):
    """Environment variables: COORDINATOR_<FIELD>, e.g. COORDINATOR_VNODES=100."""

    model_config = SettingsConfigDict(env_prefix="COORDINATOR_")

    port: int = Field(8081, ge=1, le=65535)
    # Off here: a thousand workers' heartbeats are hundreds of lines a second (membership changes
    # are still logged, one line each).
    access_log: bool = False
    # Ring points per worker; fewer are cheaper and less even (README, "Control plane at scale").
    vnodes: int = Field(DEFAULT_VNODES, ge=1, le=65_536)
    ttl_s: float = Field(10.0, gt=0)
    sweep_interval_s: float = Field(1.0, gt=0)
    # How long earlier owners of a key stay listed in `previous` (KV handoff sources).
    handoff_window_s: float = Field(600.0, ge=0)
    # internal_token (COORDINATOR_INTERNAL_TOKEN, required to start): /register, /heartbeat,
    # /deregister and /drain require `Authorization: Bearer <token>`.

    # Who decides which workers are on the ring (README, "Membership: heartbeats or Kubernetes"):
    # `heartbeat`, the workers' own register/heartbeat calls, each alive while it beats within
    # ttl_s; `kubernetes`, the worker Service's EndpointSlices (each pod's readiness, watched),
    # heartbeats still carrying load and registrations the model's names.
    membership: Literal["heartbeat", "kubernetes"] = "heartbeat"
    # What `kubernetes` needs: the API server and the pod's service-account files (token, ca.crt,
    # namespace; the token is read again at each request, as the kubelet rotates it).
    k8s_api_url: str = "https://kubernetes.default.svc"
    k8s_serviceaccount_dir: str = "/var/run/secrets/kubernetes.io/serviceaccount"
    k8s_namespace: str = ""  # the workers'; empty: this pod's own (the namespace file)
    k8s_service: str = "worker"  # the workers' headless Service
    k8s_port_name: str = "http"  # the Service port whose number goes in a worker's address
    # `dns`: http://POD.SERVICE.NAMESPACE.svc.CLUSTER_DOMAIN:PORT, what workers advertise; `ip`:
    # the endpoint's address.
    k8s_address: Literal["dns", "ip"] = "dns"
    k8s_cluster_domain: str = "cluster.local"
    # The API server ends each watch after this long and the watcher resumes where it was.
    k8s_watch_timeout_s: int = Field(300, ge=1, le=3600)
