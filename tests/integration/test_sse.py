"""Server-sent events: GET /stations/{station}/consume/sse (REST) and ConsumeEvents (gRPC), resumable
with Last-Event-ID; in headless Chromium with a real EventSource when chromium is installed."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from memgw.v1 import consume_pb2

from gateway.transcoding import forward
from tests.harness import Clients, bearer


def name() -> str:
    return f"sse-{uuid.uuid4().hex[:8]}"


async def read_events(resp: aiohttp.ClientResponse, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:  # noqa: ASYNC109
    """The next ``count`` events with data (id-only events are recorded as {"id": ...} too)."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    async with asyncio.timeout(timeout):
        while len([e for e in events if "data" in e]) < count:
            line = (await resp.content.readline()).decode().rstrip("\n")
            if line == "":
                if current:
                    events.append(current)
                current = {}
            elif line.startswith(":"):
                events.append({"comment": line})
            else:
                key, _, value = line.partition(": ")
                current[key] = json.loads(value) if key == "data" else value
    return events


async def produce(gw: Clients, st: str, token: str, items: list[Any]) -> None:
    status, body, _ = await gw.post(f"/stations/{st}/produce/batch", items, token=token)
    assert status == 200, body


async def test_sse_stream_and_resume(gw: Clients, token: str) -> None:
    st = name()
    await produce(gw, st, token, [1, 2, 3])
    url = f"{gw.base}/stations/{st}/consume/sse?consumer_name=web&consumer_group=g1&authorization={token}"
    async with gw.http.get(url) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
        events = await read_events(resp, 3)
    assert events[0] == {"retry": "1000"} and events[1] == {"id": "1:0"}  # the starting cursor
    got = [e for e in events if "data" in e]
    assert [(e["id"], e["data"]["message"], e["data"]["sequence"]) for e in got] == [
        ("1:1", "1", 1), ("1:2", "2", 2), ("1:3", "3", 3)]
    assert "timestamp" in got[0]["data"] and "ack_id" not in got[0]["data"]
    # the client says it got up to 1:1: 2 and 3 come again (they may never have reached it), then 4
    await produce(gw, st, token, [4])
    async with gw.http.get(url, headers={"Last-Event-ID": "1:1"}) as resp:
        events = await read_events(resp, 3)
    assert [(e["id"], e["data"]["message"]) for e in events if "data" in e] == [
        ("1:2", "2"), ("1:3", "3"), ("1:4", "4")]
    # resuming from the last event: nothing twice, only what is new
    await produce(gw, st, token, [5])
    async with gw.http.get(url, headers={"Last-Event-ID": "1:4"}) as resp:
        events = await read_events(resp, 1)
    assert [(e["id"], e["data"]["message"]) for e in events if "data" in e] == [("1:5", "5")]
    # a garbage id is a 400
    async with gw.http.get(url, headers={"Last-Event-ID": "nope"}) as resp:
        assert resp.status == 400 and "last event id" in (await resp.json())["error"]


async def test_sse_heartbeat(gw: Clients, token: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forward, "SSE_HEARTBEAT_S", 0.5)
    st = name()
    url = f"{gw.base}/stations/{st}/consume/sse?consumer_name=web&authorization={token}"
    async with gw.http.get(url) as resp:
        lines = []
        async with asyncio.timeout(5):
            while ": keep-alive" not in lines:
                lines.append((await resp.content.readline()).decode().rstrip("\n"))


async def test_sse_unauthenticated(gw: Clients) -> None:
    async with gw.http.get(f"{gw.base}/stations/{name()}/consume/sse?consumer_name=web") as resp:
        assert resp.status == 401


async def test_consume_events_grpc_resume(gw: Clients, token: str) -> None:
    md = bearer(await gw.grpc_token())
    st = name()
    await produce(gw, st, token, ["a", "b"])
    req = consume_pb2.ConsumeEventsRequest(station=st, consumer_name="g", consumer_group="grpc-events")
    call = gw.consume.ConsumeEvents(req, metadata=md)
    first = await call.read()
    assert first.id == "1:0" and not first.HasField("message")
    a = await call.read()
    b = await call.read()
    call.cancel()
    assert [(a.id, a.message.message), (b.id, b.message.message)] == [("1:1", b'"a"'), ("1:2", b'"b"')]
    req.last_event_id = "1:1"
    call = gw.consume.ConsumeEvents(req, metadata=md)
    await call.read()
    again = await call.read()
    call.cancel()
    assert (again.id, again.message.message) == ("1:2", b'"b"')


# -- headless Chromium with a real EventSource -------------------------------------------------------

PAGE = """<!doctype html><html><body><ul id="ids"></ul><script>
const es = new EventSource(%s);
es.onmessage = (e) => {
  const li = document.createElement("li");
  li.textContent = e.lastEventId + "=" + JSON.parse(e.data).message;
  document.getElementById("ids").appendChild(li);
};
</script></body></html>"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


async def page_items(url: str, wait_s: float) -> list[str]:
    """Open ``url`` in headless Chromium, wait ``wait_s`` (real time), return the page's <li> texts.

    Driven over the DevTools protocol (a websocket): --dump-dom with a virtual time budget never
    returns while an EventSource keeps a request open."""
    browser = chromium()
    assert browser is not None
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:  # Chromium may still write it
        proc = await asyncio.create_subprocess_exec(
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank",
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            async with asyncio.timeout(20):
                while not port_file.exists() or not port_file.read_text().strip():  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
            port = port_file.read_text().split()[0]
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                    target = next(t for t in await resp.json() if t["type"] == "page")
                async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    ids = iter(range(1, 1000))

                    async def cdp(method: str, **params: Any) -> Any:
                        call_id = next(ids)
                        await ws.send_json({"id": call_id, "method": method, "params": params})
                        async with asyncio.timeout(10):
                            while True:
                                reply = await ws.receive_json()
                                if reply.get("id") == call_id:
                                    return reply.get("result")

                    await cdp("Page.navigate", url=url)
                    await asyncio.sleep(wait_s)
                    result = await cdp("Runtime.evaluate", returnByValue=True, expression=(
                        "JSON.stringify([...document.querySelectorAll('li')].map(li => li.textContent))"))
                    return list(json.loads(result["result"]["value"]))
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 5)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (apt-get install -y chromium)")
async def test_chromium_eventsource_resumes_with_last_event_id(gw: Clients, token: str) -> None:
    st = name()
    await produce(gw, st, token, ["m1", "m2", "m3"])
    sse = f"{gw.base}/stations/{st}/consume/sse?consumer_name=browser&consumer_group=tab&authorization={token}"
    cut_after = {"n": 0}

    async def page(_: web.Request) -> web.Response:
        return web.Response(text=PAGE % json.dumps("/sse"), content_type="text/html")

    async def proxy(request: web.Request) -> web.StreamResponse:
        """Forwards to the gateway; the first connection loses the third event in flight and is cut
        (the gateway wrote it, and acknowledged it to the group, but the browser never got it)."""
        cut_after["n"] += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() == "last-event-id"}
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        events = 0
        async with aiohttp.ClientSession() as http, http.get(sse, headers=headers) as upstream:
            headers_seen.append(headers.get("Last-Event-ID", ""))
            try:
                async for line in upstream.content:
                    if line.startswith(b"data:"):
                        events += 1
                    if cut_after["n"] == 1 and events == 3:
                        return resp  # connection closed: EventSource reconnects with Last-Event-ID
                    await resp.write(line)
            except ConnectionError:  # the browser closed the page
                pass
        return resp

    headers_seen: list[str] = []
    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/sse", proxy)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async def more() -> None:
            await asyncio.sleep(1.5)
            await produce(gw, st, token, ["m4"])
        producer = asyncio.create_task(more())
        items = await page_items(f"http://127.0.0.1:{port}/", 5.0)
        await producer
    finally:
        await runner.cleanup()
    assert items == ['1:1="m1"', '1:2="m2"', '1:3="m3"', '1:4="m4"'], (items, headers_seen)
    assert headers_seen[:2] == ["", "1:2"]  # the browser resumed with the last id it received
