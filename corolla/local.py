"""A swarm of real processes on this machine: a gateway and blockservers started with the
`corolla` command, waited for on their health routes, and always stopped. `corolla up`, the
end-to-end tests and the benchmarks all start swarms this way."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

CLI = [sys.executable, "-m", "corolla", "--log-level", "WARNING"]


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the parent dies (Linux), so that a swarm started
    in its own session never outlives the `corolla up` (or test) that started it."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSwarm:
    """`log_dir`: each process writes its own log file there; None: they share this terminal."""

    def __init__(self, model: str, log_dir: Path | None = None, gateway_args: list[str] = (),
                 blockserver_args: list[str] = (), model_name: str | None = None, host: str = "127.0.0.1",
                 port: int | None = None):
        self.model = model
        self.model_name = model_name or Path(model).name
        self.host, self.port = host, port or free_port()
        self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{self.port}"
        self.log_dir = log_dir
        self.gateway_args, self.blockserver_args = list(gateway_args), list(blockserver_args)
        self.gateway: subprocess.Popen | None = None
        self.blockservers: list[subprocess.Popen] = []

    def _spawn(self, name: str, args: list[str], nice: bool = False) -> subprocess.Popen:
        """Each child runs in its own session: a terminal's Ctrl-C reaches only the parent, which
        stops the children in order (blockservers first) with one signal each."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        command = (["nice", "-n", "19"] if nice else []) + CLI + args
        options = dict(env=env, start_new_session=True, preexec_fn=_die_with_parent)
        if self.log_dir is None:
            return subprocess.Popen(command, **options)
        with open(self.log_dir / f"{name}.log", "ab") as log:  # the child keeps its own descriptor
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, **options)

    def start(self, spans: list[str] = (), timeout_s: float = 120) -> LocalSwarm:
        self.start_gateway()
        for span in spans:
            self.add_blockserver(span)
        if spans:
            self.wait_healthy(timeout_s)
        return self

    def start_gateway(self) -> subprocess.Popen:
        self.gateway = self._spawn("gateway", ["gateway", "--model", self.model, "--model-name", self.model_name,
                                               "--host", self.host, "--port", str(self.port), *self.gateway_args])
        return self.gateway

    def restart_gateway(self, extra_args: list[str] = (), timeout_s: float = 120) -> None:
        """Stop the gateway and start it again (same port) with `extra_args` added; blockservers
        register again with their next heartbeat."""
        if self.gateway is not None and self.gateway.poll() is None:
            self.gateway.send_signal(signal.SIGINT)
            self.gateway.wait(30)
        self.gateway_args += list(extra_args)
        self.start_gateway()
        self.wait_healthy(timeout_s)

    def add_blockserver(self, span: str | None, extra: list[str] = (), nice: bool = False,
                        port: int | None = None, gateways: list[str] | None = None,
                        model: str | None = None) -> subprocess.Popen:
        """A blockserver serving `span` ('START:END'), or choosing its own when None."""
        port = port or free_port()
        where = ["--blocks", span] if span else []
        for url in gateways or [self.url]:
            where += ["--gateway", url]
        name = f"blockserver-{(span or 'auto').replace(':', '-')}-{len(self.blockservers)}"
        process = self._spawn(name, ["blockserver", "--model", model or self.model, *where,
                                     "--heartbeat-interval", "0.5", "--port", str(port),
                                     *self.blockserver_args, *extra], nice=nice)
        process.url = f"http://127.0.0.1:{port}"
        process.span = span
        process.log = self.log_dir / f"{name}.log" if self.log_dir else None
        self.blockservers.append(process)
        return process

    def processes(self) -> list[subprocess.Popen]:
        return [p for p in [self.gateway, *self.blockservers] if p is not None]

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=5).json()

    def wait_healthy(self, timeout_s: float = 120, progress: Callable[[str], None] | None = None) -> dict:
        """Wait until the gateway says every layer is served; `progress(status)` hears each change."""
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            for p in self.processes():
                if p.poll() is not None:
                    where = f"; logs in {self.log_dir}" if self.log_dir else ""
                    raise RuntimeError(f"`{' '.join(p.args[len(CLI):len(CLI) + 1])}` exited with {p.returncode}"
                                       f" during start-up{where}")
            try:
                r = httpx.get(f"{self.url}/health", timeout=2)
                if r.status_code == 200:
                    return r.json()
                body = r.json()
                status = (f"{body.get('servers', 0)} blockservers online, missing layers "
                          f"{_ranges(body.get('missing_layers', []))}" if "servers" in body else "gateway loading")
            except (httpx.HTTPError, ValueError):
                status = "gateway starting"
            if progress is not None and status != last:
                progress(status)
            last = status
            time.sleep(0.2)
        raise TimeoutError(f"swarm not healthy within {timeout_s:.0f}s"
                           + (f"; logs in {self.log_dir}" if self.log_dir else ""))

    def servers(self) -> list[dict]:
        return httpx.get(f"{self.url}/registry/servers", timeout=5).json()

    def wait_registered(self, count: int, timeout_s: float = 60) -> None:
        """Wait until `count` blockservers are in the registry."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if len(self.servers()) >= count:
                    return
            except (httpx.HTTPError, ValueError):
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

    def stop(self, timeout_s: float = 10) -> None:
        """Blockservers first, so that they announce `offline` to a gateway that still listens."""
        for group in (self.blockservers, [self.gateway] if self.gateway else []):
            for p in group:
                if p.poll() is None:
                    p.send_signal(signal.SIGCONT)  # a test may have stopped it
                    p.send_signal(signal.SIGINT)
            deadline = time.monotonic() + timeout_s
            for p in group:
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'"""
    parts, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ", ".join(parts) or "none"
