"""Every service refuses to start without the internal token, unless told to run open."""

import os
import subprocess
import sys

import pytest

from services.coordinator.settings import CoordinatorSettings
from services.gateway.settings import GatewaySettings
from services.worker.settings import WorkerSettings

SERVICES = [(CoordinatorSettings, "COORDINATOR_"), (GatewaySettings, "GATEWAY_"), (WorkerSettings, "WORKER_")]


@pytest.mark.parametrize("settings_class,prefix", SERVICES, ids=[p for _, p in SERVICES])
def test_no_token_is_refused_unless_allowed(settings_class, prefix, monkeypatch):
    for name in (f"{prefix}INTERNAL_TOKEN", f"{prefix}ALLOW_NO_INTERNAL_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as refusal:
        settings_class().check_internal_token()
    assert f"{prefix}INTERNAL_TOKEN is not set" in str(refusal.value)
    assert f"{prefix}ALLOW_NO_INTERNAL_TOKEN=true" in str(refusal.value)
    settings_class(internal_token="s3cret").check_internal_token()
    settings_class(allow_no_internal_token=True).check_internal_token()


def test_a_service_started_without_a_token_exits_with_the_reason():
    env = {k: v for k, v in os.environ.items() if "INTERNAL_TOKEN" not in k}
    result = subprocess.run([sys.executable, "-m", "services.coordinator"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert "COORDINATOR_INTERNAL_TOKEN is not set" in result.stderr


@pytest.mark.parametrize("settings_class,prefix", SERVICES, ids=[p for _, p in SERVICES])
def test_the_token_can_come_from_a_file(settings_class, prefix, monkeypatch, tmp_path):
    for name in (f"{prefix}INTERNAL_TOKEN", f"{prefix}ALLOW_NO_INTERNAL_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    token_file = tmp_path / "internal-token"
    token_file.write_text("from-a-file\n")
    monkeypatch.setenv(f"{prefix}INTERNAL_TOKEN_FILE", str(token_file))
    settings = settings_class()
    assert settings.internal_token.get_secret_value() == "from-a-file"
    settings.check_internal_token()
    assert settings_class(internal_token="given").internal_token.get_secret_value() == "given"  # it wins
    token_file.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        settings_class()
    monkeypatch.setenv(f"{prefix}INTERNAL_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="cannot read"):
        settings_class()
