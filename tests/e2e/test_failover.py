"""Blockservers die mid-answer (kill -9, SIGSTOP) and the generation goes on, token-identical;
with nothing to replace them, the request ends with a clear error within the deadline."""

import json
import signal
import threading
import time

import httpx
import pytest

from tests.e2e.swarm import Swarm

PROMPT = [1, 40, 41, 42]
TOKENS = 240  # the tiny models' context is 256
BODY = {"model": "llama", "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0,
        "logit_bias": {"2": -100}}  # no EOS: every run makes all its steps


@pytest.fixture
def make_swarm(tiny_dir, tmp_path):
    made = []

    def make(spans, gateway_args=("--step-timeout", "2", "--failover-timeout", "10", "--ban", "30")):
        s = Swarm(str(tiny_dir("llama")), spans, tmp_path, gateway_args=list(gateway_args), model_name="llama")
        made.append(s)
        s.start()
        s.wait_registered(len(spans))
        return s

    yield make
    for s in made:
        s.stop()


def stream_with(swarm, when):
    """Stream BODY; call when(n_events) after each event; return (text, events)."""
    events = []
    with httpx.stream("POST", f"{swarm.url}/v1/completions", json=BODY | {"stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
                when(len(events))
    text = "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict) and e.get("choices"))
    return text, events


def reference_text(swarm):
    r = httpx.post(f"{swarm.url}/v1/completions", json=BODY, timeout=120)
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] == TOKENS
    return r.json()["choices"][0]["text"]


def kill_busy(swarm, span, how=signal.SIGKILL):
    victim = swarm.busy(span)
    victim.send_signal(how)
    return victim


def assert_clean(events, text, expected):
    assert events[-1] == "[DONE]"
    assert not any("error" in e for e in events if isinstance(e, dict))
    assert text == expected
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_kill_with_a_replica_of_the_same_span(make_swarm):
    swarm = make_swarm(["0:2", "2:4", "2:4", "4:6"])
    expected = reference_text(swarm)
    text, events = stream_with(swarm, lambda n: n == 5 and kill_busy(swarm, "2:4"))
    assert_clean(events, text, expected)
    assert swarm.health()["failover"]["recoveries"] == 1


def test_kill_replaced_by_two_servers_with_other_boundaries(make_swarm):
    # the chain is 0:2 -> 2:5 -> 5:6; once it runs, 2:3 and 3:5 start, 2:5 is killed, and the
    # gateway waits for them to come up and rebuilds layers 2..4 on the two of them
    swarm = make_swarm(["0:2", "2:5", "5:6"], ("--step-timeout", "2", "--failover-timeout", "60", "--ban", "60"))
    expected = reference_text(swarm)

    def act(n):
        if n == 2:
            swarm.add_blockserver("2:3")
            swarm.add_blockserver("3:5")
        if n == 5:
            kill_busy(swarm, "2:5")

    text, events = stream_with(swarm, act)
    assert_clean(events, text, expected)
    assert swarm.health()["failover"]["recoveries"] == 1
    replacement = [p for p in swarm.blockservers if p.span in ("2:3", "3:5")]
    assert [_opened(p) for p in replacement] == [1, 1]


def _opened(p):
    return httpx.get(f"{p.url}/health", timeout=5).json()["sessions_opened"]


def test_three_failures_in_one_generation(make_swarm):
    swarm = make_swarm(["0:2", "0:2", "2:4", "2:4", "4:6", "4:6"])
    expected = reference_text(swarm)
    plan = {5: "0:2", 40: "2:4", 80: "4:6"}
    text, events = stream_with(swarm, lambda n: n in plan and kill_busy(swarm, plan[n]))
    assert_clean(events, text, expected)
    assert swarm.health()["failover"]["recoveries"] == 3


def test_a_hung_server_is_detected_within_the_step_timeout(make_swarm):
    swarm = make_swarm(["0:2", "2:4", "2:4", "4:6"])
    expected = reference_text(swarm)
    gaps = []
    last = [time.monotonic()]

    def hang(n):
        now = time.monotonic()
        gaps.append(now - last[0])
        last[0] = now
        if n == 5:
            kill_busy(swarm, "2:4", signal.SIGSTOP)

    text, events = stream_with(swarm, hang)
    assert_clean(events, text, expected)
    assert 1.5 < max(gaps) < 6  # one pause of about the 2 s step timeout, then on
    assert swarm.health()["failover"]["recoveries"] == 1


def test_no_replacement_ends_the_stream_with_an_error_in_time(make_swarm):
    swarm = make_swarm(["0:2", "2:4", "4:6"], ("--step-timeout", "2", "--failover-timeout", "3"))
    started = time.monotonic()
    text, events = stream_with(swarm, lambda n: n == 5 and kill_busy(swarm, "4:6"))
    assert time.monotonic() - started < 3 + 10
    assert events[-1] == "[DONE]"
    assert "error" in events[-2] and "4:6" in events[-2]["error"]["message"]
    assert swarm.health()["failover"]["given_up"] == 1


def test_no_replacement_gives_a_non_streaming_request_503(make_swarm):
    swarm = make_swarm(["0:2", "2:4", "4:6"], ("--step-timeout", "2", "--failover-timeout", "2"))
    result = {}

    def request():
        result["response"] = httpx.post(f"{swarm.url}/v1/completions", json=BODY, timeout=60)

    thread = threading.Thread(target=request)
    thread.start()
    for _ in range(100):
        try:
            kill_busy(swarm, "2:4")
            break
        except LookupError:
            time.sleep(0.01)
    thread.join(30)
    response = result["response"]
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"].isdigit()
    assert "2:4" in response.json()["error"]["message"]


def test_a_vanished_gateway_leaks_no_cache(make_swarm):
    swarm = make_swarm(["0:2", "2:4", "4:6"])
    initial = {p.url: httpx.get(f"{p.url}/health").json()["cache_tokens_left"] for p in swarm.blockservers}
    with pytest.raises(httpx.HTTPError):  # the stream breaks off when the gateway dies
        stream_with(swarm, lambda n: n == 5 and swarm.gateway.send_signal(signal.SIGKILL))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = {p.url: httpx.get(f"{p.url}/health").json()["cache_tokens_left"] for p in swarm.blockservers}
        if now == initial:
            break
        time.sleep(0.2)
    assert now == initial
