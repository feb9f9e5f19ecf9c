"""Authenticated membership: signed, time-stamped heartbeats whose ids are their keys', the swarm
secret proven by HMAC, records validated, per-source caps; blockservers serve only sessions
granted by their gateways, cap sessions per address, and free a session that sends only junk.
The gateway in-process through httpx's ASGI transport; the blockserver through Starlette's
test client."""

import asyncio
import time

import pytest
from starlette.testclient import TestClient

from blockserver.app import create_app as create_blockserver
from blockserver.settings import BlockserverSettings
from gateway.app import create_app as create_gateway
from gateway.settings import GatewaySettings
from shared import protocol
from shared.identity import GRANT, HEARTBEAT, STATELESS, Identity, read_token
from shared.models.loader import load_facts
from shared.records import ServerInfo

SECRET = "open-sesame"


def record(identity: Identity, fingerprint: str, **fields) -> dict:
    return ServerInfo(server_id=identity.id, url="http://127.0.0.1:9", model=fingerprint, start=0, end=6,
                      throughput=10.0, **fields).model_dump(mode="json")


async def _gateway_scenario(directory):
    import httpx

    settings = GatewaySettings(model=str(directory), model_name="tiny", num_threads=1, ping_interval_s=3600.0,
                               swarm_secret=SECRET, max_servers_per_source=3)
    app = create_gateway(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
            fingerprint = app.state.gateway.model.facts.fingerprint
            post = lambda body: client.post("/registry/heartbeat", json=body)  # noqa: E731
            me = Identity.generate()
            ok = me.sign(HEARTBEAT, record(me, fingerprint), SECRET)
            first = await post(ok)
            assert first.status_code == 200, first.text
            assert first.json()["gateway_key"] == app.state.gateway.membership.identity.public_key

            refused = {
                "unsigned": record(me, fingerprint),
                "replayed": ok,
                "no secret": me.sign(HEARTBEAT, record(me, fingerprint)),
                "wrong secret": me.sign(HEARTBEAT, record(me, fingerprint), "guess"),
                "stale": me.sign(HEARTBEAT, record(me, fingerprint), SECRET, now=time.time() - 600),
                "wrong purpose": me.sign(GRANT, record(me, fingerprint), SECRET),
                # another key speaking for my id: its record names my id, its key derives another
                "takeover": Identity.generate().sign(HEARTBEAT, record(me, fingerprint, state="offline"), SECRET),
                "tampered": ok | {"payload": ok["payload"].replace('"start":0', '"start":1')},
            }
            for why, body in refused.items():
                r = await post(body)
                assert r.status_code == 403, (why, r.text)
                assert r.json()["error"]["type"] == "permission_error"

            invalid = {
                "infinite": {"throughput": "Infinity"},
                "past the model": {"end": 7},
                "empty span": {"start": 3, "end": 3},
                "scheme": {"url": "file:///etc/passwd"},
                "negative ping": {"next_pings": {"x": -1e9}},
                "long ttl": {"ttl_s": 3600},
            }
            # a URL elsewhere than the heartbeat's address: the gateway would be made to reach that host
            for url in ("http://10.9.9.9:9", "http://example.invalid:9"):
                r = await post(me.sign(HEARTBEAT, record(me, fingerprint) | {"url": url}, SECRET))
                assert r.status_code == 403 and r.json()["error"]["code"] == "foreign_url", r.text
            assert (await post(me.sign(HEARTBEAT, record(me, fingerprint) | {"url": "http://localhost:9"},
                                       SECRET))).status_code == 200  # loopback is one host
            app.state.gateway.settings.allow_foreign_urls = True
            assert (await post(me.sign(HEARTBEAT, record(me, fingerprint) | {"url": "http://10.9.9.9:9"},
                                       SECRET))).status_code == 200
            app.state.gateway.settings.allow_foreign_urls = False
            assert (await post(me.sign(HEARTBEAT, record(me, fingerprint), SECRET))).status_code == 200
            for why, change in invalid.items():
                body = me.sign(HEARTBEAT, record(me, fingerprint) | change, SECRET)
                r = await post(body)
                assert r.status_code == 400, (why, r.text)
            swarm = app.state.gateway.swarm
            assert [(s.server_id, s.start) for s in swarm.records()] == [(me.id, 0)]  # untouched by the refused
            # blockservers plan with joining records and online ones the gateway reached: mine answers no ping
            joiner = Identity.generate()
            assert (await post(joiner.sign(HEARTBEAT, record(joiner, fingerprint, state="joining"), SECRET))).status_code == 200
            servers = (await client.get("/registry/servers", headers=read_token(SECRET))).json()
            assert [s["server_id"] for s in servers] == [joiner.id]
            swarm.rtts.add(me.id, 0.001)  # as if it had answered
            servers = (await client.get("/registry/servers", headers=read_token(SECRET))).json()
            assert {s["server_id"] for s in servers} == {me.id, joiner.id}
            assert (await client.get("/registry/servers", headers=read_token("guess"))).status_code == 403
            assert (await client.get("/v1/swarm")).status_code == 200

            # three records from one address at most; renewing one of them is fine
            others = [Identity.generate() for _ in range(2)]
            answers = [(await post(o.sign(HEARTBEAT, record(o, fingerprint), SECRET))).status_code for o in others]
            assert answers == [200, 429]  # me, the joiner and one more
            app.state.gateway.membership.max_servers = 3  # and the registry as a whole is capped too
            r = await client.post("/registry/heartbeat", json=others[1].sign(HEARTBEAT, record(others[1], fingerprint),
                                                                              SECRET),
                                  headers={"x-forwarded-for": "elsewhere"})
            assert r.status_code == 429 and "registry is full" in r.json()["error"]["message"]
            app.state.gateway.membership.max_servers = 1024
            renewed = await post(me.sign(HEARTBEAT, record(me, fingerprint, sessions=1), SECRET))
            assert renewed.status_code == 200
            # offline: removed, and that old envelope cannot bring it back
            bye = await post(me.sign(HEARTBEAT, record(me, fingerprint, state="offline"), SECRET))
            assert bye.status_code == 200
            assert (await post(ok)).status_code == 403
            assert me.id not in {s.server_id for s in swarm.records()}


def test_heartbeats_are_signed_fresh_and_validated(tiny_dir):
    asyncio.run(_gateway_scenario(tiny_dir("llama")))


@pytest.fixture
def guarded(tiny_dir):
    """A blockserver of layers 2:4 that heartbeats to a gateway (unreachable here) whose key is
    `gateway`'s: it honours that key's grants only. Two sessions per address at most; idle after 1 s."""
    directory = tiny_dir("llama")
    settings = BlockserverSettings(model=str(directory), blocks="2:4", throughput=1000.0, dtype="float32",
                                   num_threads=1, idle_timeout_s=1.0, max_sessions_per_peer=2,
                                   gateways=["http://127.0.0.1:9"], heartbeat_interval_s=60)
    app = create_blockserver(settings, "http://127.0.0.1:1")
    gateway = Identity.generate("gw")
    with TestClient(app) as client:
        service = app.state.service
        next(iter(service.links.values())).gateway_key = gateway.public_key
        client.service, client.gateway = service, gateway
        client.fingerprint = load_facts(directory).fingerprint
        yield client


def _open(ws, client, session_id, grant):
    ws.send_bytes(protocol.encode(protocol.Open(session_id=session_id, model=client.fingerprint, span=[2, 4],
                                                max_length=16, dtype="float32", grant=grant)))
    return protocol.decode(ws.receive_bytes(), 1 << 26).header


def test_sessions_need_a_grant_from_a_gateway_served(guarded):
    server_id = guarded.service.server_id
    grant = lambda session, key=guarded.gateway, server=server_id: key.sign(  # noqa: E731
        GRANT, {"server": server, "session": session})
    cases = {
        "none": None,
        "an untrusted gateway's": grant("s1", key=Identity.generate("gw")),
        "another session's": grant("other"),
        "another server's": grant("s1", server="bs-elsewhere"),
        "expired": guarded.gateway.sign(GRANT, {"server": server_id, "session": "s1"}, now=time.time() - 600),
    }
    for why, given in cases.items():
        with guarded.websocket_connect("/ws") as ws:
            reply = _open(ws, guarded, "s1", given)
            assert isinstance(reply, protocol.Error) and reply.code == "unauthorized", (why, reply)
    hidden = {"hidden": protocol_zero(guarded)}
    with guarded.websocket_connect("/ws") as ws:  # a stateless pass without a grant
        ws.send_bytes(protocol.encode(protocol.Forward(model=guarded.fingerprint, span=[2, 4]), hidden))
        assert protocol.decode(ws.receive_bytes(), 1 << 26).header.code == "unauthorized"
        ws.send_bytes(protocol.encode(protocol.Forward(model=guarded.fingerprint, span=[2, 4],
                                                       grant=grant(STATELESS)), hidden))
        assert isinstance(protocol.decode(ws.receive_bytes(), 1 << 26).header, protocol.Result)
    assert guarded.service.runtime.cache_tokens_left == guarded.service.settings.cache_tokens

    # granted sessions open; a third from this address is one too many
    with guarded.websocket_connect("/ws") as a, guarded.websocket_connect("/ws") as b, \
            guarded.websocket_connect("/ws") as c:
        assert isinstance(_open(a, guarded, "s1", grant("s1")), protocol.Ready)
        assert isinstance(_open(b, guarded, "s2", grant("s2")), protocol.Ready)
        third = _open(c, guarded, "s3", grant("s3"))
        assert isinstance(third, protocol.Error) and third.code == "overloaded"


def protocol_zero(client):
    import torch

    runtime = client.service.runtime
    return torch.zeros(1, 2, runtime.layers.hidden_size)


def test_junk_frames_do_not_keep_a_session_alive(guarded):
    server_id = guarded.service.server_id
    with guarded.websocket_connect("/ws") as ws:
        grant = guarded.gateway.sign(GRANT, {"server": server_id, "session": "idle"})
        assert isinstance(_open(ws, guarded, "idle", grant), protocol.Ready)
        started = time.monotonic()
        codes = []
        while time.monotonic() - started < 5:
            ws.send_bytes(b"\x00\x00\x00\x05junk!")  # refused, and it must not count as activity
            reply = protocol.decode(ws.receive_bytes(), 1 << 26).header
            codes.append(reply.code)
            if reply.code == "session_expired":
                break
            time.sleep(0.2)
        assert codes[-1] == "session_expired" and time.monotonic() - started < 3, codes
    deadline = time.monotonic() + 5
    while guarded.service.runtime.open_sessions() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not guarded.service.runtime.open_sessions()
