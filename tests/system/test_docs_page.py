"""GET /docs in a real browser: headless Chromium renders the OpenAPI document with Swagger UI, no CDN."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from tests.harness import running_gateway, settings_for

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("chromium not found: apt-get install chromium (./dev.sh test installs it when run as root)")
    return found


async def test_docs_page_lists_the_operations_in_chromium(nats_server, tmp_path: Path) -> None:
    async with running_gateway(settings_for(nats_server.url, tmp_path / "gw")) as gw:
        async with gw.http.get(gw.base + "/") as resp:
            assert (await resp.json())["docs"] == "/docs"
        proc = await asyncio.create_subprocess_exec(
            chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000",
            "--dump-dom", gw.base + "/docs",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            dom, _ = await asyncio.wait_for(proc.communicate(), 90)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    html = dom.decode(errors="replace")
    operations = html.count('class="opblock-summary-path"')
    print(f"\n  /docs rendered {operations} operations in Chromium")
    assert "/stations/{station}/produce/single" in html, html[:3000]
    assert "/auth/authenticate" in html and operations >= 10
    assert "cdn" not in html.lower()  # every script and style came from the gateway
