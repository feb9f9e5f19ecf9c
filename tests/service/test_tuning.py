"""Fine-tuning through the swarm, in-process: gradients of a loss with respect to a soft prompt
and deep prompts, through 3 blockservers, equal local autograd through the whole transformers
model (float32, 1e-4 relative), in every family, also when a server dies mid-backward; a trained
prompt is then served by the gateway as a model id of its own."""

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from gateway.tuning import PromptTuning
from shared.models.loader import family_for
from shared.protocol import Backward, Forward
from tests import tiny
from tests.service.inprocess import Fault, in_process_swarm

P, B, T = 4, 2, 9
SPANS = {"a": "0:2", "b": "2:4", "c": "4:6"}


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, tiny.VOCAB, (B, T), generator=g)
    labels = torch.randint(3, tiny.VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -3:] = 0  # right padding
    labels[mask == 0] = -100
    return ids, mask, labels


def reference(directory, soft, deep, ids, mask, labels):
    """The loss and its gradients, locally, through the whole transformers model: the soft prompt
    given as inputs_embeds before the tokens, deep prompts added by pre-hooks before each layer."""
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    soft, deep = soft.clone().requires_grad_(), deep.clone().requires_grad_()
    layers = model.get_submodule(family_for(model.config).layers_path)

    def add(i):
        def hook(module, args, kwargs):
            if args:
                return (torch.cat([args[0][:, :P] + deep[i], args[0][:, P:]], 1),) + args[1:], kwargs
            h = kwargs["hidden_states"]
            return args, kwargs | {"hidden_states": torch.cat([h[:, :P] + deep[i], h[:, P:]], 1)}
        return hook

    hooks = [layer.register_forward_pre_hook(add(i), with_kwargs=True) for i, layer in enumerate(layers)]
    embeds = torch.cat([soft.expand(B, -1, -1), model.get_input_embeddings()(ids)], 1)
    full_mask = torch.cat([torch.ones(B, P, dtype=torch.long), mask], 1)
    logits = model(inputs_embeds=embeds, attention_mask=full_mask).logits[:, P:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)
    loss.backward()
    for h in hooks:
        h.remove()
    return loss.detach(), soft.grad, deep.grad


def swarm_gradients(directory, soft, deep, spans=SPANS, faults=(), far=()):
    async def scenario():
        async with in_process_swarm(directory, spans, faults=list(faults)) as swarm:
            async def records():
                return swarm.state.swarm.records()
            model = PromptTuning.over(records, directory, prompt_length=P, deep=True, connect=swarm.connect,
                                      loop=asyncio.get_running_loop(), failover_timeout_s=10)
            with torch.no_grad():
                model.soft_prompt.copy_(soft)
                model.deep_prompts.copy_(deep)
            for server_id in spans:  # servers in `far` are routed to only when others fail
                model.layers.swarm.rtts.seconds[server_id] = 1.0 if server_id in far else 0.001

            def train_step():  # what a training loop does, in its own thread
                ids, mask, labels = batch()
                out = model(ids, mask, labels=labels)
                out.loss.backward()
                return out.loss.detach(), model.soft_prompt.grad, model.deep_prompts.grad

            result = await asyncio.to_thread(train_step)
            await model.layers.close()
            return result, model.layers.retries, swarm.state.swarm.bans.active()
    return asyncio.run(scenario())


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", list(tiny.configs()))
def test_prompt_gradients_through_the_swarm_equal_local_autograd(tiny_dir, family):
    directory = tiny_dir(family)
    torch.manual_seed(1)
    soft, deep = torch.randn(P, 64) * 0.5, torch.randn(6, P, 64) * 0.5
    want = reference(directory, soft, deep, *batch())
    (loss, grad_soft, grad_deep), retries, _ = swarm_gradients(directory, soft, deep)
    assert abs(loss - want[0]) < 1e-5
    assert rel(grad_soft, want[1]) < 1e-4 and rel(grad_deep, want[2]) < 1e-4
    assert retries == 0


@pytest.mark.parametrize("frames", [Forward, Backward])
def test_a_server_that_dies_mid_pass_is_replaced_and_the_gradients_are_the_same(tiny_dir, frames):
    """b (2:4) drops its socket on its first backward (or forward); a replica takes over from the
    stored input of that hop."""
    directory = tiny_dir("llama")
    torch.manual_seed(1)
    soft, deep = torch.randn(P, 64) * 0.5, torch.randn(6, P, 64) * 0.5
    want = reference(directory, soft, deep, *batch())
    (loss, grad_soft, grad_deep), retries, _ = swarm_gradients(
        directory, soft, deep, spans=SPANS | {"b2": "2:4"}, faults=[Fault("b", at_step=0, frames=frames)], far={"b2"})
    assert rel(grad_soft, want[1]) < 1e-4 and rel(grad_deep, want[2]) < 1e-4
    assert retries == 1


def test_a_trained_prompt_is_served_as_a_model_id(tiny_dir, tmp_path):
    """PromptTuning.save -> --prompt-adapter NAME=PATH: NAME is listed, and its greedy completion
    equals the whole model run locally with the same soft and deep prompts (no cache, every step
    recomputed), for a batch of two prompts of different lengths too."""
    directory = tiny_dir("qwen2")
    torch.manual_seed(3)
    soft, deep = torch.randn(P, 64), torch.randn(6, P, 64)
    path = tmp_path / "tuned.safetensors"

    async def scenario():
        async def no_records():
            return []
        model = PromptTuning.over(no_records, directory, prompt_length=P, deep=True,
                                  loop=asyncio.get_running_loop())
        with torch.no_grad():
            model.soft_prompt.copy_(soft)
            model.deep_prompts.copy_(deep)
        model.save(path)
        async with in_process_swarm(directory, SPANS, gateway={"prompt_adapters": [f"tuned={path}"]}) as swarm:
            models = (await swarm.client.get("/v1/models")).json()
            body = {"model": "tuned", "prompt": [[1, 40, 41, 42], [1, 50]], "max_tokens": 10, "temperature": 0,
                    "logit_bias": {"2": -100}}
            tuned = (await swarm.client.post("/v1/completions", json=body)).json()
            base = (await swarm.client.post("/v1/completions", json=body | {"model": "tiny"})).json()
            return models, tuned, base

    models, tuned, base = asyncio.run(scenario())
    assert [m["id"] for m in models["data"]] == ["tiny", "tuned"] and models["data"][1]["root"] == "tiny"
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    layers = hf.get_submodule(family_for(hf.config).layers_path)
    hooks = [layer.register_forward_pre_hook(
        lambda m, a, kw, i=i: (a, kw | {"hidden_states": torch.cat([kw["hidden_states"][:, :P] + deep[i],
                                                                    kw["hidden_states"][:, P:]], 1)})
        if not a else ((torch.cat([a[0][:, :P] + deep[i], a[0][:, P:]], 1),) + a[1:], kw), with_kwargs=True)
        for i, layer in enumerate(layers)]
    expected = []
    for prompt in ([1, 40, 41, 42], [1, 50]):
        ids = list(prompt)
        for _ in range(10):
            with torch.no_grad():
                embeds = torch.cat([soft[None], hf.get_input_embeddings()(torch.tensor([ids]))], 1)
                logits = hf(inputs_embeds=embeds).logits[0, -1]
                logits[2] = -float("inf")
            ids.append(int(logits.argmax()))
        expected.append(tiny.char_tokenizer().decode(ids[len(prompt):], skip_special_tokens=True))
    for h in hooks:
        h.remove()
    got = [c["text"] for c in sorted(tuned["choices"], key=lambda c: c["index"])]
    assert got == expected and tuned["model"] == "tuned"
    assert got != [c["text"] for c in sorted(base["choices"], key=lambda c: c["index"])]  # the prompt matters
