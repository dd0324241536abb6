# syntax=docker/dockerfile:1
# CPU images for the three services, from one multi-stage build with a target per service:
#   docker build --target coordinator -t kvcache/coordinator .   (also: gateway, worker)
# The build context is the repository root: pyproject.toml, README.md and services/.
# The CUDA worker is Dockerfile.cuda.

FROM python:3.11-slim-bookworm AS builder
# The CPU wheel index: PyPI's Linux torch wheel is the CUDA build and pulls GBs of CUDA libraries.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from its own index, so `pip install .` finds torch==2.13.0 already satisfied.
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
# [gcs]: gcsfs, for a shared KV tier in a Cloud Storage bucket (pyproject.toml). The project's
# own bounds pin it, as for every other dependency (DL3013 reads ".[gcs]" as an unpinned name).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[gcs]" && pip check

# One virtualenv for every target: the package depends on torch, so the gateway and coordinator
# images carry it too; the layers are shared, so a node pulls them once.
FROM python:3.11-slim-bookworm AS runtime
RUN groupadd --system --gid 10001 kvcache \
    && useradd --system --uid 10001 --gid kvcache --create-home --home-dir /home/kvcache \
       --shell /usr/sbin/nologin kvcache \
    && mkdir -p /var/cache/kvcache /var/lib/kvcache/kv-disk /var/lib/kvcache/kv-shared \
    && chown kvcache:kvcache /var/cache/kvcache /var/lib/kvcache/kv-disk /var/lib/kvcache/kv-shared
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/var/cache/kvcache/hf
WORKDIR /home/kvcache
USER 10001:10001

FROM runtime AS coordinator
ENV COORDINATOR_HOST=0.0.0.0 \
    COORDINATOR_PORT=8081
EXPOSE 8081
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8081/health', timeout=2)"]
CMD ["kvcache-coordinator"]

FROM runtime AS gateway
ENV GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2)"]
CMD ["kvcache-gateway"]

FROM runtime AS worker
# Presets are built here and Hugging Face downloads land in HF_HOME: mount a writable volume
# at /var/cache/kvcache when the root filesystem is read-only. Likewise the KV tiers' directories
# (WORKER_KV_DISK_DIR, and WORKER_KV_SHARED_URL when it is a directory): /var/lib/kvcache/kv-disk
# and kv-shared exist, owned by the service's user, so a new Docker volume mounted there is too.
ENV WORKER_HOST=0.0.0.0 \
    WORKER_PORT=8082 \
    WORKER_MODEL_CACHE_DIR=/var/cache/kvcache/models
EXPOSE 8082
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8082/health', timeout=2)"]
CMD ["kvcache-worker"]
