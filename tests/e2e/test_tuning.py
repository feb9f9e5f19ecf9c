"""Fine-tuning through real processes: PromptTuning.connect to a gateway, a blockserver killed
(SIGKILL) just as the backward pass reaches it; its replica takes over and the gradients equal
local autograd through the whole transformers model."""

import signal

import torch

from gateway.tuning import PromptTuning
from shared import protocol
from tests.e2e.swarm import Swarm
from tests.service.test_tuning import P, batch, reference, rel


def test_a_server_killed_mid_backward_changes_no_gradient(tiny_dir, tmp_path):
    directory = tiny_dir("llama")
    swarm = Swarm(str(directory), ["0:2", "2:4", "2:4", "4:6"], tmp_path, model_name="tiny")
    torch.manual_seed(1)
    soft, deep = torch.randn(P, 64) * 0.5, torch.randn(6, P, 64) * 0.5
    try:
        swarm.start()
        swarm.wait_registered(4)
        with PromptTuning.connect(swarm.url, model=str(directory), prompt_length=P, deep=True) as model:
            check_failover(swarm, model, directory, soft, deep)
    finally:
        swarm.stop()


def check_failover(swarm, model, directory, soft, deep):
    with torch.no_grad():
        model.soft_prompt.copy_(soft)
        model.deep_prompts.copy_(deep)
    killed = []
    call = model.layers._call

    async def kill_on_first_backward(hop, kind, *args, **kwargs):
        if kind is protocol.Backward and hop.span.start == 2 and not killed:
            victim = next(p for p in swarm.blockservers if p.url == hop.server.url)
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            killed.append(hop.server.server_id)
        return await call(hop, kind, *args, **kwargs)

    model.layers._call = kill_on_first_backward
    ids, mask, labels = batch()
    out = model(ids, mask, labels=labels)
    out.loss.backward()
    want = reference(directory, soft, deep, ids, mask, labels)
    assert killed and model.layers.retries >= 1
    assert rel(model.soft_prompt.grad, want[1]) < 1e-4 and rel(model.deep_prompts.grad, want[2]) < 1e-4
