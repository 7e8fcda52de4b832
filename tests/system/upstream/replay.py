"""Replay the upstream Memphis REST gateway's documented requests against a gateway.

``requests.json`` (next to this file) holds the requests that the upstream's README, the Memphis docs,
the Memphis console and Debezium Server send, written as those sources write them (path case, query,
trailing slash, header names, the exact body bytes, invalid JSON included), each with the answer the
upstream (memphis-rest-gateway 1.2.8) gives, read from its handlers. docs/upstream.md explains the
upstream's behaviour behind those answers.

The expected answers assume the upstream configured as its helm chart configures it: password mode
(``USER_PASS_BASED_AUTH=true``), distinct ``JWT_SECRET`` and ``REFRESH_JWT_SECRET``, ``DEV_ENV`` unset,
in front of an open-source broker where ``{USER}`` / ``{PASSWORD}`` is a user of account 1.

Placeholders in paths, header values and bodies are filled before sending: ``{USER}``, ``{PASSWORD}``,
``{CONNECTION_TOKEN}``, ``{STATION}``, ``{JWT}``, ``{REFRESH}`` and, when the upstream's signing secrets
are known, ``{UPSTREAM_JWT}``, ``{UPSTREAM_REFRESH}``, ``{LEGACY_JWT}`` (tokens as the upstream issued
them). Entries run in file order: the consume entries read what the produce entries before them wrote.

Library use::

    results = await replay("http://127.0.0.1:4444", Values(user="root", password="memphis"))
    for entry, result in zip(load(), results):
        problems = check(entry, result)

Command line (prints a table; exit status 1 when an entry does not answer as the upstream does)::

    python tests/system/upstream/replay.py --base http://127.0.0.1:4444 --user root --password memphis \
        [--jwt-secret S --refresh-jwt-secret R] [--station NAME] [--json]
    python tests/system/upstream/replay.py --self-check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
import uuid
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from multidict import CIMultiDict
from yarl import URL

REQUESTS = Path(__file__).with_name("requests.json")
PLACEHOLDER = re.compile(r"\{([A-Z][A-Z_]*)\}")
# Headers aiohttp would add on its own; the replay sends only what the source writes (plus Host and
# Content-Length, which every HTTP/1.1 client sends).
NOT_AUTOMATIC = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})


@dataclass
class Values:
    """What the test environment fills in for the sources' placeholders."""

    user: str
    password: str
    connection_token: str = "memphis"
    station: str = field(default_factory=lambda: f"upstream-replay-{uuid.uuid4().hex[:8]}")
    account_id: int = 1
    jwt: str | None = None  # obtained from the gateway when None
    refresh: str | None = None
    jwt_secret: str | None = None  # the upstream's JWT_SECRET / REFRESH_JWT_SECRET, to mint upstream tokens
    refresh_jwt_secret: str | None = None

    def mapping(self) -> dict[str, str]:
        out = {
            "USER": self.user,
            "PASSWORD": self.password,
            "CONNECTION_TOKEN": self.connection_token,
            "STATION": self.station,
        }
        if self.jwt is not None:
            out["JWT"] = self.jwt
        if self.refresh is not None:
            out["REFRESH"] = self.refresh
        out.update(upstream_tokens(self))
        return out


@dataclass
class Result:
    id: str
    status: int | None  # None: not sent (skipped or transport error)
    body: Any = None  # parsed JSON, else the text
    headers: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None  # why it was not sent / what broke


def load(path: Path = REQUESTS) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(path.read_text())
    return entries


def fill(text: str, values: Mapping[str, str]) -> str:
    """Replace the known ``{NAME}`` placeholders; JSON braces and unknown names stay as written."""
    return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def missing(entry: Mapping[str, Any], values: Mapping[str, str]) -> list[str]:
    texts = [entry["path"], entry.get("body") or "", *entry.get("headers", {}).values()]
    return sorted({m for t in texts for m in PLACEHOLDER.findall(t) if m not in values and m in KNOWN})


KNOWN = frozenset(
    {
        "USER",
        "PASSWORD",
        "CONNECTION_TOKEN",
        "STATION",
        "JWT",
        "REFRESH",
        "UPSTREAM_JWT",
        "UPSTREAM_REFRESH",
        "LEGACY_JWT",
    }
)


def upstream_tokens(values: Values, minutes: int = 60) -> dict[str, str]:
    """Tokens exactly as memphis-rest-gateway 1.2.8 issued them (handlers/auth.go createTokens, password mode)."""
    with warnings.catch_warnings():
        # the compose's secrets are 16-24 bytes (pyjwt 2.10 warns about those)
        warnings.simplefilter("ignore", getattr(jwt, "InsecureKeyLengthWarning", UserWarning))
        return _upstream_tokens(values, minutes)


def _upstream_tokens(values: Values, minutes: int) -> dict[str, str]:
    out: dict[str, str] = {}
    now = int(time.time())
    claims = {
        "username": values.user,
        "password": values.password,
        "account_id": values.account_id,
        "exp": now + minutes * 60,
        "connection_token": "",
    }
    if values.jwt_secret is not None:
        out["UPSTREAM_JWT"] = jwt.encode(claims, values.jwt_secret, algorithm="HS256")
        out["LEGACY_JWT"] = jwt.encode({"exp": now + minutes * 60}, values.jwt_secret, algorithm="HS256")
    if values.refresh_jwt_secret is not None:
        refresh = dict(claims, token_exp=now + minutes * 60, exp=now + 24 * 60 * 60)
        out["UPSTREAM_REFRESH"] = jwt.encode(refresh, values.refresh_jwt_secret, algorithm="HS256")
    return out


async def obtain_tokens(session: aiohttp.ClientSession, base: str, values: Values) -> None:
    """Fill ``values.jwt`` / ``values.refresh`` from the gateway under test (a plain authenticate)."""
    if values.jwt is not None and values.refresh is not None:
        return
    body = {"username": values.user, "password": values.password}
    async with session.post(base.rstrip("/") + "/auth/authenticate", json=body) as resp:
        data = await resp.json(content_type=None)
        if resp.status != 200:
            raise RuntimeError(f"setup authenticate answered {resp.status}: {data}")
    values.jwt = values.jwt or data["jwt"]
    values.refresh = values.refresh or data["jwt_refresh_token"]


async def send(
    session: aiohttp.ClientSession,
    base: str,
    entry: Mapping[str, Any],
    values: Mapping[str, str],
    timeout_s: float = 15.0,
) -> Result:
    """One entry, literally: path as written (no re-encoding), headers in the source's spelling, body bytes."""
    need = missing(entry, values)
    if need:
        return Result(entry["id"], None, error="skipped: needs " + ", ".join(need))
    url = URL(base.rstrip("/") + fill(entry["path"], values), encoded=True)
    headers = CIMultiDict((k, fill(v, values)) for k, v in entry.get("headers", {}).items())
    body = entry.get("body")
    data = fill(body, values).encode() if body is not None else None
    try:
        async with session.request(
            entry["method"],
            url,
            data=data,
            headers=headers,
            skip_auto_headers=NOT_AUTOMATIC,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            raw = await resp.read()
            text = raw.decode("utf-8", "replace")
            try:
                parsed: Any = json.loads(text) if text else None
            except ValueError:
                parsed = text
            return Result(entry["id"], resp.status, parsed, dict(resp.headers))
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Result(entry["id"], None, error=f"{type(exc).__name__}: {exc}")


async def replay(
    base: str,
    values: Values,
    entries: Iterable[Mapping[str, Any]] | None = None,
    session: aiohttp.ClientSession | None = None,
) -> list[Result]:
    """Replay every entry (in order) against ``base``; returns one Result per entry."""
    entries = list(load() if entries is None else entries)
    own = session is None
    session = session or aiohttp.ClientSession()
    try:
        await obtain_tokens(session, base, values)
        mapping = values.mapping()
        results = []
        for e in entries:
            result = await send(session, base, e, mapping)
            results.append(result)
            rotated = result.body.get("jwt_refresh_token") if isinstance(result.body, dict) else None
            if result.status == 200 and rotated and e["path"].lower().startswith("/auth/refreshtoken"):
                # a refresh token is single-use on this gateway: the next refresh uses the one just issued,
                # as a client that keeps the refresh token it was last given does
                mapping["REFRESH"] = rotated
        return results
    finally:
        if own:
            await session.close()


# ------------------------------------------------------------------------------------------ checking
def _type_ok(value: Any, name: str) -> bool:
    return {
        "string": isinstance(value, str),
        "object": isinstance(value, dict),
        "list": isinstance(value, list),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
    }[name]


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for k, v in headers.items():
        if k.lower() == name.lower():
            return v
    return None


def check(entry: Mapping[str, Any], result: Result, *, honour_differences: bool = True) -> list[str]:
    """Where ``result`` differs from the upstream's answer; [] when it answers as the upstream does.

    With ``honour_differences`` an entry marked ``deliberate_difference`` is compared on its
    ``still_compare`` keys only.
    """
    if result.status is None:
        return [result.error or "no answer"]
    expect = dict(entry["expect"])
    if honour_differences and "deliberate_difference" in entry:
        keep = set(entry.get("still_compare", []))
        expect = {k: v for k, v in expect.items() if k in keep}
    out: list[str] = []
    body, headers = result.body, result.headers
    if "status" in expect and result.status != expect["status"]:
        out.append(f"status {result.status} != {expect['status']}")
    if (
        "json" in expect
        and expect["json"] == {"message": "Unauthorized"}
        and isinstance(body, dict)
        and isinstance(body.get("reason"), str)
    ):
        body = {k: v for k, v in body.items() if k != "reason"}  # ours says why beside it: a deliberate addition
    if "json" in expect and body != expect["json"]:
        out.append(f"body {_short(body)} != {_short(expect['json'])}")
    if "json_keys" in expect:
        if not isinstance(body, dict):
            out.append(f"body not a JSON object: {_short(body)}")
        else:
            lacking = [k for k in expect["json_keys"] if k not in body]
            if lacking:
                out.append(f"body lacks {lacking}: {_short(body)}")
    if isinstance(body, dict):
        for k, t in expect.get("json_types", {}).items():
            if k in body and not _type_ok(body[k], t):
                out.append(f"{k} is not a {t}: {_short(body[k])}")
        for k, v in expect.get("json_values", {}).items():
            if body.get(k) != v:
                out.append(f"{k} = {_short(body.get(k))} != {_short(v)}")
    if "text" in expect and body != expect["text"]:
        out.append(f"body {_short(body)} != {expect['text']!r}")
    if "content_type" in expect and _header(headers, "Content-Type") != expect["content_type"]:
        out.append(f"Content-Type {_header(headers, 'Content-Type')!r} != {expect['content_type']!r}")
    for name, value in expect.get("headers", {}).items():
        got = _header(headers, name)
        if got is None or got.lower() != value.lower():
            out.append(f"header {name}: {got!r} != {value!r}")
    for name, part in expect.get("headers_contain", {}).items():
        got = _header(headers, name)
        if got is None or part.lower() not in got.lower():
            out.append(f"header {name}: {got!r} lacks {part!r}")
    if "json_list_of" in expect:
        if not isinstance(body, list):
            out.append(f"body not a JSON array: {_short(body)}")
        else:
            for i, item in enumerate(body):
                if not isinstance(item, dict) or any(
                    not _type_ok(item.get(k), t) for k, t in expect["json_list_of"].items()
                ):
                    out.append(f"item {i} not {expect['json_list_of']}: {_short(item)}")
                    break
            if len(body) < expect.get("min_items", 0) or len(body) > expect.get("max_items", 10**9):
                out.append(
                    f"{len(body)} items, expected {expect.get('min_items', 0)}..{expect.get('max_items', 'any')}"
                )
            for i, want in enumerate(expect.get("items", [])):
                if i >= len(body) or not isinstance(body[i], dict):
                    continue  # already reported by the count check
                got = body[i]
                if "message" in want and got.get("message") != want["message"]:
                    out.append(f"item {i} message {_short(got.get('message'))} != {want['message']!r}")
                for hk, hv in want.get("headers_include", {}).items():
                    if (got.get("headers") or {}).get(hk) != hv:
                        out.append(
                            f"item {i} header {hk!r} = {_short((got.get('headers') or {}).get(hk))} != {hv!r} "
                            f"(headers: {sorted(got.get('headers') or {})})"
                        )
    return out


def _short(value: Any, limit: int = 140) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------ self-check
async def self_check() -> list[str]:
    """Validate requests.json and prove the replay sends requests literally (against a local echo server)."""
    from aiohttp import web

    problems: list[str] = []
    entries = load()
    ids = [e["id"] for e in entries]
    if len(ids) != len(set(ids)):
        problems.append("duplicate ids")
    for e in entries:
        for key in ("id", "source", "method", "path", "headers", "body", "expect", "notes"):
            if key not in e:
                problems.append(f"{e.get('id')}: lacks {key}")
        for key in ("repo", "path", "ref", "quote"):
            if not e.get("source", {}).get(key):
                problems.append(f"{e['id']}: source lacks {key}")
        if "status" not in e["expect"]:
            problems.append(f"{e['id']}: expect lacks status")
        texts = [e["path"], e.get("body") or "", *e.get("headers", {}).values()]
        unknown = {m for t in texts for m in PLACEHOLDER.findall(t)} - KNOWN
        if unknown:
            problems.append(f"{e['id']}: unknown placeholders {sorted(unknown)}")

    seen: list[tuple[str, str, list[tuple[str, str]], bytes]] = []

    async def echo(request: web.Request) -> web.Response:
        seen.append(
            (
                request.method,
                request.raw_path,
                [(k.decode(), v.decode()) for k, v in request.raw_headers],
                await request.read(),
            )
        )
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    values = Values(
        user="u",
        password="p",
        station="st",
        jwt="J.W.T",
        refresh="R.E.F",
        jwt_secret="s1" * 32,
        refresh_jwt_secret="s2" * 32,
    ).mapping()
    try:
        async with aiohttp.ClientSession() as session:
            for e in entries:
                seen.clear()
                result = await send(session, f"http://127.0.0.1:{port}", e, values)
                if result.status != 200 or len(seen) != 1:
                    problems.append(f"{e['id']}: echo got {len(seen)} requests, status {result.status} {result.error}")
                    continue
                method, path, raw_headers, body = seen[0]
                if method != e["method"]:
                    problems.append(f"{e['id']}: sent {method}")
                if path != fill(e["path"], values):
                    problems.append(f"{e['id']}: sent path {path!r}")
                want_body = fill(e["body"], values).encode() if e["body"] is not None else b""
                if body != want_body:
                    problems.append(f"{e['id']}: body differs ({len(body)} vs {len(want_body)} bytes)")
                sent = {k: v for k, v in raw_headers}
                for k, v in e["headers"].items():
                    if sent.get(k) != fill(v, values):  # name spelled as written, value as filled
                        problems.append(f"{e['id']}: header {k!r} sent as {sent.get(k)!r}")
                extra = {k for k in sent if k.lower() not in {h.lower() for h in e["headers"]}} - {
                    "Host",
                    "Content-Length",
                }
                if extra:
                    problems.append(f"{e['id']}: extra headers sent {sorted(extra)}")
    finally:
        await runner.cleanup()
    return problems


# ------------------------------------------------------------------------------------------ command line
def _table(entries: list[dict[str, Any]], results: list[Result]) -> tuple[str, int]:
    rows, failing = [], 0
    for e, r in zip(entries, results, strict=True):
        strict = check(e, r, honour_differences=False)
        effective = check(e, r)
        verdict = "ok" if not strict else ("ok (deliberate difference)" if not effective else "FAIL")
        failing += verdict == "FAIL"
        got = "-" if r.status is None else str(r.status)
        rows.append(
            f"| {e['id']} | {e['expect']['status']} | {got} | {verdict} | {'; '.join(effective or strict)[:300]} |"
        )
    head = "| id | upstream | got | verdict | difference |\n|---|---|---|---|---|"
    return head + "\n" + "\n".join(rows), failing


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="http://127.0.0.1:4444")
    p.add_argument("--user", default="root")
    p.add_argument("--password", default="memphis")
    p.add_argument("--connection-token", default="memphis")
    p.add_argument("--station")
    p.add_argument("--jwt-secret")
    p.add_argument("--refresh-jwt-secret")
    p.add_argument("--json", action="store_true", help="print the raw results as JSON")
    p.add_argument("--self-check", action="store_true")
    args = p.parse_args(argv)
    if args.self_check:
        problems = asyncio.run(self_check())
        print("\n".join(problems) or f"self-check ok: {len(load())} entries valid and sent literally")
        return 1 if problems else 0
    values = Values(
        user=args.user,
        password=args.password,
        connection_token=args.connection_token,
        jwt_secret=args.jwt_secret,
        refresh_jwt_secret=args.refresh_jwt_secret,
    )
    if args.station:
        values.station = args.station
    entries = load()
    results = asyncio.run(replay(args.base, values, entries))
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=2, default=str))
    table, failing = _table(entries, results)
    print(table)
    print(f"\n{len(entries) - failing} of {len(entries)} answer as the upstream does (station {values.station})")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
