"""A blockserver's registry traffic survives bad gateways: HTML instead of JSON, records that fail
validation, refusals. Each problem is logged once, and nothing stops its loops."""

import asyncio
import logging
from types import SimpleNamespace

import httpx

from blockserver.service import Blockserver
from blockserver.settings import BlockserverSettings
from shared.records import ServerInfo, Span


def record(server_id, model="fp", **fields):
    return ServerInfo(server_id=server_id, url=f"http://10.0.0.1:{len(server_id)}", model=model, start=0, end=2,
                      **fields).model_dump(mode="json")


def test_bad_registry_answers_are_skipped_not_fatal(caplog):
    def gateway(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if request.url.path == "/registry/servers":
            if host == "proxy":  # a captive portal answers 200 with a page
                return httpx.Response(200, text="<html>log in first</html>")
            return httpx.Response(200, json=[record("good"), {"server_id": "bad", "throughput": "Infinity"},
                                             record("other-model", model="elsewhere")])
        if host == "wrong-model":
            return httpx.Response(409, json={"error": {"message": "this gateway serves another model"}})
        return httpx.Response(200, json={"ok": True})

    async def scenario():
        settings = BlockserverSettings(gateways=["http://proxy", "http://good", "http://wrong-model"],
                                       blocks="0:2")
        service = Blockserver(settings, "http://10.0.0.9:1")
        service.http = httpx.AsyncClient(transport=httpx.MockTransport(gateway))
        service.facts = SimpleNamespace(fingerprint="fp", num_layers=2)
        service.span = Span(0, 2)
        swarm = await service.fetch_swarm()
        for _ in range(3):
            await service.heartbeat_now()
        service.compute.shutdown()
        return swarm

    with caplog.at_level(logging.WARNING):
        swarm = asyncio.run(scenario())
    assert [s.server_id for s in swarm] == ["good"]  # the page and the bad records are skipped
    assert "unreadable registry" in caplog.text
    assert caplog.text.count("this gateway serves another model") == 1  # said once, not every heartbeat
