"""The swarm matches models by fingerprint, not by path or name (real processes): a gateway
serving its model under an alias takes blockservers that hold the same model anywhere, and
refuses one whose different model sits in a folder of the same name; both sides say so once."""

import shutil
import time

import httpx

from tests import tiny
from tests.e2e.swarm import Swarm


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_an_alias_a_copy_and_an_impostor(tiny_dir, tmp_path):
    original = tiny_dir("llama")
    copy = shutil.copytree(original, tmp_path / "copy" / "somewhere-else")
    impostor = tiny.save_model("mistral", tmp_path / "impostor" / original.name)  # same folder name
    swarm = Swarm(str(original), [], tmp_path, model_name="acme/chat")
    try:
        swarm.start()
        swarm.add_blockserver("0:6", model=str(copy))  # no --model-name: the fingerprint matches
        swarm.wait_healthy(60)
        r = httpx.post(f"{swarm.url}/v1/completions", timeout=60,
                       json={"model": "acme/chat", "prompt": [1, 40, 41], "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        assert [m["id"] for m in httpx.get(f"{swarm.url}/v1/models").json()["data"]] == ["acme/chat"]

        wrong = swarm.add_blockserver("0:6", model=str(impostor))
        gateway_log = tmp_path / "gateway.log"
        wait_for(lambda: "refused: blockserver" in gateway_log.read_text(), 60, "the gateway's refusal")
        wait_for(lambda: "this gateway serves acme/chat" in wrong.log.read_text(), 30, "the blockserver's line")
        time.sleep(1.5)  # three more heartbeats: still one line on each side
        refusals = [line for line in gateway_log.read_text().splitlines() if "refused: blockserver" in line]
        assert len(refusals) == 1 and "acme/chat (fingerprint" in refusals[0]
        assert sum("this gateway serves acme/chat" in line for line in wrong.log.read_text().splitlines()) == 1
        assert len(swarm.servers()) == 1  # the impostor is not in the registry
        assert swarm.health()["servers"] == 1
    finally:
        swarm.stop()
