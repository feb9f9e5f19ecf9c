"""Many users at once, in-process: a full cache is back-pressure (queue, then serve) and never a
ban; a generation that runs out of room mid-answer is preempted and recomputed with the same
answer; only real faults ban; /health degrades when bans uncover a layer; a request no route
could hold gets 400 before anything is reserved."""

import asyncio

import pytest

from tests.service.inprocess import Fault, in_process_swarm

BODY = {"model": "tiny", "temperature": 0, "logit_bias": {"2": -100}}  # no EOS: every token generated
PROMPTS = [[1, 40, 41, 42, 43, 44, 45, 46], [1, 50, 51, 52, 53]]


async def complete(swarm, prompt, max_tokens=32, **extra):
    return await swarm.client.post("/v1/completions", json=BODY | {"prompt": prompt, "max_tokens": max_tokens} | extra)


@pytest.fixture(scope="module")
def solo(tiny_dir):
    """Each prompt's text when it runs alone on roomy servers."""
    async def scenario():
        async with in_process_swarm(tiny_dir("llama"), {"a": "0:3", "b": "3:6"}) as swarm:
            return [(await complete(swarm, p)).json()["choices"][0]["text"] for p in PROMPTS]
    return asyncio.run(scenario())


def test_a_full_cache_queues_the_request_and_bans_nobody(tiny_dir):
    long_prompts = [[1] + list(range(10, 39)), [1] + list(range(60, 89))]  # 30 tokens each

    async def scenario():
        async with in_process_swarm(tiny_dir("llama"), {"a": "0:3", "b": "3:6"}) as roomy:
            alone = [(await complete(roomy, p, max_tokens=10)).json()["choices"][0]["text"] for p in long_prompts]
        # pages of 16: each prompt takes 32 tokens of a 48-token budget, so the second waits its turn
        # and a server gives up on room after 1 ms, well before the first answer is done
        async with in_process_swarm(tiny_dir("llama"), {"a": "0:3", "b": "3:6"}, cache_tokens=48,
                                    cache_page_tokens=16, alloc_timeout_s=0.001) as swarm:
            first = asyncio.create_task(complete(swarm, long_prompts[0], max_tokens=10))
            while not swarm.state.swarm.load:  # the first holds its chain
                await asyncio.sleep(0.001)
            second = asyncio.create_task(complete(swarm, long_prompts[1], max_tokens=10))
            queued = 0
            while not (first.done() and second.done()):
                queued = max(queued, swarm.state.admission.waiting)
                await asyncio.sleep(0.001)
            results = await asyncio.gather(first, second)
            return alone, results, queued, swarm.state
    alone, results, queued, state = asyncio.run(scenario())
    assert queued == 1
    assert [r.status_code for r in results] == [200, 200]
    assert [r.json()["choices"][0]["text"] for r in results] == alone
    assert state.swarm.bans.active() == set() and state.swarm.failovers.failures == 0
    assert state.swarm.load == {} and state.admission.waiting == 0


def test_running_out_of_room_mid_answer_preempts_and_recomputes(tiny_dir, solo):
    async def scenario():
        # both prompts fit at once, both answers do not: one of them waits and is recomputed
        async with in_process_swarm(tiny_dir("llama"), {"a": "0:3", "b": "3:6"}, cache_tokens=64,
                                    cache_page_tokens=16, alloc_timeout_s=0.05) as swarm:
            results = await asyncio.gather(*(complete(swarm, p) for p in PROMPTS))
            return results, swarm
    results, swarm = asyncio.run(scenario())
    assert [r.json()["choices"][0]["text"] for r in results] == solo
    stats = swarm.state.swarm.failovers
    assert stats.preemptions >= 1 and stats.failures == 0 and swarm.state.swarm.bans.active() == set()
    for server_id in ("a", "b"):
        runtime = swarm.service(server_id).runtime
        assert runtime.cache_tokens_left == runtime.cache_tokens  # every page came back


def test_a_request_no_route_could_hold_is_refused_at_once(tiny_dir):
    async def scenario():
        async with in_process_swarm(tiny_dir("llama"), {"a": "0:3", "b": "3:6"}, cache_tokens=100) as swarm:
            too_big = await complete(swarm, PROMPTS[0], max_tokens=60, n=2)  # 2 x 68 > 100
            fits = await complete(swarm, PROMPTS[0], max_tokens=40)
            chat = await swarm.client.post("/v1/chat/completions", json=BODY | {
                "messages": [{"role": "user", "content": "hi"}]})  # no max_tokens: fits what the budget allows
            return too_big, fits, chat, swarm
    too_big, fits, chat, swarm = asyncio.run(scenario())
    assert too_big.status_code == 400 and "largest budget" in too_big.json()["error"]["message"]
    assert fits.status_code == 200 and chat.status_code == 200
    assert chat.json()["choices"][0]["finish_reason"] == "length"
    assert chat.json()["usage"]["total_tokens"] <= 100
    assert swarm.service("a").runtime.sessions_opened == 2  # the refused request reserved nothing


@pytest.mark.parametrize("kind, banned", [("nan", True), ("refuse", False), ("full", False)])
def test_only_faults_ban(tiny_dir, solo, kind, banned):
    async def scenario():
        async with in_process_swarm(tiny_dir("llama"), {"a1": "0:3", "a2": "0:3", "b": "3:6"},
                                    faults=[Fault("a1", at_step=4, kind=kind)]) as swarm:
            for server_id in swarm.blockservers:  # a1 first
                swarm.state.swarm.rtts.seconds[server_id] = 1.0 if server_id == "a2" else 0.001
            r = await complete(swarm, PROMPTS[0])
            health = await swarm.client.get("/health")
            return r, health, swarm.state.swarm
    r, health, swarm = asyncio.run(scenario())
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == solo[0]
    assert (swarm.bans.active() == {"a1"}) is banned
    assert health.status_code == 200  # a2 still covers a1's layers
    assert swarm.failovers.failures == int(banned) and swarm.failovers.moves == int(not banned)


def test_health_degrades_when_bans_leave_a_layer_without_a_server(tiny_dir):
    async def scenario():
        async with in_process_swarm(tiny_dir("llama"), {"a": "0:3", "b": "3:6"},
                                    faults=[Fault("b", at_step=2, kind="drop")],
                                    gateway={"failover_timeout_s": 0.2}) as swarm:
            r = await complete(swarm, PROMPTS[0])
            return r, await swarm.client.get("/health")
    r, health = asyncio.run(scenario())
    assert r.status_code == 503
    assert health.status_code == 503 and health.json()["status"] == "degraded"
    assert health.json()["banned"] == ["b"] and health.json()["missing_layers"] == [3, 4, 5]


async def stream_with_a_stall(app, body: dict, stall_after: int, stall_s: float) -> list[bytes]:
    """POST a streaming request straight to the ASGI app; the client's `send` stalls for `stall_s`
    after `stall_after` body chunks (a reader that stops reading). Returns the chunks received."""
    chunks: list[bytes] = []
    request = [{"type": "http.request", "body": __import__("json").dumps(body).encode(), "more_body": False}]
    gone = asyncio.Event()

    async def receive():
        if request:
            return request.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            chunks.append(message["body"])
            if len(chunks) == stall_after:
                await asyncio.sleep(stall_s)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"host", b"gateway")],
             "client": ("127.0.0.1", 1), "server": ("gateway", 80), "state": {}}
    try:
        await asyncio.wait_for(app(scope, receive, send), 30)
    finally:
        gone.set()
    return chunks


def test_a_slow_reader_pauses_its_own_generation_or_is_dropped_harming_nobody(tiny_dir, solo):
    body = BODY | {"prompt": PROMPTS[0], "max_tokens": 32, "stream": True}

    async def scenario():
        # blockservers free sessions idle for 0.3 s; the gateway drops a client that reads nothing for 1.5 s
        async with in_process_swarm(tiny_dir("llama"), {"a": "0:3", "b": "3:6"}, idle_timeout_s=0.3,
                                    gateway={"stream_send_timeout_s": 1.5}) as swarm:
            paused = await stream_with_a_stall(swarm.gateway, body, stall_after=5, stall_s=0.8)
            dropped = await stream_with_a_stall(swarm.gateway, body, stall_after=5, stall_s=5.0)
            await asyncio.sleep(0.1)
            free = [swarm.service(s).runtime.cache_tokens_left == swarm.service(s).runtime.cache_tokens
                    for s in ("a", "b")]
            return paused, dropped, free, swarm.state.swarm

    paused, dropped, free, swarm = asyncio.run(scenario())
    text = "".join(__import__("json").loads(line[6:])["choices"][0]["text"]
                   for chunk in paused for line in chunk.decode().splitlines()
                   if line.startswith("data: {") and '"choices":[{' in line)
    assert text == solo[0]  # the expired sessions were rebuilt by replay: same answer
    assert b"[DONE]" not in b"".join(dropped)  # the stalled stream was cut off
    assert free == [True, True] and swarm.load == {}
    assert swarm.bans.active() == set() and swarm.failovers.failures == 0 and swarm.failovers.moves >= 2


def test_concurrent_generations_share_ticks_and_equal_their_lone_runs(tiny_dir):
    """Eight greedy requests at once (prompts of different lengths, one with n=2): every answer is
    the lone answer, and both the blockservers and the gateway's ends ran them in shared ticks."""
    prompts = [[1] + list(range(10, 10 + k)) for k in (3, 9, 14, 5, 20, 7, 11, 2)]

    async def scenario():
        async with in_process_swarm(tiny_dir("qwen2"), {"a": "0:3", "b": "3:6"}) as swarm:
            alone = [(await complete(swarm, p, max_tokens=24, n=2 if i == 3 else 1)).json() for i, p in
                     enumerate(prompts)]
            ticker = swarm.state.model.ticker
            ticks, items = ticker.ticks, ticker.items
            server = swarm.service("a").runtime.scheduler
            server_ticks, server_items = server.ticks, server.items
            together = await asyncio.gather(*(complete(swarm, p, max_tokens=24, n=2 if i == 3 else 1)
                                              for i, p in enumerate(prompts)))
            return (alone, [r.json() for r in together], (ticker.items - items) / (ticker.ticks - ticks),
                    (server.items - server_items) / (server.ticks - server_ticks))

    alone, together, gateway_batch, server_batch = asyncio.run(scenario())
    texts = [[c["text"] for c in sorted(r["choices"], key=lambda c: c["index"])] for r in alone]
    assert [[c["text"] for c in sorted(r["choices"], key=lambda c: c["index"])] for r in together] == texts
    assert gateway_batch > 2 and server_batch > 2  # requests per tick on average
