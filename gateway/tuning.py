"""Fine-tuning through the swarm (PETALS' "run and fine-tune"): the client owns small trainable
parameters and the model's ends; the swarm's frozen layers run forward and backward passes.

    from gateway.tuning import PromptTuning

    model = PromptTuning.connect("http://127.0.0.1:8000", prompt_length=16, deep=True)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    for input_ids, attention_mask, labels in batches:
        loss = model(input_ids, attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save("tuned.safetensors")   # then: corolla gateway --prompt-adapter NAME=tuned.safetensors

Trainable: a soft prompt (P virtual tokens prepended to the input embeddings; prompt tuning) and,
with `deep=True`, a deep prompt per layer (added before each layer to the hidden states of those
P positions; PETALS' deep_ptune). Every pass is stateless on the servers: `forward` returns a
span's output; `backward` recomputes the span and returns the gradients with respect to its input
and its deep prompts. The client keeps each hop's input, so when a server fails during either
pass the hop's layers are rerouted (to one server or several) and the pass is retried from the
stored input: the gradients are the same."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from gateway.adapters import ADAPTER_FORMAT
from gateway.channel import Channel, Connect, websocket_connect
from gateway.routing import Hop
from gateway.swarm import ServedModel, Swarm
from shared import protocol
from shared.dtypes import COMPUTE_DTYPES
from shared.errors import BadRequest, CorollaError, ProtocolError, SessionLost, Unavailable
from shared.identity import MAX_SKEW_S, read_token
from shared.models.base import ModelEnds
from shared.models.loader import load_ends, load_facts
from shared.models.resolve import resolve_model, served_name
from shared.records import GRANT_PATH, SERVERS_PATH, ServerInfo

log = logging.getLogger(__name__)

FAULTS = (SessionLost, ProtocolError)  # the server's fault: ban it
RETRYABLE = (Unavailable, ProtocolError, BadRequest)
Records = Callable[[], Awaitable[list[ServerInfo]]]
Grants = Callable[[str], Awaitable[dict | None]]  # a grant for stateless passes on a server


async def _now(value):
    return value


async def _no_records() -> list[ServerInfo]:
    return []


class GatewayGrants:
    """Grants fetched from the gateway (GRANT_PATH) for a client outside it, each kept for half
    its validity."""

    def __init__(self, gateway: str, headers: Callable[[], dict]):
        self.gateway, self.headers = gateway, headers
        self._kept: dict[str, tuple[float, dict]] = {}

    async def __call__(self, server_id: str) -> dict | None:
        kept = self._kept.get(server_id)
        if kept is not None and time.monotonic() - kept[0] < MAX_SKEW_S / 2:
            return kept[1]
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(self.gateway + GRANT_PATH.format(server_id=server_id), headers=self.headers())
        if response.status_code != 200:
            raise Unavailable(f"the gateway gave no grant for {server_id} ({response.status_code})")
        self._kept[server_id] = (time.monotonic(), response.json())
        return self._kept[server_id][1]


@dataclass
class Pass:
    """What a forward pass leaves for its backward pass: each hop's layers and input."""

    hops: list[tuple[int, int, torch.Tensor]]  # (start, end, input [batch, tokens, hidden])
    mask: torch.Tensor | None
    prompts: torch.Tensor | None  # [layers, P, hidden]


class RemoteLayers:
    """The swarm's layers [0, num_layers) as stateless forward and backward passes, with retries."""

    def __init__(self, swarm: Swarm, records: Records, connect: Connect = websocket_connect,
                 step_timeout_s: float = 120.0, failover_timeout_s: float = 60.0, max_frame_bytes: int = 64 * 2**20,
                 refresh_s: float = 5.0, grants: Grants | None = None):
        self.swarm, self._records, self._connect = swarm, records, connect
        self._grants = grants or (lambda server_id: _now(swarm.grant(server_id)))  # in a gateway: it signs them
        self.step_timeout_s, self.failover_timeout_s = step_timeout_s, failover_timeout_s
        self.max_frame_bytes, self.refresh_s = max_frame_bytes, refresh_s
        self._refreshed = 0.0
        self._channels: dict[str, Channel] = {}
        self.retries = 0  # hops rerouted after a failure

    @classmethod
    def in_gateway(cls, swarm: Swarm, connect: Connect, config) -> RemoteLayers:
        """Passes run by a gateway itself (prompt scoring, verification): its registry is the
        swarm's view already, and `config` (a ChainConfig) sets the timeouts and frame size."""
        return cls(swarm, _no_records, connect, config.step_timeout_s, config.failover_timeout_s,
                   config.max_frame_bytes)

    async def forward_on(self, hop: Hop, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """One stateless pass of `hidden` through `hop`'s layers on `hop`'s server, not rerouted:
        its failures raise."""
        return (await self._call(hop, protocol.Forward, hidden, Pass([], mask, None)))["hidden"]

    async def refresh(self, force: bool = False) -> None:
        if force or time.monotonic() - self._refreshed > self.refresh_s:
            for info in await self._records():
                if info.model == self.swarm.model.fingerprint:
                    self.swarm.registry.heartbeat(info)
            self._refreshed = time.monotonic()

    async def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None,
                      prompts: torch.Tensor | None) -> tuple[torch.Tensor, Pass]:
        """hidden [batch, tokens, hidden] through every layer; the Pass remembers each hop's input."""
        trace = Pass([], mask, prompts)
        out = await self._forward_range(0, self.swarm.model.num_layers, hidden, trace)
        return out, trace

    async def backward(self, trace: Pass, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients with respect to the pass's input and deep prompts, hop by hop in reverse."""
        grad_prompts = None if trace.prompts is None else torch.zeros_like(trace.prompts, dtype=torch.float32)
        for start, end, hidden in reversed(trace.hops):
            grad, part = await self._backward_range(start, end, hidden, grad, trace)
            if grad_prompts is not None:
                grad_prompts[start:end] += part
        return grad, grad_prompts

    async def _forward_range(self, start: int, end: int, hidden: torch.Tensor, trace: Pass) -> torch.Tensor:
        deadline = time.monotonic() + self.failover_timeout_s
        layer = start
        while layer < end:
            await self.refresh()
            try:
                hops = self.swarm.route(layer, end)
            except Unavailable:
                await self._wait(deadline, f"no server covers layers {layer}..{end - 1}")
                continue
            for hop in hops:
                try:
                    out = await self._call(hop, protocol.Forward, hidden, trace)
                except RETRYABLE as exc:
                    await self._failed(hop, exc, deadline)
                    break  # reroute from this hop's first layer, with the same input
                trace.hops.append((hop.span.start, hop.span.end, hidden))
                hidden, layer = out["hidden"].float(), hop.span.end
        return hidden

    async def _backward_range(self, start: int, end: int, hidden: torch.Tensor, grad: torch.Tensor,
                              trace: Pass) -> tuple[torch.Tensor, torch.Tensor | None]:
        deadline = time.monotonic() + self.failover_timeout_s
        while True:
            await self.refresh()
            try:
                hops = self.swarm.route(start, end)
            except Unavailable:
                await self._wait(deadline, f"no server covers layers {start}..{end - 1}")
                continue
            try:
                if len(hops) == 1:
                    out = await self._call(hops[0], protocol.Backward, hidden, trace, grad)
                    return out["grad"].float(), _float(out.get("grad_prompts"))
                # the layers' server is gone and several now share them: recompute their inputs
                inner = Pass([], trace.mask, trace.prompts)
                await self._forward_range(start, end, hidden, inner)
                parts = torch.zeros(end - start, *trace.prompts.shape[1:]) if trace.prompts is not None else None
                for s, e, h in reversed(inner.hops):
                    grad, part = await self._backward_range(s, e, h, grad, inner)
                    if parts is not None:
                        parts[s - start:e - start] += part
                return grad, parts
            except RETRYABLE as exc:
                await self._failed(hops[0], exc, deadline)

    async def _call(self, hop: Hop, kind, hidden: torch.Tensor, trace: Pass, grad: torch.Tensor | None = None):
        server = hop.server
        dtype = COMPUTE_DTYPES.get(server.dtype, torch.float32)
        tensors = {"hidden": hidden.to(dtype)}
        if grad is not None:
            tensors["grad"] = grad.to(dtype)
        if trace.mask is not None:
            tensors["mask"] = trace.mask
        if trace.prompts is not None:
            tensors["prompts"] = trace.prompts[hop.span.start:hop.span.end].to(dtype)
        frame = protocol.encode(kind(model=self.swarm.model.fingerprint, span=[hop.span.start, hop.span.end],
                                     grant=await self._grants(server.server_id)), tensors)
        channel = self._channels.get(server.server_id)
        try:
            if channel is None:
                channel = await asyncio.wait_for(self._connect(server.url, 10.0, self.max_frame_bytes), 10.0)
                self._channels[server.server_id] = channel
            await asyncio.wait_for(channel.send(frame), self.step_timeout_s)
            data = await asyncio.wait_for(channel.recv(), self.step_timeout_s)
        except TimeoutError as exc:
            raise SessionLost(f"{server.server_id} gave no reply within {self.step_timeout_s}s") from exc
        except CorollaError:
            raise
        reply = protocol.decode(data, self.max_frame_bytes)
        if isinstance(reply.header, protocol.Error):
            raise CorollaError.for_code(reply.header.code)(f"{server.server_id}: {reply.header.message}")
        expected = "grad" if grad is not None else "hidden"
        out = reply.tensors.get(expected)
        if not isinstance(reply.header, protocol.Result) or out is None or out.shape != hidden.shape:
            raise ProtocolError(f"{server.server_id} answered a {kind.model_fields['type'].default} with "
                                f"{reply.type} {sorted(reply.tensors)}")
        if not bool(torch.isfinite(out).all()):
            raise ProtocolError(f"{server.server_id} returned non-finite values")
        return reply.tensors

    async def _failed(self, hop: Hop, error: Exception, deadline: float) -> None:
        self.retries += 1
        channel = self._channels.pop(hop.server.server_id, None)
        if channel is not None:
            channel.abort()
        if isinstance(error, FAULTS):
            seconds = self.swarm.ban(hop.server.server_id)
            log.warning("%s failed on layers %s (%s); banned for %.0fs, retrying", hop.server.server_id, hop.span,
                        error, seconds)
        else:
            log.info("%s refused layers %s (%s); retrying", hop.server.server_id, hop.span, error)
            await asyncio.sleep(0.2)
        await self._wait(deadline, str(error), sleep_s=0.0)

    async def _wait(self, deadline: float, why: str, sleep_s: float = 0.5) -> None:
        if time.monotonic() >= deadline:
            raise Unavailable(f"gave up after {self.failover_timeout_s:.0f}s: {why}")
        await asyncio.sleep(sleep_s)
        await self.refresh(force=True)

    async def close(self) -> None:
        """Close every connection politely; if this is cancelled (a client that went away, under a
        cancel scope that cancels every await), drop them all at once instead, so none is left open."""
        channels, self._channels = list(self._channels.values()), {}
        try:
            for channel in channels:
                await channel.close()
        except BaseException:
            for channel in channels:
                channel.abort()
            raise


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


class Runner:
    """Runs the client's coroutines from synchronous code (autograd, a training loop): on a loop
    of its own in a background thread, or on a given running loop from another thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self._thread = None
        if loop is None:
            loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=loop.run_forever, name="corolla-tuning", daemon=True)
            self._thread.start()
        self.loop = loop

    def __call__(self, coroutine: Awaitable):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        """Stop and close a loop this runner made (a given loop belongs to its owner)."""
        if self._thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            if not self._thread.is_alive():
                self.loop.close()


class _ThroughSwarm(torch.autograd.Function):
    """hidden [batch, tokens, hidden] -> the last layer's output, differentiable with respect to
    hidden and the deep prompts [layers, P, hidden] (a tensor of zeros-like shape when unused)."""

    @staticmethod
    def forward(ctx, hidden, prompts, layers: RemoteLayers, run: Runner, mask, use_prompts: bool):
        out, trace = run(layers.forward(hidden.detach().float(), mask,
                                        prompts.detach().float() if use_prompts else None))
        ctx.trace, ctx.layers, ctx.run, ctx.use_prompts = trace, layers, run, use_prompts
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad, grad_prompts = ctx.run(ctx.layers.backward(ctx.trace, grad_out.float().contiguous()))
        return grad, (grad_prompts if ctx.use_prompts else None), None, None, None, None


@dataclass
class TuningOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor  # [batch, tokens, vocab] of the real tokens (prompt positions left out)


class PromptTuning(nn.Module):
    """A model whose layers run on the swarm, with a trainable soft prompt (and deep prompts)."""

    def __init__(self, ends: ModelEnds, layers: RemoteLayers, run: Runner, num_layers: int, prompt_length: int,
                 deep: bool, name: str = "", fingerprint: str = ""):
        super().__init__()
        self.ends = ends.requires_grad_(False)
        self.layers, self.run = layers, run
        self.name, self.fingerprint = name, fingerprint
        hidden = ends.embed.weight.shape[1]
        scale = ends.embed.weight.float().std().item()  # start like a typical token embedding
        self.soft_prompt = nn.Parameter(torch.randn(prompt_length, hidden) * scale)
        self.deep_prompts = nn.Parameter(torch.zeros(num_layers, prompt_length, hidden)) if deep else None

    @classmethod
    def connect(cls, gateway: str, model: str | None = None, prompt_length: int = 16, deep: bool = False,
                swarm_secret: str | None = None, cache_dir: str | None = None, api_key: str | None = None,
                **options) -> PromptTuning:
        """A client of the swarm behind `gateway` for `model` (a reference the local machine can
        resolve to the same files: its ends run here; default: the built-in SmolLM2)."""
        directory = resolve_model(model, cache_dir)
        facts = load_facts(directory)
        gateway = gateway.rstrip("/")
        served = httpx.get(f"{gateway}/health", timeout=30).json()
        if served.get("fingerprint") not in (None, facts.fingerprint):
            raise BadRequest(f"the gateway serves another model (fingerprint {served['fingerprint']}) than "
                             f"{directory} (fingerprint {facts.fingerprint})")

        def headers() -> dict:  # fresh: the secret's token carries a time stamp
            return read_token(swarm_secret) | ({"Authorization": f"Bearer {api_key}"} if api_key else {})

        async def records() -> list[ServerInfo]:
            async with httpx.AsyncClient(headers=headers(), timeout=10) as client:
                response = await client.get(f"{gateway}{SERVERS_PATH}")
                response.raise_for_status()
                return [ServerInfo.model_validate(r) for r in response.json()]

        name = served_name(model, directory)
        return cls.over(records, directory, prompt_length, deep, name=name, grants=GatewayGrants(gateway, headers),
                        **options)

    @classmethod
    def over(cls, records: Records, directory: Path, prompt_length: int = 16, deep: bool = False,
             connect: Connect = websocket_connect, loop: asyncio.AbstractEventLoop | None = None,
             name: str = "", **layer_options) -> PromptTuning:
        """The same over any source of records and any `connect` (tests use in-process servers)."""
        facts = load_facts(directory)
        swarm = Swarm()
        swarm.model = ServedModel(facts.fingerprint, name or facts.model_type, facts.num_layers)
        layers = RemoteLayers(swarm, records, connect, **layer_options)
        ends = load_ends(directory, "cpu", "float32")
        return cls(ends, layers, Runner(loop), facts.num_layers, prompt_length, deep, name, facts.fingerprint)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.soft_prompt, self.deep_prompts) if p is not None]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> TuningOutput:
        """input_ids [batch, tokens] (pad on the right); labels like input_ids, -100 where no loss
        is wanted (HF's convention: position t predicts labels[t + 1])."""
        batch, tokens = input_ids.shape
        length = self.soft_prompt.shape[0]
        with torch.no_grad():
            embedded = self.ends.embed_tokens(input_ids).float()
        prompt = self.ends.prepare_inputs(self.soft_prompt)  # as if given as inputs_embeds
        hidden = torch.cat([prompt.expand(batch, -1, -1), embedded], dim=1)
        mask = None
        if attention_mask is not None:
            mask = torch.cat([torch.ones(batch, length, dtype=torch.long), attention_mask.long()], dim=1)
        deep = self.deep_prompts if self.deep_prompts is not None else torch.zeros(0)
        out = _ThroughSwarm.apply(hidden, deep, self.layers, self.run, mask, self.deep_prompts is not None)
        logits = self.ends.head_logits(out[:, length:])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return TuningOutput(loss, logits)

    def save(self, path: str | Path) -> None:
        """The trained prompts as safetensors, for `corolla gateway --prompt-adapter NAME=PATH`."""
        tensors = {"soft_prompt": self.soft_prompt.detach().float().contiguous()}
        if self.deep_prompts is not None:
            tensors["deep_prompts"] = self.deep_prompts.detach().float().contiguous()
        save_file(tensors, str(path), metadata={"format": ADAPTER_FORMAT, "fingerprint": self.fingerprint,
                                                "model": self.name})

    def close(self) -> None:
        """Close the connections to the swarm and the client's event loop."""
        self.run(self.layers.close())
        self.run.close()

    def __enter__(self) -> PromptTuning:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
