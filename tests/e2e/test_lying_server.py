"""--verify-rate with real processes: a blockserver whose answers are altered on their way out (a
proxy adds noise to every hidden state it returns) joins a swarm; the gateway catches it by
repeating steps on the other servers of its layers, bans it and routes around it, and every
answer, from concurrent clients, equals the one the honest swarm gave."""

import threading

import httpx

from tests.e2e.lying_proxy import LyingProxy
from tests.e2e.swarm import free_port
from tests.e2e.test_swarm import BODY, complete, covered, swarms, wait_for  # noqa: F401  (the fixture)


def test_a_lying_blockserver_is_caught_and_routed_around(swarms):  # noqa: F811
    swarm = swarms(gateway_args=["--verify-rate", "1.0", "--ping-interval", "0.5", "--ban", "600"])
    swarm.add_blockserver("0:3")
    swarm.add_blockserver("3:6")
    wait_for(lambda: covered(swarm), 60, "the honest swarm")
    expected = complete(swarm)
    port = free_port()
    with LyingProxy(port, free_port()) as proxy:
        swarm.add_blockserver("0:3")  # a second honest replica: the judge of disagreements
        swarm.add_blockserver("0:3", port=port, extra=["--public-url", f"http://127.0.0.1:{proxy.port}"])
        wait_for(lambda: len([s for s in httpx.get(f"{swarm.url}/v1/swarm").json()["servers"]
                              if s["rtt_ms"] is not None]) == 4, 60, "all four servers reached")
        answers, errors = [], []

        def client():
            try:
                for _ in range(3):
                    answers.append(complete(swarm))
            except Exception as exc:  # noqa: BLE001 (reported below)
                errors.append(exc)

        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors and answers == [expected] * 9
        health = httpx.get(f"{swarm.url}/health").json()
        liar = next(s["server_id"] for s in httpx.get(f"{swarm.url}/v1/swarm").json()["servers"]
                    if s["url"] == f"http://127.0.0.1:{proxy.port}")
        assert proxy.lies > 0
        assert health["banned"] == [liar], health
        assert health["verification"]["caught"] >= 1 and health["verification"]["checks"] > 0
