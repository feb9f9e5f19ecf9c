"""`corolla up` serving the real SmolLM2-135M-Instruct in 3 spans, used through the official
OpenAI SDK, by many users at once (with some that leave early), then stopped with Ctrl-C."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

from tests.e2e.swarm import free_port

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("up") / "up.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "corolla", "up", "--servers", "3", "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while "corolla: ready" not in log.read_text():
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield url, process, log
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def test_openai_sdk_chat_against_corolla_up(up):
    url, _, log = up
    text = log.read_text()
    assert "curl " in text and "OpenAI(base_url=" in text and "layers 0:10 10:20 20:30" in text
    with OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        check_sdk(client)


def check_sdk(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=30)
    assert "Paris" in answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=30, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in streamed if c.choices]
    assert len(pieces) > 3
    assert "".join(pieces) == answer.choices[0].message.content
    completion = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0)
    assert "Paris" in completion.choices[0].text


COUNTRIES = ["France", "Germany", "Italy", "Spain", "Japan", "Canada", "Egypt", "Peru",
             "Kenya", "Norway", "Chile", "India", "Greece", "Cuba", "Poland", "Sweden"]


def blockservers(url: str, client: httpx.Client = httpx) -> list[dict]:
    servers = client.get(f"{url}/v1/swarm", timeout=5).json()["servers"]
    return [client.get(f"{s['url']}/health", timeout=5).json() for s in servers]


def wait_all_free(url: str, within_s: float) -> float:
    """Seconds until every blockserver holds no session and its whole budget is free, and the
    gateway counts no session of its own; fails after `within_s`."""
    started = time.monotonic()
    with httpx.Client() as client:  # kept alive: polls cost little, so they measure the servers, not us
        while True:
            servers = blockservers(url, client)
            swarm = client.get(f"{url}/v1/swarm", timeout=5).json()
            if all(s["sessions"] == 0 and s["cache_tokens_left"] == s["cache_tokens"] for s in servers) and \
                    all(s["gateway_sessions"] == 0 for s in swarm["servers"]):
                return time.monotonic() - started
            assert time.monotonic() - started < within_s, (servers, swarm)
            time.sleep(0.02)


def test_openai_sdk_scores_json_tools_and_metrics_against_corolla_up(up):
    """The round-2 API surface through the SDK against real processes: logprobs, prompt scoring,
    best_of, a JSON-schema answer validated by jsonschema, a forced tool call, and /metrics."""
    import jsonschema

    url, _, _ = up
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                               "country": {"type": "string", "maxLength": 30}},
              "required": ["city", "country"], "additionalProperties": False}
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"],
        "additionalProperties": False}}}
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    with OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        chat = client.chat.completions.create(model=MODEL, messages=ask, temperature=0, max_tokens=8, logprobs=True,
                                              top_logprobs=3)
        content = chat.choices[0].logprobs.content
        assert "".join(t.token for t in content) == chat.choices[0].message.content
        assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
        scored = client.completions.create(model=MODEL, prompt="The capital of France is Paris", max_tokens=0,
                                           echo=True, logprobs=1)
        lp = scored.choices[0].logprobs
        assert scored.choices[0].text == "The capital of France is Paris" and lp.token_logprobs[0] is None
        assert all(v < 0 for v in lp.token_logprobs[1:])
        best = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, best_of=3, n=1,
                                         temperature=1.0, seed=1)
        assert len(best.choices) == 1 and best.usage.completion_tokens > 8
        answer = client.chat.completions.create(model=MODEL, messages=ask, temperature=0, response_format={
            "type": "json_schema", "json_schema": {"name": "capital", "schema": schema, "strict": True}})
        jsonschema.validate(json.loads(answer.choices[0].message.content), schema)
        call = client.chat.completions.create(
            model=MODEL, temperature=0, max_tokens=40, tools=[weather], tool_choice="required",
            messages=[{"role": "user", "content": "What is the weather in Paris?"}]).choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"]
    metrics = httpx.get(f"{url}/metrics", timeout=5).text
    assert 'corolla_gateway_requests_total{method="POST",route="/v1/chat/completions",status="200"}' in metrics
    assert "corolla_gateway_time_to_first_token_seconds_bucket" in metrics


def test_sixteen_default_chats_at_once(up):
    """No max_tokens: each chat may run to the end of its context (8192 tokens), yet 16 of them
    run side by side, because servers reserve cache pages as sessions grow; their steps share
    batched ticks, and each greedy answer equals the same chat run alone (float32)."""
    url, _, _ = up

    def chat(country: str) -> dict:
        body = {"model": MODEL, "temperature": 0,
                "messages": [{"role": "user", "content": f"What is the capital of {country}?"}]}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    alone = [chat(country) for country in COUNTRIES]
    before = blockservers(url)
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(chat, COUNTRIES))
    after = blockservers(url)
    assert all(c["finish_reason"] == "stop" for c in together)
    assert [c["message"]["content"] for c in together] == [c["message"]["content"] for c in alone]
    steps = [a["steps"] - b["steps"] for a, b in zip(after, before)]
    ticks = [a["ticks"] - b["ticks"] for a, b in zip(after, before)]
    assert all(s >= 2 * t for s, t in zip(steps, ticks)), (steps, ticks)  # sessions shared ticks
    health = httpx.get(f"{url}/health").json()
    assert health["banned"] == [] and health["failover"]["failures"] == 0
    wait_all_free(url, 5)


def test_a_request_over_every_budget_is_refused_at_once(up):
    url, _, _ = up
    opened = sum(s["sessions_opened"] for s in blockservers(url))
    started = time.monotonic()
    r = httpx.post(f"{url}/v1/completions", timeout=30,
                   json={"model": MODEL, "prompt": "hi", "n": 3, "max_tokens": 8000})  # 3 x 8001 > 16384
    assert r.status_code == 400 and time.monotonic() - started < 1
    assert "largest budget" in r.json()["error"]["message"]
    assert sum(s["sessions_opened"] for s in blockservers(url)) == opened  # nothing was reserved
    assert httpx.get(f"{url}/health").json()["banned"] == []


def test_a_client_that_leaves_frees_every_hop_within_two_seconds(up):
    url, _, _ = up
    body = {"model": MODEL, "temperature": 0, "max_tokens": 400, "logit_bias": {"2": -100},
            "messages": [{"role": "user", "content": "Tell me a long story."}]}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body | {"stream": True}, timeout=60) as r:
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data: ")
            if events == 3:
                assert sum(s["sessions"] for s in blockservers(url)) == 3  # one session per hop
                break
    # closing the response closed the connection mid-stream
    assert wait_all_free(url, 2.0) < 2.0
    # the same for a client that gives up on a non-streaming request (a socket closed mid-wait)
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as raw:
        payload = json.dumps(body).encode()
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        deadline = time.monotonic() + 10
        while sum(s["sessions"] for s in blockservers(url)) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert wait_all_free(url, 2.0) < 2.0
    assert httpx.get(f"{url}/health").json()["banned"] == []


def test_ctrl_c_stops_every_process(up):
    url, process, log = up
    process.send_signal(signal.SIGINT)
    assert process.wait(30) == 0
    assert "corolla: stopped" in log.read_text()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/health", timeout=2)
    leftovers = subprocess.run(["pgrep", "-f", f"--gateway http://127.0.0.1:{url.rsplit(':', 1)[1]}"],
                               capture_output=True, text=True).stdout.split()
    assert leftovers == []
