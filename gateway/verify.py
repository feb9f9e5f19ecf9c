"""Spot checks of blockservers' results (`--verify-rate`).

With probability `rate`, a hop's step is repeated on another server of the same layers (same
dtype and quantization) as a stateless forward pass over every input the hop has been sent, and
the last positions are compared within a tolerance set by the dtype. When they disagree, a third
such server, if there is one, decides; the server found wrong is banned. Without a third, both
are banned: the answer then goes on without either, which costs availability, never correctness.

PETALS' paper names servers that return incorrect results as an open problem; this is the
redundancy half of its suggested remedy, at a cost set by the rate (bench/verify.py)."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch

from gateway.passes import RemoteLayers
from gateway.routing import Hop
from shared.errors import CorollaError, WrongResult
from shared.records import ServerInfo, Span

log = logging.getLogger(__name__)

# Per position, |a - b| / |b| (L2 over the hidden size) may reach this. Measured between a whole-
# sequence pass and a prefill plus cached decode steps over SmolLM2's first 15 layers: at most
# 1.6e-2 in bf16 (median 1.0e-2), 1e-6 in fp32. Per position, not against the largest value:
# hidden states hold outliers of 2e4 (attention sinks) next to values near 1, and a bound scaled
# by the outlier would let a lie of hundreds pass in every other dimension.
TOLERANCE = {"float32": 1e-3, "bfloat16": 8e-2, "float16": 4e-2}


@dataclass
class VerifyStats:
    checks: int = 0  # steps repeated elsewhere
    disagreements: int = 0  # of them, results that differed
    caught: int = 0  # servers banned for a wrong result


def agree(a: torch.Tensor, b: torch.Tensor, dtype: str) -> bool:
    """Whether results a and b [batch, tokens, hidden] are the same computation's, within what
    `dtype`'s rounding explains, at every position."""
    if a.shape != b.shape or not bool(torch.isfinite(a).all()):
        return False
    a, b = a.float(), b.float()
    error = (a - b).norm(dim=-1)
    scale = b.norm(dim=-1).clamp_min(1e-6)
    return bool((error <= TOLERANCE.get(dtype, 8e-2) * scale).all())


class Verifier:
    def __init__(self, rate: float, swarm, connect, config, rng: random.Random | None = None):
        self.rate, self.swarm, self.connect, self.config = rate, swarm, connect, config
        self.rng = rng or random.Random()
        self.stats = VerifyStats()

    def wanted(self) -> bool:
        return self.rate > 0 and self.rng.random() < self.rate

    def peers(self, server: ServerInfo, start: int, end: int, exclude: set[str]) -> list[ServerInfo]:
        """Servers that could repeat this hop: same layers, same numerics, routable."""
        return [s for s in self.swarm.routable() if s.server_id not in exclude and s.start <= start and end <= s.end
                and s.dtype == server.dtype and s.quant == server.quant]

    async def check(self, server: ServerInfo, start: int, end: int, inputs: torch.Tensor, mask: torch.Tensor | None,
                    result: torch.Tensor) -> None:
        """Repeat the step whose output was `result` (the last result.shape[1] positions of
        `inputs`' pass); raise WrongResult when `server` is found wrong (it is banned)."""
        peers = self.peers(server, start, end, {server.server_id})
        if not peers:
            return  # nobody to compare with: unverified, not suspect
        self.rng.shuffle(peers)
        self.stats.checks += 1
        tokens = result.shape[1]
        verifier = peers[0]
        theirs = await self._repeat(verifier, start, end, inputs, mask)
        if theirs is not None and agree(result, theirs[:, -tokens:], server.dtype):
            return
        self.stats.disagreements += 1
        wrong = {server.server_id, verifier.server_id}
        for judge in peers[1:]:
            third = await self._repeat(judge, start, end, inputs, mask)
            if third is None:
                continue
            if agree(result, third[:, -tokens:], server.dtype):
                wrong = {verifier.server_id}
            elif theirs is not None and agree(theirs[:, -tokens:], third[:, -tokens:], server.dtype):
                wrong = {server.server_id}
            break
        self.stats.caught += len(wrong)
        for server_id in wrong - {server.server_id}:  # the chain's own server is banned by its failover
            seconds = self.swarm.ban(server_id)
            log.warning("verification: %s returned a wrong result for layers %d:%d; banned for %.0fs", server_id,
                        start, end, seconds)
        if server.server_id in wrong:
            raise WrongResult(f"{server.server_id}: its result for layers {start}:{end} failed verification")

    async def _repeat(self, server: ServerInfo, start: int, end: int, inputs: torch.Tensor,
                      mask: torch.Tensor | None) -> torch.Tensor | None:
        """A stateless forward pass of `inputs` on `server`; None when it cannot be had (a failure
        to answer is the failover's business, not a verdict)."""
        remote = RemoteLayers.in_gateway(self.swarm, self.connect, self.config)
        try:
            return await remote.forward_on(Hop(server, Span(start, end)), inputs, mask)
        except (CorollaError, TimeoutError, OSError) as exc:
            log.info("verification: %s could not repeat a step (%s)", server.server_id, exc)
            return None
        finally:
            await remote.close()
