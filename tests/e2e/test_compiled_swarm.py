"""A swarm that compiles its decode steps (the default outside the tests): SmolLM2 in bfloat16 on
one blockserver and the gateway, both compiled; 16 concurrent greedy streams, each identical to the
same request run alone (batch invariance through the compiled graphs and the compiled head)."""

import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.e2e.swarm import Swarm

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The three primary colors are"]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    saved = {k: os.environ.get(k) for k in ("COROLLA_BLOCKSERVER_COMPILE", "COROLLA_GATEWAY_COMPILE")}
    os.environ.update({k: "true" for k in saved})  # the children inherit it
    log_dir = tmp_path_factory.mktemp("compiled")
    swarm = Swarm("smollm2", ["0:30"], log_dir, gateway_args=["--dtype", "bfloat16"],
                  blockserver_args=["--dtype", "bfloat16", "--num-threads", "2"], model_name="SmolLM2-135M-Instruct")
    try:
        yield swarm.start(timeout_s=600), log_dir
    finally:
        swarm.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_sixteen_compiled_streams_answer_as_one_does(swarm):
    swarm, log_dir = swarm
    logs = "".join(p.read_text() for p in log_dir.glob("*.log"))
    assert "compiling the decode step of layers 0:30 for 4 row(s)" in logs and "compiling the LM head" in logs
    assert "failed" not in logs and "compute rows differently" not in logs, logs[-3000:]  # warnings are shown

    def complete(prompt: str) -> str:
        body = {"model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": 40, "temperature": 0}
        r = httpx.post(f"{swarm.url}/v1/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    alone = [complete(p) for p in PROMPTS]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(complete, PROMPTS * 4))
    assert together == alone * 4
    assert len(set(alone)) == len(alone)  # the prompts really differ
