"""`corolla up` serving the real SmolLM2-135M-Instruct in 3 spans, used through the official
OpenAI SDK, then stopped with Ctrl-C (SIGINT)."""

import os
import signal
import subprocess
import sys
import time

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
