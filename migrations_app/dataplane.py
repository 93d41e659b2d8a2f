"""Where the source agent is told to send the guest's memory: the target's endpoint, or a mapping of it.

``settings.MIGRATION_DATA_ENDPOINT_HOOK`` (environment variable of the same name) may name a callable
``"module:function"`` or ``"module.function"`` taking the endpoint the target agent prepared
(``{"host", "port", "token"}``) and returning the one the source should connect to. Empty (the default):
the endpoint is used as prepared. The fault soak (``bench/soak.py``) puts a TCP proxy it controls
between the agents this way (``devtools.tcp_proxy.route_via_proxy``); a deployment could map addresses
through NAT the same way.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.utils.module_loading import import_string


def route_data_plane(endpoint: dict[str, Any]) -> dict[str, Any]:
    """The endpoint the source agent connects to; raises ImportError if the hook named does not exist."""
    hook = getattr(settings, "MIGRATION_DATA_ENDPOINT_HOOK", "")
    if not hook:
        return endpoint
    return import_string(hook.replace(":", "."))(endpoint)
