"""schemathesis (`st run --checks all`) against a live gateway on loopback, in front of a real
coordinator and a tiny-gpt2 worker: every route of /openapi.json is fuzzed with a bounded number of
examples, and no response may be a 5xx or differ from what the schema documents (status codes,
content types, bodies, SSE events, headers). Configuration: tests/e2e/schemathesis.toml."""

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import start_cluster

pytestmark = pytest.mark.e2e

CONFIG = Path(__file__).with_name("schemathesis.toml")
MAX_EXAMPLES = 30  # per operation and phase: about 950 requests, ~20 s here


@pytest.fixture(scope="module")
def fuzz_cluster(tmp_path_factory):
    """Its own cluster: the fuzzer's hundreds of sequences stay out of the other tests' counters."""
    cluster = start_cluster(tmp_path_factory.mktemp("fuzz"), num_workers=1)
    yield cluster
    cluster.stop()


def test_schemathesis_finds_no_server_error_and_no_conformance_failure(fuzz_cluster, tmp_path):
    st = Path(sys.executable).with_name("st")
    command = [str(st), "--config-file", str(CONFIG), "run", f"{fuzz_cluster.gateway_url}/openapi.json",
               "--checks", "all", "--max-examples", str(MAX_EXAMPLES), "--no-color",
               "--report", "junit", "--report-dir", str(tmp_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
    summary = run.stdout[-6000:]
    assert run.returncode == 0, f"schemathesis failed:\n{summary}\n{run.stderr[-2000:]}"
    assert "passed" in summary and "failure" not in summary, summary
    # The run reached generation on the /v1 routes, not only their 4xx paths (schemathesis.toml
    # names the served model in most examples).
    succeeded = _gateway_requests(fuzz_cluster.gateway_url, code_class="2xx")
    assert succeeded.get("chat_completions", 0) > 0 and succeeded.get("completions", 0) > 0, succeeded


def _gateway_requests(gateway_url: str, code_class: str) -> dict[str, float]:
    text = httpx.get(f"{gateway_url}/metrics", timeout=10).text
    family = next(f for f in text_string_to_metric_families(text) if f.name == "kvcache_gateway_requests")
    return {s.labels["endpoint"]: s.value for s in family.samples
            if s.name.endswith("_total") and s.labels["code_class"] == code_class}
