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
import threading
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from gateway.adapters import ADAPTER_FORMAT
from gateway.channel import Connect, websocket_connect
from gateway.passes import GatewayGrants, Records, RemoteLayers
from gateway.swarm import ServedModel, Swarm
from shared.errors import BadRequest
from shared.identity import read_token
from shared.models.base import ModelEnds
from shared.models.loader import load_ends, load_facts
from shared.models.resolve import resolve_model, served_name
from shared.records import SERVERS_PATH, ServerInfo


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
