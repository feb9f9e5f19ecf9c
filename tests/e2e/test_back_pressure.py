"""Back-pressure with real processes: when no chain has room a request waits in the gateway's
queue; with the queue full the next one gets 429 with Retry-After at once; nobody is banned and
the waiting request is served when room comes back."""

import threading
import time

import httpx

from tests.e2e.swarm import Swarm

PROMPT = [1] + [10 + i % 90 for i in range(149)]  # 150 tokens: 160 of a 256-token budget (pages of 16)


def test_a_full_queue_answers_429_and_the_waiting_request_is_served(tiny_dir, tmp_path):
    swarm = Swarm(str(tiny_dir("llama")), ["0:3", "3:6"], tmp_path, model_name="tiny",
                  gateway_args=["--max-queue", "1", "--queue-timeout", "60"],
                  blockserver_args=["--cache-tokens", "256", "--cache-page-tokens", "16", "--alloc-timeout", "0.1"])
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 100, "temperature": 0, "logit_bias": {"2": -100}}
    try:
        swarm.start()
        results = {}
        with httpx.stream("POST", f"{swarm.url}/v1/completions", json=body | {"stream": True}, timeout=60) as first:
            lines = first.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # the first runs

            def second():
                results["second"] = httpx.post(f"{swarm.url}/v1/completions", json=body, timeout=60)

            waiter = threading.Thread(target=second)
            waiter.start()
            deadline = time.monotonic() + 10
            while swarm.health()["queued"] != 1:  # the second waits for room
                assert time.monotonic() < deadline
                time.sleep(0.01)
            started = time.monotonic()
            third = httpx.post(f"{swarm.url}/v1/completions", json=body, timeout=60)
            refused_in = time.monotonic() - started
            rest = [line for line in lines if line]
        waiter.join(60)
        assert third.status_code == 429 and refused_in < 1
        assert int(third.headers["retry-after"]) > 0
        error = third.json()["error"]
        assert error["code"] == "overloaded" and "overloaded" in error["message"]
        assert rest[-1] == "data: [DONE]"
        assert results["second"].status_code == 200
        health = swarm.health()
        assert health["banned"] == [] and health["failover"]["failures"] == 0 and health["queued"] == 0
    finally:
        swarm.stop()
