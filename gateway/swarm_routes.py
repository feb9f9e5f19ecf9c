"""A view of the swarm: /v1/swarm (JSON), /swarm (an HTML page drawing which servers cover which
layers, refreshing itself), and the registry's routes that blockservers call."""

from __future__ import annotations

import asyncio
import hmac
import html

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from gateway.errors import APIError
from gateway.pings import ping_new
from gateway.registry import coverage
from shared.records import ServerInfo, ServerState

SECRET_HEADER = "X-Corolla-Swarm-Secret"


def build_swarm_router(state) -> APIRouter:
    router = APIRouter()
    pending: set[asyncio.Task] = set()  # first pings of new servers

    def check_secret(request: Request) -> None:
        secret = state.settings.swarm_secret
        if secret and not hmac.compare_digest(request.headers.get(SECRET_HEADER, ""), secret):
            raise APIError(403, "this swarm needs its join secret (blockserver --swarm-secret)",
                           "permission_error", code="bad_swarm_secret")

    @router.post("/registry/heartbeat")
    async def heartbeat(info: ServerInfo, request: Request):
        """A blockserver's heartbeat: its record, renewed for its TTL (offline removes it)."""
        check_secret(request)
        new = info.server_id not in state.swarm.costs.rtts
        state.swarm.registry.heartbeat(info)
        if new and info.state == ServerState.online:
            task = asyncio.create_task(ping_new(info, state.swarm.costs))
            pending.add(task)
            task.add_done_callback(pending.discard)
        return {"ok": True}

    @router.get("/registry/servers")
    async def servers(request: Request):
        """Every live blockserver record (joining ones included), of every model."""
        check_secret(request)
        return [s.model_dump(mode="json") for s in state.swarm.registry.servers()]

    @router.get("/v1/swarm")
    async def swarm():
        """The swarm serving this gateway's model: servers, spans, states, speed, free cache, open
        sessions, and per-layer coverage."""
        return snapshot(state)

    @router.get("/swarm", response_class=HTMLResponse)
    async def swarm_page():
        """The same, drawn: one row per server over the model's layers; refreshes every 2 s."""
        return render(snapshot(state))

    return router


def snapshot(state) -> dict:
    model = state.model
    records = state.swarm.registry.servers(model.name)
    online = [s for s in records if s.state == ServerState.online]
    costs, banned = state.swarm.costs, state.swarm.bans.active()
    counts = coverage(online, model.num_layers)
    throughput = [0.0] * model.num_layers
    for s in online:
        for layer in range(s.start, min(s.end, model.num_layers)):
            throughput[layer] += s.throughput
    return {
        "model": model.name, "num_layers": model.num_layers,
        "servers": [{
            "server_id": s.server_id, "url": s.url, "start": s.start, "end": s.end, "state": s.state.value,
            "throughput": s.throughput, "inference_rps": s.inference_rps, "cache_tokens_left": s.cache_tokens_left,
            "sessions": s.sessions, "gateway_sessions": costs.load.get(s.server_id, 0), "dtype": s.dtype,
            "rtt_ms": round(costs.rtts[s.server_id] * 1000, 2) if s.server_id in costs.rtts else None,
            "banned": s.server_id in banned, "version": s.version,
        } for s in records],
        "coverage": counts, "layer_throughput": throughput,
        "missing_layers": [i for i, c in enumerate(counts) if c == 0],
        "failover": vars(state.swarm.failovers),
    }


def render(snap: dict) -> str:
    n = snap["num_layers"]
    colors = {"online": "#3b8e4f", "joining": "#d6a21e", "offline": "#999"}
    rows = []
    for s in snap["servers"]:
        cells = "".join(
            f'<td class="{"on" if s["start"] <= i < s["end"] else ""}" '
            f'style="{"background:" + colors[s["state"]] if s["start"] <= i < s["end"] else ""}"></td>'
            for i in range(n))
        rtt = "–" if s["rtt_ms"] is None else f'{s["rtt_ms"]:.1f} ms'
        rows.append(f'<tr><th class="id">{html.escape(s["server_id"])}<br><small>{html.escape(s["url"])}</small></th>'
                    f'{cells}<td class="num">{s["start"]}:{s["end"]}</td><td>{s["state"]}</td>'
                    f'<td class="num">{s["throughput"]:.1f}</td><td class="num">{s["sessions"]}</td>'
                    f'<td class="num">{s["cache_tokens_left"]}</td><td class="num">{rtt}</td></tr>')
    cover = "".join(f'<td class="cov{"" if c else " missing"}">{c}</td>' for c in snap["coverage"])
    header = "".join(f"<th>{i}</th>" for i in range(n))
    status = ("every layer is served" if not snap["missing_layers"]
              else f'missing layers: {", ".join(map(str, snap["missing_layers"]))}')
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">
<title>Corolla swarm · {html.escape(snap["model"])}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ddd; padding: 2px 6px; text-align: center; }}
td.on {{ min-width: 14px; }}
th.id {{ text-align: left; font-weight: 600; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
td.cov {{ background: #eef6ee; }} td.missing {{ background: #f4c7c3; font-weight: 700; }}
.ok {{ color: #3b8e4f; }} .bad {{ color: #b3261e; }}
</style></head>
<body>
<h1>{html.escape(snap["model"])}</h1>
<p class="{"ok" if not snap["missing_layers"] else "bad"}">{len(snap["servers"])} servers · {n} layers · {status}</p>
<table>
<tr><th>server</th>{header}<th>span</th><th>state</th><th>tok/s</th><th>sessions</th><th>free cache</th><th>RTT</th></tr>
{"".join(rows)}
<tr><th>servers per layer</th>{cover}<td colspan="6"></td></tr>
</table>
<p><small>failovers: {snap["failover"]["failures"]} failures, {snap["failover"]["recoveries"]} recovered ·
refreshes every 2 s · <a href="/v1/swarm">JSON</a></small></p>
</body></html>"""
