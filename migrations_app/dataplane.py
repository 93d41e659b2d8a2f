"""Where the source agent is told to send the guest's memory: the target's endpoint, or a mapping of it.

``settings.MIGRATION_DATA_ENDPOINT_HOOK`` (environment variable of the same name) may name a callable
``"module:function"`` or ``"module.function"`` taking the endpoint the target agent prepared, as
JSON (``{"host", "port", "token"}``, an ``agentprotocol.Endpoint``), and returning the one the source
should connect to, checked as an ``Endpoint`` again. Empty (the default): the endpoint is used as
prepared. The fault soak (``bench/soak.py``) puts a TCP proxy it controls
between the agents this way (``devtools.tcp_proxy.route_via_proxy``); a deployment could map addresses
through NAT the same way.
"""

from __future__ import annotations

from django.conf import settings
from django.utils.module_loading import import_string

from agentprotocol import Endpoint, parse


def route_data_plane(endpoint: Endpoint) -> Endpoint:
    """The endpoint the source agent connects to; raises ImportError if the hook named does not exist,
    ``agentprotocol.ProtocolViolation`` if what the hook returned is not an endpoint."""
    hook = getattr(settings, "MIGRATION_DATA_ENDPOINT_HOOK", "")
    if not hook:
        return endpoint
    routed = import_string(hook.replace(":", "."))(endpoint.model_dump(mode="json"))
    return parse(Endpoint, routed, "the data-plane endpoint hook's answer")
