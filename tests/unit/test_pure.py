"""Pure pieces of the gateway and the protocol: stop strings, sampling, routing, registry, frames."""

import random

import msgpack
import pytest
import torch

from gateway.registry import Registry, coverage
from gateway.routing import route_chain
from gateway.sampling import SamplingParams, choose_tokens
from gateway.stops import releasable
from shared import protocol
from shared.errors import ProtocolError, Unavailable
from shared.records import ServerInfo, ServerState, Span, even_spans
from shared.rtt import WINDOW, RoundTrips


# ---- stop strings
@pytest.mark.parametrize("text, stops, expected", [
    ("hello wor", ["world"], (6, False)),       # "wor" may become "world": hold it back
    ("hello world!", ["world"], (6, True)),     # stop found: cut before it
    ("abc", [], (3, False)),
    ("ab\ufffd", [], (2, False)),               # an unfinished character waits for the next token
    ("x END y END", ["END", "y"], (2, True)),   # the earliest stop wins
    ("aaa", ["aab"], (1, False)),
])
def test_releasable(text, stops, expected):
    assert releasable(text, stops) == expected


# ---- sampling
def test_greedy_and_penalties():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    counts = torch.tensor([[0.0, 2.0, 0.0]])
    assert choose_tokens(logits, counts, SamplingParams(temperature=0), None).tolist() == [1]
    penalized = SamplingParams(temperature=0, frequency_penalty=1.0)  # 3 - 2*1 = 1 < 2
    assert choose_tokens(logits, counts, penalized, None).tolist() == [2]
    presence = SamplingParams(temperature=0, presence_penalty=1.5)  # 3 - 1.5 = 1.5 < 2
    assert choose_tokens(logits, counts, presence, None).tolist() == [2]
    biased = SamplingParams(temperature=0, logit_bias={1: -100})
    assert choose_tokens(logits, torch.zeros(1, 3), biased, None).tolist() == [2]


def test_seeded_sampling_repeats_and_top_p_cuts_the_tail():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(64, 1)
    params = SamplingParams(temperature=1.0, seed=7)
    a = choose_tokens(logits, torch.zeros(64, 4), params, torch.Generator().manual_seed(7))
    b = choose_tokens(logits, torch.zeros(64, 4), params, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and len(set(a.tolist())) > 1
    nucleus = SamplingParams(temperature=1.0, top_p=0.7)
    picked = choose_tokens(logits, torch.zeros(64, 4), nucleus, torch.Generator().manual_seed(1))
    assert set(picked.tolist()) <= {0, 1}
    top_k = SamplingParams(temperature=1.0, top_k=2)
    picked = choose_tokens(logits, torch.zeros(64, 4), top_k, torch.Generator().manual_seed(1))
    assert set(picked.tolist()) == {0, 1}


# ---- spans, registry, routing
def server(sid, start, end, sessions=0, state=ServerState.online, ttl=6.0):
    return ServerInfo(server_id=sid, url=f"http://127.0.0.1:1/{sid}", model="m", start=start, end=end,
                      sessions=sessions, state=state, ttl_s=ttl)


def test_even_spans_and_parse():
    assert even_spans(30, 3) == [Span(0, 10), Span(10, 20), Span(20, 30)]
    assert [len(s) for s in even_spans(7, 3)] == [2, 3, 2]
    assert Span.parse("3:9") == Span(3, 9)
    with pytest.raises(ValueError):
        Span.parse("9:3")


def test_registry_expires_records_and_honours_offline():
    now = [100.0]
    registry = Registry(clock=lambda: now[0])
    registry.heartbeat(server("a", 0, 2, ttl=6))
    registry.heartbeat(server("b", 2, 4, state=ServerState.joining))
    assert [s.server_id for s in registry.servers("m") if s.state == ServerState.online] == ["a"]
    assert coverage(registry.servers("m"), 4) == [1, 1, 1, 1]
    now[0] += 5.9
    assert len(registry.servers()) == 2
    now[0] += 0.2
    assert [s.server_id for s in registry.servers()] == []  # both expired (ttl 6)
    registry.heartbeat(server("a", 0, 2))
    registry.heartbeat(server("a", 0, 2, state=ServerState.offline))
    assert registry.servers() == []


def test_route_chain_tiles_the_layers_and_spreads_load():
    servers = [server("a", 0, 4), server("b", 0, 2), server("c", 2, 6), server("d", 4, 6)]
    chain = route_chain(servers, 6, rng=random.Random(0))
    assert [(h.server.server_id, h.span) for h in chain] in ([("b", Span(0, 2)), ("c", Span(2, 6))],
                                                           [("a", Span(0, 4)), ("d", Span(4, 6))])
    replicas = [server("x", 0, 3, sessions=5), server("y", 0, 3, sessions=1), server("z", 3, 6)]
    assert route_chain(replicas, 6)[0].server.server_id == "y"
    picks = {route_chain([server("p", 0, 6), server("q", 0, 6)], 6)[0].server.server_id for _ in range(40)}
    assert picks == {"p", "q"}
    # a hop may enter a span in the middle and leave it at the end of the range asked for
    middle = route_chain([server("a", 0, 4), server("b", 3, 6)], 6, start=2, end=5)
    assert [(h.server.server_id, h.span) for h in middle] in ([("a", Span(2, 4)), ("b", Span(4, 5))],
                                                             [("a", Span(2, 3)), ("b", Span(3, 5))])
    with pytest.raises(Unavailable, match="no online server covers layers 4..5"):
        route_chain([server("a", 0, 4)], 6)
    with pytest.raises(Unavailable):
        route_chain(servers, 6, banned={"a", "b"})


# ---- frames
def test_round_trips_keep_the_path_and_drop_queueing():
    rtts = RoundTrips()
    for sample in (0.002, 0.040, 0.003, 0.090):  # a busy host answers late now and then
        rtts.add("a", sample)
    assert rtts.get("a") == 0.002
    for _ in range(WINDOW):  # the path itself got slower: followed once the window has passed
        rtts.add("a", 0.050)
    assert rtts.get("a") == 0.050
    rtts.keep_only(set())
    assert rtts.get("a") is None


def test_frame_round_trip_and_rejections():
    hidden = torch.randn(2, 3, 8).to(torch.bfloat16)
    message = protocol.decode(protocol.encode(protocol.Step(step_id=4, position=7), {"hidden": hidden}), 1 << 20)
    assert message.type == "step" and message.header.position == 7
    assert torch.equal(message.tensors["hidden"], hidden)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        protocol.decode(protocol.encode(protocol.Step(step_id=0, position=0), {"hidden": hidden}), 16)
    with pytest.raises(ProtocolError, match="stray bytes"):
        protocol.decode(protocol.encode(protocol.Close()) + b"x", 1 << 20)
    header = msgpack.packb({"type": "step", "step_id": 0, "position": 0, "tensors": [
        {"name": "hidden", "dtype": "complex64", "shape": [1], "nbytes": 8}]})
    with pytest.raises(ProtocolError, match="bad tensor descriptor"):
        protocol.decode(len(header).to_bytes(4, "big") + header + b"\0" * 8, 1 << 20)


def frame(fields: dict, tensors: dict | None = None) -> bytes:
    """A frame with any header at all (encode() only writes valid ones)."""
    descriptors, payload = [], b""
    for name, t in (tensors or {}).items():
        raw = t.numpy().tobytes()
        descriptors.append({"name": name, "dtype": "float32", "shape": list(t.shape), "codec": "raw",
                            "nbytes": len(raw)})
        payload += raw
    header = msgpack.packb(fields | {"tensors": descriptors})
    return len(header).to_bytes(4, "big") + header + payload


@pytest.mark.parametrize("fields, tensors, error", [
    ({"type": "hello"}, None, "unknown message type"),
    ({"type": "step", "step_id": 0, "position": 0}, None, "needs the tensor"),
    ({"type": "step", "step_id": 0, "position": True}, {"hidden": torch.zeros(1)}, "position"),
    ({"type": "step", "step_id": 0, "position": -1}, {"hidden": torch.zeros(1)}, "position"),
    ({"type": "step", "step_id": 0, "position": 0, "extra": 1}, {"hidden": torch.zeros(1)}, "extra"),
    ({"type": "step", "step_id": 0, "position": 0}, {"hidden": torch.zeros(1), "weights": torch.zeros(1)},
     "carries no tensor 'weights'"),
    ({"type": "open", "session_id": "s", "model": "m", "span": [0], "max_length": 4, "dtype": "float32"}, None,
     "span"),
    ({"type": "open", "session_id": "s", "model": "m", "span": [0, 2], "max_length": 4, "dtype": "int8"}, None,
     "dtype"),
    ({"type": "open", "session_id": "", "model": "m", "span": [0, 2], "max_length": 4, "dtype": "float32"}, None,
     "session_id"),
    ({"type": "close"}, {"hidden": torch.zeros(1)}, "carries no tensor"),
])
def test_typed_headers_refuse_what_their_message_does_not_define(fields, tensors, error):
    with pytest.raises(ProtocolError, match=error):
        protocol.decode(frame(fields, tensors), 1 << 20)


def test_error_codes_map_back_to_the_exception_tree():
    from shared.errors import BadRequest, CacheFull, CorollaError, SessionExpired

    assert CorollaError.for_code("cache_full") is CacheFull
    assert CorollaError.for_code("session_expired") is SessionExpired
    assert CorollaError.for_code("bad_request") is BadRequest
    assert CorollaError.for_code("never-heard-of-it") is Unavailable
    assert CorollaError.for_code(7) is Unavailable




def test_client_messages_lose_server_addresses():
    from gateway.errors import from_corolla, redact
    from shared.errors import SessionLost

    assert redact("cannot connect to http://10.0.0.2:31330: refused") == "cannot connect to <server>: refused"
    assert redact("wss://bs.lan:443/ws dropped; 192.168.1.7:8000 and [fe80::1]:9 too") == \
        "<server> dropped; <server> and <server> too"
    assert redact("layers 3:6 of 30, ids bs-abc, 0.5s") == "layers 3:6 of 30, ids bs-abc, 0.5s"
    error = from_corolla(SessionLost("bs-1 at https://10.1.2.3:8443 gave no reply"), 5)
    assert "10.1.2.3" not in error.message and "<server>" in error.message


def test_verification_tolerance_is_per_position_not_scaled_by_outliers():
    import torch

    from gateway.verify import agree

    torch.manual_seed(0)
    honest = torch.randn(1, 4, 64)
    honest[0, 0, 3] = 20000.0  # an attention sink's outlier
    rounding = honest * (1 + 5e-3 * torch.randn_like(honest))  # bf16-like noise
    assert agree(rounding, honest, "bfloat16") and not agree(rounding, honest, "float32")
    lie = honest.clone()
    lie[0, 2] += 100.0  # far below the outlier, far above the position's own scale
    assert not agree(lie, honest, "bfloat16")
    assert not agree(honest[:, :3], honest, "bfloat16") and not agree(honest * float("nan"), honest, "bfloat16")


def test_stateless_layers_drop_their_connections_when_closing_is_cancelled():
    import asyncio

    from gateway.passes import RemoteLayers
    from gateway.swarm import Swarm

    class Stuck:
        aborted = False

        async def close(self):
            await asyncio.Event().wait()  # a peer that never finishes the closing handshake

        def abort(self):
            self.aborted = True

    async def scenario():
        remote = RemoteLayers(Swarm(), lambda: None)
        channels = [Stuck(), Stuck()]
        remote._channels = {"a": channels[0], "b": channels[1]}
        task = asyncio.create_task(remote.close())
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return channels, remote._channels

    channels, left = asyncio.run(scenario())
    assert all(c.aborted for c in channels) and left == {}
