"""The registry's routes that blockservers call, and views of the swarm: /v1/swarm (JSON) and
/swarm (an HTML page drawing which servers cover which layers, updated in place every 2 s)."""

from __future__ import annotations

import asyncio
import json

import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from gateway.errors import APIError
from gateway.membership import Refused
from gateway.state import GatewayState, ModelDep, StateDep, check_api_key
from shared.errors import ModelMismatch
from shared.identity import TOKEN_HEADER
from shared.records import GRANT_PATH, HEARTBEAT_PATH, SERVERS_PATH, ServerInfo, ServerState

router = APIRouter()
_first_pings: set[asyncio.Task] = set()


def _refused(exc: Refused) -> APIError:
    return APIError(exc.status, exc.message, "permission_error" if exc.status == 403 else "invalid_request_error",
                    code=exc.code)


@router.post(HEARTBEAT_PATH)
async def heartbeat(request: Request, state: StateDep):
    """A blockserver's heartbeat: a signed envelope of its record (shared/identity.py), renewed for
    its TTL (offline removes it). Refused: 403 unsigned, replayed, without the swarm's secret, or
    with a URL that does not lead back to where it came from;
    400 an invalid record; 409 another model; 429 too many servers from one address. The answer
    carries this gateway's public key, whose grants the blockserver is to honour."""
    try:
        envelope = await request.json()
    except ValueError:
        raise APIError(400, "expected a JSON heartbeat envelope") from None
    if state.model is None:
        raise APIError(503, "the gateway is still loading its model", "server_error", code="loading",
                       headers={"Retry-After": "1"})
    source = request.client.host if request.client else "?"
    try:
        info = state.membership.admit(envelope, source, state.swarm.registry, state.model.num_layers)
        if not state.settings.allow_foreign_urls and info.state != ServerState.offline:
            await state.membership.check_url(info, source)
    except Refused as exc:
        raise _refused(exc) from None
    try:
        new = state.swarm.heartbeat(info)
    except ModelMismatch as exc:
        raise APIError(409, exc.message, code=exc.code) from None
    state.admission.changed()  # a server's free cache may have grown
    if new:  # measure a new server at once, so that routing does not guess for a ping period
        task = asyncio.create_task(_first_ping(state, info))
        _first_pings.add(task)
        task.add_done_callback(_first_pings.discard)
    return {"ok": True, "model": state.model.facts.fingerprint, "gateway_key": state.membership.identity.public_key}


async def _first_ping(state: GatewayState, info: ServerInfo) -> None:
    async with httpx.AsyncClient() as client:
        await state.swarm.ping(client, [info])


async def check_member(request: Request, state: StateDep) -> None:
    """Registry reads need, when the swarm has a secret, a fresh token of it (shared/identity.py)."""
    try:
        state.membership.check_read(request.headers.get(TOKEN_HEADER))
    except Refused as exc:
        raise _refused(exc) from None


@router.get(SERVERS_PATH, dependencies=[Depends(check_member)])
async def servers(state: StateDep, _: ModelDep):
    """The records blockservers plan with: joining ones, and online ones this gateway has reached
    and not banned (Swarm.members)."""
    return [s.model_dump(mode="json") for s in state.swarm.members()]


@router.get(GRANT_PATH, dependencies=[Depends(check_api_key), Depends(check_member)])
async def grant(server_id: str, state: StateDep, _: ModelDep):
    """A grant for stateless passes (forward, backward) on one server, for a fine-tuning client
    (gateway.tuning) that holds the swarm's secret and, when the gateway has one, the API key."""
    if server_id not in state.swarm.registry:
        raise APIError(404, "no such server in this swarm", param="server_id")
    return state.membership.grant(server_id)


@router.get("/v1/swarm", dependencies=[Depends(check_api_key)])
async def swarm(state: StateDep, _: ModelDep):
    """The swarm serving this gateway's model: servers, spans, states, speed, free cache, open
    sessions, and per-layer coverage."""
    return state.swarm.snapshot()


@router.get("/swarm", response_class=HTMLResponse, dependencies=[Depends(check_api_key)])
async def swarm_page(state: StateDep, _: ModelDep):
    """The same, drawn: one row per server over the model's layers, updated in place every 2 s."""
    snapshot = json.dumps(state.swarm.snapshot()).replace("</", "<\\/")  # cannot close the script element
    return PAGE.replace("__SNAPSHOT__", snapshot)


# The page draws itself from /v1/swarm's JSON and fetches it again every 2 s, replacing the table
# in place (no reload: a headless browser with a virtual-time budget settles on a screenshot).
# Every string from a record goes through textContent, never innerHTML.
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Corolla swarm</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; }
td, th { border: 1px solid #ddd; padding: 2px 6px; text-align: center; }
td.layer { min-width: 14px; }
th.id { text-align: left; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.cov { background: #eef6ee; } td.missing { background: #f4c7c3; font-weight: 700; }
.ok { color: #3b8e4f; } .bad { color: #b3261e; }
</style></head>
<body>
<h1 id="title"></h1>
<p id="status"></p>
<table id="swarm"></table>
<p><small><span id="footer"></span> · updates every 2 s · <a href="/v1/swarm">JSON</a></small></p>
<noscript>This page draws itself with JavaScript; the same data is at <a href="/v1/swarm">/v1/swarm</a>.</noscript>
<script id="snapshot" type="application/json">__SNAPSHOT__</script>
<script>
const COLORS = {online: "#3b8e4f", joining: "#d6a21e", offline: "#999"};
function cell(tag, text, cls) {
  const c = document.createElement(tag);
  if (text !== undefined) c.textContent = text;
  if (cls) c.className = cls;
  return c;
}
function draw(snap) {
  const n = snap.num_layers;
  document.title = "Corolla swarm · " + snap.model;
  document.getElementById("title").textContent = snap.model;
  const status = document.getElementById("status");
  const missing = snap.missing_layers;
  status.className = missing.length ? "bad" : "ok";
  status.textContent = snap.servers.length + " servers · " + n + " layers · " +
    (missing.length ? "missing layers: " + missing.join(", ") : "every layer is served");
  const table = document.createElement("table");
  table.id = "swarm";
  const head = table.insertRow();
  head.appendChild(cell("th", "server"));
  for (let i = 0; i < n; i++) head.appendChild(cell("th", String(i)));
  for (const h of ["span", "state", "weights", "tok/s", "sessions", "free cache", "RTT"]) head.appendChild(cell("th", h));
  for (const s of snap.servers) {
    const row = table.insertRow();
    const id = cell("th", undefined, "id");
    id.appendChild(document.createTextNode(s.server_id));
    id.appendChild(document.createElement("br"));
    id.appendChild(cell("small", s.url));
    row.appendChild(id);
    for (let i = 0; i < n; i++) {
      const c = cell("td", undefined, "layer");
      if (s.start <= i && i < s.end) c.style.background = COLORS[s.state] || "#999";
      row.appendChild(c);
    }
    row.appendChild(cell("td", s.start + ":" + s.end, "num"));
    row.appendChild(cell("td", s.state + (s.banned ? " (banned)" : "")));
    row.appendChild(cell("td", s.quant === "none" ? s.dtype : s.dtype + " · " + s.quant));
    row.appendChild(cell("td", s.throughput.toFixed(1), "num"));
    row.appendChild(cell("td", String(s.sessions), "num"));
    row.appendChild(cell("td", String(s.cache_tokens_left), "num"));
    row.appendChild(cell("td", s.rtt_ms === null ? "–" : s.rtt_ms.toFixed(1) + " ms", "num"));
  }
  const cover = table.insertRow();
  cover.appendChild(cell("th", "servers per layer"));
  for (const c of snap.coverage) cover.appendChild(cell("td", String(c), c ? "cov" : "cov missing"));
  const rest = cell("td");
  rest.colSpan = 6;
  cover.appendChild(rest);
  document.getElementById("swarm").replaceWith(table);
  const f = snap.failover;
  document.getElementById("footer").textContent =
    "failovers: " + f.failures + " failures, " + f.recoveries + " recovered, " + f.given_up + " given up";
}
draw(JSON.parse(document.getElementById("snapshot").textContent));
function refresh() {
  fetch("/v1/swarm", {credentials: "same-origin"}).then(r => r.ok ? r.json() : null)
    .then(s => { if (s) draw(s); }).catch(() => {}).finally(() => setTimeout(refresh, 2000));
}
setTimeout(refresh, 2000);
</script>
</body></html>
"""
