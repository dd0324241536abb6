"""A stopping coordinator answers the long polls of its routers at once (they then see it gone
and keep their last ring) instead of holding its exit until the polls' wait_s ends."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from services.localcluster import free_port
from tests.support import wait_until_healthy

pytestmark = pytest.mark.e2e


def test_sigterm_answers_a_waiting_long_poll_and_the_coordinator_exits(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "coordinator.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.coordinator"], stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "COORDINATOR_PORT": str(port),
                                     "COORDINATOR_INTERNAL_TOKEN": "shutdown-test"})
    try:
        wait_until_healthy(url, proc)
        first = httpx.get(f"{url}/ring", timeout=5).json()
        answers: list[httpx.Response] = []
        poll = threading.Thread(target=lambda: answers.append(httpx.get(
            f"{url}/ring", params={"after": first["version"], "instance": first["instance"], "wait_s": 60},
            timeout=90)))
        poll.start()
        time.sleep(0.5)  # the poll is waiting: nothing changes in an empty cluster
        assert answers == []
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        poll.join(timeout=30)
        assert answers and answers[0].status_code == 200
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
        assert time.monotonic() - sent < 10  # 10 s: uvicorn's grace for requests in progress
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_log_lines_queued_before_sigterm_are_written_before_the_process_ends(tmp_path):
    """Services write their log lines from a thread (the event loop only queues them); uvicorn
    re-raises SIGTERM once it has shut down, which ends the process: the queue is written first.
    Without that, the last lines raced the end of the process: lost in 2 of 3 runs here with the
    SIGCONT that systemd and timeout(1) send after the SIGTERM."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "coordinator.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.coordinator"], stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "COORDINATOR_PORT": str(port),
                                     "COORDINATOR_INTERNAL_TOKEN": "shutdown-test"})
    try:
        wait_until_healthy(url, proc)
        registered = httpx.post(f"{url}/register", json={"worker_id": "w1", "address": "http://w1:8000"},
                                headers={"Authorization": "Bearer shutdown-test"}, timeout=5)
        assert registered.status_code == 200
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)  # as systemd and timeout(1) send after it
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        lines = log_path.read_text().splitlines()
        joined = next(i for i, line in enumerate(lines) if "worker w1 join" in line)
        finished = next(i for i, line in enumerate(lines) if "Finished server process" in line)
        assert joined < finished == len(lines) - 1  # in order, and the last line uvicorn logs is there
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_line_logged_after_the_queue_is_written_out_is_written_too():
    """Once the server has written out the log queue (as it exits), later lines (another thread's
    at exit) go straight to stderr instead of into a queue nobody reads."""
    script = ("import logging\n"
              "from services.common.runner import configure_logging\n"
              "flush = configure_logging('info')\n"
              "logging.getLogger('t').info('queued line')\n"
              "flush()\n"
              "logging.getLogger('t').info('line after the flush')\n"
              "flush()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    lines = done.stderr.splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["queued line", "line after the flush"]
