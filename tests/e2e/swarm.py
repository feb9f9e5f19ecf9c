"""Real processes on 127.0.0.1: a gateway and blockservers started with the `corolla` CLI, waited
for on their health routes, and always stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

CLI = [sys.executable, "-m", "shared.cli", "--log-level", "WARNING"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Swarm:
    def __init__(self, model: str, spans: list[str], log_dir: Path, gateway_args: list[str] = (),
                 blockserver_args: list[str] = (), model_name: str | None = None):
        self.model, self.spans = model, spans
        self.model_name = model_name or Path(model).name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_dir = log_dir
        self.gateway_args, self.blockserver_args = list(gateway_args), list(blockserver_args)
        self.gateway: subprocess.Popen | None = None
        self.blockservers: list[subprocess.Popen] = []

    def _spawn(self, name: str, args: list[str], nice: bool = False) -> subprocess.Popen:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        command = (["nice", "-n", "19"] if nice else []) + CLI + args
        with open(self.log_dir / f"{name}.log", "ab") as log:  # the child keeps its own descriptor
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    def start(self, timeout_s: float = 120) -> Swarm:
        common = ["--model", self.model, "--model-name", self.model_name]
        self.gateway = self._spawn("gateway", ["gateway", *common, "--port", str(self.port), *self.gateway_args])
        for span in self.spans:
            self.add_blockserver(span)
        self.wait_healthy(timeout_s)
        return self

    def add_blockserver(self, span: str | None, extra: list[str] = (), nice: bool = False,
                        port: int | None = None, gateways: list[str] | None = None) -> subprocess.Popen:
        """A blockserver serving `span` ('START:END'), or choosing its own when None."""
        port = port or free_port()
        where = ["--blocks", span] if span else []
        for url in gateways or [self.url]:
            where += ["--gateway", url]
        process = self._spawn(f"blockserver-{(span or 'auto').replace(':', '-')}-{len(self.blockservers)}", [
            "blockserver", "--model", self.model, "--model-name", self.model_name, *where,
            "--heartbeat-interval", "0.5", "--num-threads", "1", "--port", str(port),
            *self.blockserver_args, *extra], nice=nice)
        process.url = f"http://127.0.0.1:{port}"
        process.span = span
        self.blockservers.append(process)
        return process

    def wait_registered(self, count: int, timeout_s: float = 60) -> None:
        """Wait until `count` blockservers are in the registry."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if len(self.servers()) >= count:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{count} blockservers not registered within {timeout_s}s; logs in {self.log_dir}")

    def busy(self, span: str) -> subprocess.Popen:
        """The live blockserver of `span` that holds an open session."""
        for p in self.blockservers:
            if p.span == span and p.poll() is None:
                try:
                    if httpx.get(f"{p.url}/health", timeout=1).json().get("sessions"):
                        return p
                except httpx.HTTPError:
                    continue
        raise LookupError(f"no blockserver of {span} holds a session")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=5).json()

    def wait_healthy(self, timeout_s: float = 120) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for p in [self.gateway, *self.blockservers]:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[-12:-8]} exited with {p.returncode}; logs in {self.log_dir}")
            try:
                r = httpx.get(f"{self.url}/health", timeout=2)
                if r.status_code == 200:
                    return r.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"swarm not healthy within {timeout_s}s; logs in {self.log_dir}")

    def servers(self) -> list[dict]:
        return httpx.get(f"{self.url}/registry/servers", timeout=5).json()

    def stop(self) -> None:
        for p in [*self.blockservers, self.gateway]:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGCONT)  # a test may have stopped it
                p.send_signal(signal.SIGINT)
        for p in [*self.blockservers, self.gateway]:
            if p is None:
                continue
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
