"""Command-line options shared by ``python -m hostagent`` and ``python -m hostagent.fleet``."""

from __future__ import annotations

import argparse
import ssl
import sys

from hostagent.tls import TlsSettings


def tls_settings(args: argparse.Namespace) -> TlsSettings | None:
    """The TLS files (all three or none); none only with ``--insecure-http``."""
    given = [args.tls_cert, args.tls_key, args.tls_ca]
    if all(given):
        settings = TlsSettings(args.tls_cert, args.tls_key, args.tls_ca)
        try:
            settings.check()
        except (OSError, ssl.SSLError) as error:
            sys.exit(f"hostagent: cannot load the TLS certificate, key or CA: {error}")
        return settings
    if any(given):
        sys.exit("hostagent: --tls-cert, --tls-key and --tls-ca go together")
    if not args.insecure_http:
        sys.exit(
            "hostagent: TLS is required: give --tls-cert, --tls-key and --tls-ca "
            "(or --insecure-http for development only)"
        )
    return None


def driver_options(pairs: list[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            sys.exit(f"hostagent: --driver-option must be KEY=VALUE, not {pair!r}")
        options[key] = value
    return options
