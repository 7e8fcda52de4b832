"""CORS: which origins may call, and the answer to a preflight."""

from __future__ import annotations

from aiohttp import web

# Answer headers a browser script may read (beyond the CORS-safelisted ones): why a 401 happened,
# when to retry a 429/503.
EXPOSE = "WWW-Authenticate, Retry-After"


class Cors:
    def __init__(self, origins: tuple[str, ...]) -> None:
        self.any = "*" in origins
        self.origins = frozenset(origins)

    def headers(self, request: web.BaseRequest) -> dict[str, str]:
        """The CORS headers of an answer to ``request`` (a fresh dict: callers add to it)."""
        if self.any:
            return {"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": EXPOSE}
        origin = request.headers.get("Origin")
        if origin is not None and origin in self.origins:
            return {"Access-Control-Allow-Origin": origin, "Vary": "Origin", "Access-Control-Expose-Headers": EXPOSE}
        return {"Vary": "Origin"}

    @staticmethod
    def preflight(request: web.BaseRequest, allowed: list[str], cors: dict[str, str]) -> web.Response:
        methods = ", ".join([*allowed, "OPTIONS"])
        requested = request.headers.get("Access-Control-Request-Headers")
        headers = {
            **cors,
            "Access-Control-Allow-Methods": methods,
            "Access-Control-Allow-Headers": requested or "Authorization, Content-Type",
            "Access-Control-Max-Age": "600",
            "Allow": methods,
        }
        return web.Response(status=204, headers=headers)
