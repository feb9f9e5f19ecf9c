"""Quantized blockservers and the dyn8 wire codec behind the real gateway, in-process: frames
really carry dyn8 both ways, concurrent users each get what they get alone, and the swarm's views
say how each server stores its weights."""

import asyncio

from tests.service.inprocess import in_process_swarm

BODY = {"model": "tiny", "prompt": [1, 40, 41, 42, 43, 44, 45, 46], "max_tokens": 12, "temperature": 0,
        "logit_bias": {"2": -100}}
PROMPTS = [[1, 40, 41], [1, 50, 51, 52, 53, 54, 55], [1, 60], [1, 70, 71, 72, 73]]


class Spy:
    """Counts the codecs of the hidden states that cross each channel."""

    def __init__(self, connect):
        self.connect, self.codecs = connect, {"sent": set(), "received": set()}

    async def __call__(self, url, timeout_s, max_frame_bytes):
        channel = await self.connect(url, timeout_s, max_frame_bytes)
        spy = self

        class Spied:
            async def send(self, frame):
                spy.note("sent", frame)
                await channel.send(frame)

            async def recv(self):
                frame = await channel.recv()
                spy.note("received", frame)
                return frame

            async def close(self):
                await channel.close()

            def abort(self):
                channel.abort()

        return Spied()

    def note(self, direction, frame):
        import msgpack

        length = int.from_bytes(frame[:4], "big")
        for d in msgpack.unpackb(frame[4:4 + length])["tensors"]:
            if d["name"] == "hidden":
                self.codecs[direction].add(d["codec"])


def test_int8_servers_and_dyn8_wire_serve_concurrent_users_as_they_serve_one(tiny_dir):
    async def scenario():
        async with in_process_swarm(tiny_dir("llama"), {"a": "0:3", "b": "3:6"}, quant="int8",
                                    gateway={"wire_codec": "dyn8"}) as swarm:
            spy = Spy(swarm.state.connect)
            swarm.state.connect = spy
            alone = []
            for prompt in PROMPTS:
                r = await swarm.client.post("/v1/completions", json=BODY | {"prompt": prompt})
                assert r.status_code == 200, r.text
                alone.append(r.json()["choices"][0]["text"])
            together = await asyncio.gather(*(swarm.client.post("/v1/completions", json=BODY | {"prompt": p})
                                              for p in PROMPTS))
            servers = (await swarm.client.get("/v1/swarm")).json()["servers"]
            page = (await swarm.client.get("/swarm")).text
            return alone, [r.json()["choices"][0]["text"] for r in together], spy.codecs, servers, page, swarm

    alone, together, codecs, servers, page, swarm = asyncio.run(scenario())
    assert together == alone
    assert codecs == {"sent": {"dyn8"}, "received": {"dyn8"}}
    assert {s["quant"] for s in servers} == {"int8"} and "s.quant" in page
    assert swarm.state.swarm.load == {}
