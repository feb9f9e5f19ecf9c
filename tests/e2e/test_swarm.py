"""The self-organizing swarm with real processes: blockservers choose their spans, rebalance when
one dies, need the swarm's secret, feed two gateways; routing avoids a slow replica and spreads
concurrent sessions; the /swarm page in headless Chromium."""

import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from shared.identity import Identity, read_token
from tests.e2e.delay_proxy import DelayProxy
from tests.e2e.swarm import Swarm, free_port

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
BODY = {"model": "llama", "prompt": [1, 40, 41, 42], "max_tokens": 12, "temperature": 0}


@pytest.fixture
def swarms(tiny_dir, tmp_path):
    made = []

    def make(gateway_args=(), blockserver_args=()):
        s = Swarm(str(tiny_dir("llama")), [], tmp_path, gateway_args=list(gateway_args),
                  blockserver_args=list(blockserver_args), model_name="llama")
        s.gateway = s._spawn(f"gateway-{len(made)}", ["gateway", "--model", s.model, "--model-name", "llama",
                                                      "--port", str(s.port), *s.gateway_args])
        made.append(s)
        wait_for(lambda: httpx.get(f"{s.url}/health", timeout=2).status_code in (200, 503), 60, "gateway up")
        return s

    yield make
    for s in made:
        s.stop()


def wait_for(predicate, timeout_s=60, what="condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(what)


def complete(swarm, **extra):
    r = httpx.post(f"{swarm.url}/v1/completions", json=BODY | extra, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def covered(swarm) -> bool:
    return httpx.get(f"{swarm.url}/health", timeout=5).status_code == 200


def test_servers_choose_spans_and_rebalance_after_a_death(swarms):
    swarm = swarms(blockserver_args=["--num-blocks", "3", "--balance-period", "1", "--join-delay", "0.5"])
    for _ in range(3):
        swarm.add_blockserver(None)
    wait_for(lambda: covered(swarm) and len(swarm.servers()) == 3, 90, "3 servers covering 6 layers")
    text = complete(swarm)
    spans = {s["server_id"]: (s["start"], s["end"]) for s in swarm.servers()}
    assert all(end - start == 3 for start, end in spans.values())
    # kill a server whose layers nobody else serves
    by_url = {p.url: p for p in swarm.blockservers}
    records = swarm.servers()
    lonely = next(s for s in records if sum(1 for o in records if (o["start"], o["end"]) == (s["start"], s["end"])) == 1)
    by_url[lonely["url"]].send_signal(signal.SIGKILL)
    wait_for(lambda: len(swarm.servers()) == 2, 20, "the dead server to expire")
    wait_for(lambda: covered(swarm), 60, "the survivors to rebalance over every layer")
    assert complete(swarm) == text
    health = httpx.get(f"{swarm.url}/health").json()
    assert health["coverage"] == [1] * 6


def test_a_blockserver_without_the_secret_is_refused(swarms):
    swarm = swarms(gateway_args=["--swarm-secret", "open-sesame"])
    outsider = swarm.add_blockserver("0:6")
    wait_for(lambda: "refused the heartbeat: 403" in next(swarm.log_dir.glob("blockserver-0-6-*.log")).read_text(),
             60, "the outsider's heartbeat to be refused")
    assert outsider.poll() is None
    assert httpx.get(f"{swarm.url}/registry/servers", headers=read_token("open-sesame")).json() == []
    assert httpx.get(f"{swarm.url}/registry/servers").status_code == 403
    assert httpx.get(f"{swarm.url}/registry/servers", headers=read_token("guess")).status_code == 403
    assert httpx.get(f"{swarm.url}/health").status_code == 503
    swarm.add_blockserver("0:6", extra=["--swarm-secret", "open-sesame"])
    wait_for(lambda: covered(swarm), 60, "the member to register")
    assert len(httpx.get(f"{swarm.url}/registry/servers", headers=read_token("open-sesame")).json()) == 1
    complete(swarm)

    # even knowing the secret, another key cannot speak for the member, and no heartbeat counts twice
    member = httpx.get(f"{swarm.url}/v1/swarm").json()["servers"][0]
    fingerprint = httpx.get(f"{swarm.url}/health").json()["fingerprint"]
    intruder = Identity.generate()
    takeover = {"server_id": member["server_id"], "url": "http://127.0.0.1:9", "model": fingerprint, "start": 0,
                "end": 6, "state": "offline"}
    heartbeat = f"{swarm.url}/registry/heartbeat"
    assert httpx.post(heartbeat, json=intruder.sign("heartbeat", takeover, "open-sesame")).status_code == 403
    own = intruder.sign("heartbeat", takeover | {"server_id": intruder.id, "state": "joining"}, "open-sesame")
    assert httpx.post(heartbeat, json=own).status_code == 200
    assert httpx.post(heartbeat, json=own).status_code == 403  # replayed
    assert member["server_id"] in {s["server_id"] for s in httpx.get(f"{swarm.url}/v1/swarm").json()["servers"]}
    complete(swarm)


def test_two_gateways_fed_by_the_same_blockservers(swarms):
    first, second = swarms(), swarms()
    for span in ("0:3", "3:6"):
        first.add_blockserver(span, gateways=[first.url, second.url])
    wait_for(lambda: covered(first) and covered(second), 60, "both gateways covered")
    assert complete(first) == complete(second)


def _opened(p) -> int:
    return httpx.get(f"{p.url}/health", timeout=2).json()["sessions_opened"]


def test_routing_avoids_a_replica_behind_50ms_and_spreads_concurrent_sessions(swarms):
    swarm = swarms(gateway_args=["--ping-interval", "0.3"])
    swarm.add_blockserver("0:2")
    fast = swarm.add_blockserver("2:4")
    slow_port = free_port()
    with DelayProxy(slow_port, 0.025) as proxy:  # 25 ms each way: +50 ms round trip
        slow = swarm.add_blockserver("2:4", port=slow_port, extra=["--public-url", f"http://127.0.0.1:{proxy.port}"])
        swarm.add_blockserver("4:6")

        def measured():
            rtts = {s["url"]: s["rtt_ms"] for s in httpx.get(f"{swarm.url}/v1/swarm").json()["servers"]}
            return len(rtts) == 4 and all(v is not None for v in rtts.values()) and \
                rtts[f"http://127.0.0.1:{proxy.port}"] > 50
        wait_for(measured, 60, "RTTs measured")
        for _ in range(5):
            complete(swarm)
        assert _opened(fast) == 5 and _opened(slow) == 0

    # an evenly fast pair: 8 concurrent streams spread over both replicas
    pair = swarms(gateway_args=["--ping-interval", "0.3"])
    pair.add_blockserver("0:3")
    a, b = pair.add_blockserver("3:6"), pair.add_blockserver("3:6")
    wait_for(lambda: covered(pair) and len(pair.servers()) == 3, 60, "pair covered")

    def links_measured():
        # the gateway's RTT to each server and the first server's to both replicas: until the
        # latter arrive with a heartbeat, routing falls back on the former, and mixing the two
        # sources makes equal replicas look unequal
        servers = httpx.get(f"{pair.url}/v1/swarm").json()["servers"]
        first = next(s for s in servers if s["start"] == 0)
        replicas = {s["server_id"] for s in servers if s["start"] == 3}
        return all(s["rtt_ms"] is not None for s in servers) and replicas <= set(first["next_rtt_ms"])
    wait_for(links_measured, 30, "RTTs measured")

    def stream():
        # long enough that all 8 are open at once
        body = BODY | {"max_tokens": 200, "stream": True, "logit_bias": {"2": -100}}
        with httpx.stream("POST", f"{pair.url}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            for _ in r.iter_lines():
                pass

    threads = [threading.Thread(target=stream) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert _opened(a) + _opened(b) == 8
    assert min(_opened(a), _opened(b)) >= 2, (_opened(a), _opened(b))


def test_swarm_views_and_a_screenshot_of_the_page(swarms):
    swarm = swarms()
    for span in ("0:2", "2:6", "2:4"):
        swarm.add_blockserver(span)
    wait_for(lambda: covered(swarm) and len(swarm.servers()) == 3, 60, "covered")
    snap = httpx.get(f"{swarm.url}/v1/swarm").json()
    assert snap["coverage"] == [1, 1, 2, 2, 1, 1] and len(snap["servers"]) == 3
    page = httpx.get(f"{swarm.url}/swarm").text
    assert all(s["server_id"] in page for s in snap["servers"]) and 'http-equiv="refresh"' not in page
    status = subprocess.run([sys.executable, "-m", "corolla", "status", "--gateway", swarm.url],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "every layer served" in status.stdout
    assert all(s["server_id"] in status.stdout for s in snap["servers"])

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "the /swarm page test needs Chromium (.ci/install installs it)"
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "swarm.png"
    shot.unlink(missing_ok=True)
    browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={swarm.log_dir / 'chromium'}", "--window-size=1000,420",
               "--virtual-time-budget=7000"]  # three in-place updates; the page must still settle
    dom = subprocess.run(browser + ["--dump-dom", f"{swarm.url}/swarm"], capture_output=True, text=True, timeout=120)
    assert "every layer is served" in dom.stdout and dom.stdout.count('class="id"') == 3
    assert all(s["server_id"] in dom.stdout for s in snap["servers"])
    subprocess.run(browser + [f"--screenshot={shot}", f"{swarm.url}/swarm"], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 5000
