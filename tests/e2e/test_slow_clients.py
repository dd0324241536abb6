"""The real gateway process cuts off slow clients, with the limits of its environment (the
mechanisms themselves: tests/unit/test_slow_clients.py). No coordinator is needed: the gateway
serves without one after its first-sync wait, and these requests end before routing."""

import json
import os
import subprocess
import sys

import pytest

from services.localcluster import free_port
from tests.support import connect, read_response, read_to_end, wait_until_healthy


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("slow-clients") / "gateway.log"
    env = {**os.environ, "GATEWAY_PORT": str(port), "GATEWAY_COORDINATOR_URL": f"http://127.0.0.1:{free_port()}",
           "GATEWAY_ALLOW_NO_INTERNAL_TOKEN": "true", "GATEWAY_HEADER_TIMEOUT_S": "1",
           "GATEWAY_BODY_TIMEOUT_S": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.gateway"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", proc)
        yield port, log_path
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_an_idle_connection_and_a_partial_head_are_closed(gateway):
    port, log_path = gateway
    with connect(port) as idle, connect(port) as partial:
        partial.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n")
        assert read_to_end(idle) == b"" and read_to_end(partial) == b""
    assert "no complete request head within 1.0 s" in log_path.read_text()


@pytest.mark.parametrize("path", ["/generate", "/v1/chat/completions"])
def test_a_partial_body_gets_408_in_the_routes_error_shape(gateway, path):
    port, _ = gateway
    with connect(port) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     "Content-Length: 100\r\n\r\n{\"prompt\": ".encode())
        status, _, body = read_response(sock)
    error = json.loads(body)["error"]
    assert status == 408
    if path.startswith("/v1"):  # OpenAI's shape
        assert error["type"] == "invalid_request_error" and error["code"] == "request_timeout"
    else:
        assert error["type"] == "request_timeout"
    assert "not received whole within 1.0 s" in error["message"]
