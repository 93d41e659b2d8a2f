"""ASGI entry point: HTTP pages and the /ws/ websockets in one application.

Client addresses: the web server passes the connection's own address (uvicorn ``--no-proxy-headers``;
started otherwise from its command line, this refuses to load); X-Forwarded-For and X-Forwarded-Proto
are believed only from ``settings.TRUSTED_PROXIES`` (uvicorn's own ``ProxyHeadersMiddleware``, given
that list), so the login throttle and the metrics allow-list see who really asks.
"""

import os
import sys
from pathlib import Path
from typing import Any

from django.core.asgi import get_asgi_application
from django.core.exceptions import ImproperlyConfigured

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "matrixoe.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402  (needs Django set up first)
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware  # noqa: E402

from matrixoe.origins import SameOriginValidator  # noqa: E402
from migrations_app.routing import websocket_urlpatterns  # noqa: E402


def check_server_leaves_proxy_headers(argv: list[str]) -> None:
    """Raise ``ImproperlyConfigured`` when the uvicorn command line lets uvicorn rewrite client
    addresses itself: by default it believes X-Forwarded-For from 127.0.0.1, where under `make run`
    every client comes from, so anyone could name any address."""
    program = Path(argv[0]) if argv else Path()
    started_by_uvicorn = program.name == "uvicorn" or program.parent.name == "uvicorn"
    if started_by_uvicorn and "--no-proxy-headers" not in argv:
        raise ImproperlyConfigured(
            "Start uvicorn with --no-proxy-headers: the console believes X-Forwarded-For and "
            "X-Forwarded-Proto only from the proxies in TRUSTED_PROXIES, and uvicorn must not rewrite "
            "the client's address before it (by default uvicorn believes anyone on 127.0.0.1)."
        )


def behind_trusted_proxies(app: Any) -> Any:
    """``app`` with the client address and scheme taken from forwarded headers, only from a proxy in
    ``TRUSTED_PROXIES`` (the rightmost address no trusted proxy added); ``app`` itself without any."""
    if not settings.TRUSTED_PROXIES:
        return app
    return ProxyHeadersMiddleware(app, trusted_hosts=settings.TRUSTED_PROXIES)


check_server_leaves_proxy_headers(sys.argv)
application = behind_trusted_proxies(
    ProtocolTypeRouter(
        {
            "http": django_asgi_app,
            "websocket": SameOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
        }
    )
)
