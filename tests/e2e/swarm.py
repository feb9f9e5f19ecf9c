"""Real processes on 127.0.0.1 for the end-to-end tests (the harness lives in corolla.local)."""

from __future__ import annotations

from pathlib import Path

from corolla.local import CLI, LocalSwarm, free_port

__all__ = ["CLI", "Swarm", "free_port"]


class Swarm(LocalSwarm):
    """A LocalSwarm whose processes log into `log_dir` and whose blockservers use one torch thread.

    Every process computes in float32 unless the test asks otherwise (a later `--dtype` wins), so that
    what the swarm answers can be held to `transformers` in float32 at a tight tolerance."""

    def __init__(self, model: str, spans: list[str], log_dir: Path, gateway_args: list[str] = (),
                 blockserver_args: list[str] = (), model_name: str | None = None):
        super().__init__(model, log_dir, ["--dtype", "float32", *gateway_args],
                         ["--num-threads", "1", "--dtype", "float32", *blockserver_args], model_name)
        self.spans = spans

    def start(self, timeout_s: float = 120) -> Swarm:
        super().start(self.spans, timeout_s)
        return self
