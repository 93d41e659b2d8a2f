"""Which pages may open the console's websockets: its own, by scheme, host AND port.

Channels' ``AllowedHostsOriginValidator`` compared the Origin's host with ``ALLOWED_HOSTS`` only, so a
page served from ``http://127.0.0.1:9999`` (any local program) could open an admin's progress sockets
on the console at ``http://127.0.0.1:8000`` with the admin's cookie. A browser's websocket handshake
carries the page's origin; this accepts it when it is the socket's own origin (the Host header, a host
in ``ALLOWED_HOSTS``, with the connection's scheme, ws -> http and wss -> https, and the same port), or
one of ``CSRF_TRUSTED_ORIGINS``: the origins a form POST is accepted from (behind a TLS proxy, the
address browsers use, e.g. ``https://console.example.com``; ``https://*.example.com`` for its
subdomains). No Origin at all is refused, as before.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.http.request import split_domain_port, validate_host

DEFAULT_PORTS = {"http": 80, "https": 443}
HTTP_SCHEME = {"ws": "http", "wss": "https", "http": "http", "https": "https"}
Origin = tuple[str, str, int]  # scheme, host (lower case, IPv6 without brackets), port


def parse_origin(text: str) -> Origin | None:
    """("https", "console.example.com", 443) from an origin; None for "null" or anything else."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        return None
    return scheme, parts.hostname.lower(), port or DEFAULT_PORTS[scheme]


def own_origin(scope: dict[str, Any], headers: dict[bytes, str]) -> Origin | None:
    """The origin of the socket itself: its scheme as a page's (ws -> http, wss -> https; https too when
    ``SECURE_PROXY_SSL_HEADER`` says so) and its Host header, None when that host is not allowed."""
    host = headers.get(b"host", "")
    domain, _ = split_domain_port(host)
    if not domain or not validate_host(domain, settings.ALLOWED_HOSTS):
        return None
    scheme = HTTP_SCHEME.get(str(scope.get("scheme", "ws")), "http")
    proxy_header = getattr(settings, "SECURE_PROXY_SSL_HEADER", None)
    if proxy_header:
        name, value = proxy_header
        header = name.removeprefix("HTTP_").replace("_", "-").lower().encode()
        if headers.get(header, "").split(",")[0].strip() == value:
            scheme = "https"
    return parse_origin(f"{scheme}://{host}")


def trusted(origin: Origin, pattern: str) -> bool:
    """``origin`` is the trusted origin ``pattern`` (``https://*.example.com`` also for its subdomains)."""
    wildcard = "://*." in pattern
    parsed = parse_origin(pattern.replace("://*.", "://", 1))
    if parsed is None:
        return False
    scheme, host, port = parsed
    same_host = origin[1] == host or (wildcard and origin[1].endswith("." + host))
    return origin[0] == scheme and origin[2] == port and same_host


def origin_allowed(scope: dict[str, Any]) -> bool:
    """Whether the websocket handshake in ``scope`` comes from a page the console serves or trusts."""
    headers = {name: value.decode("latin1") for name, value in scope.get("headers", [])}
    origin = parse_origin(headers.get(b"origin", ""))
    if origin is None:
        return False
    if origin == own_origin(scope, headers):
        return True
    return any(trusted(origin, pattern) for pattern in settings.CSRF_TRUSTED_ORIGINS)


class SameOriginValidator:
    """ASGI middleware for websockets: the handshake from any other origin is refused (HTTP 403)."""

    def __init__(self, application: Any) -> None:
        self.application = application

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope["type"] != "websocket":
            raise ValueError("SameOriginValidator guards websocket connections only")
        if origin_allowed(scope):
            return await self.application(scope, receive, send)
        return await WebsocketDenier()(scope, receive, send)
