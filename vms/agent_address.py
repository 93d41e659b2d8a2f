"""Where the console may send a VSP's agent secret: over HTTPS, or plain HTTP only where that is allowed.

A registered agent certificate (CA or pinned fingerprint) is only checked over HTTPS: an ``http://``
address beside it silently dropped the check, and a secret entered with it went to the listener in
clear. So an ``http://`` address is refused for a VSP with a certificate, and in production (``DEBUG``
off) for every VSP unless ``AGENT_PLAIN_HTTP_ALLOWED`` says the agents' network is trusted. The admin
form and ``VSP.clean`` refuse it when it is entered; the agent client refuses to send anything to such
an address whatever stored it (``vms.agent_client``), so no path gets a secret onto the wire in clear.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from django.conf import settings

PLAIN_WITH_CERTIFICATE = (
    "the agent address is plain http:// while an agent certificate is registered: over http the "
    "certificate is not checked and the agent's secret would cross the network in clear. Use the "
    "agent's https:// address."
)
PLAIN_IN_PRODUCTION = (
    "plain http:// agent addresses are refused here: the agent's secret would cross the network in clear. "
    "Serve the agent over HTTPS (--tls-cert, --tls-key, --tls-ca) and register its certificate, or set "
    "AGENT_PLAIN_HTTP_ALLOWED=true for a trusted, isolated agent network."
)


def plain_http_allowed() -> bool:
    """``AGENT_PLAIN_HTTP_ALLOWED``; by default on with ``DEBUG`` only (development). Without Django
    settings (a benchmark driving agents itself) there is no console whose secrets to keep: allowed."""
    if not settings.configured:
        return True
    return bool(getattr(settings, "AGENT_PLAIN_HTTP_ALLOWED", settings.DEBUG))


def check_agent_address(url: str, certificate: str) -> None:
    """Raise ``ValueError`` in plain words when the console must not talk to the agent at ``url`` with
    ``certificate`` (``VSP.agent_certificate``) registered; an ``https://`` address always passes here."""
    if urlsplit(url.strip()).scheme.lower() != "http":
        return
    if certificate.strip():
        raise ValueError(PLAIN_WITH_CERTIFICATE)
    if not plain_http_allowed():
        raise ValueError(PLAIN_IN_PRODUCTION)
