"""One process, many simulated VSPs: ``python -m hostagent.fleet --vsps 500 --first-port P --secret-dir D``.

A fleet is for measuring and testing the console at the size of a data centre on one machine: each VSP
is a separate host to the console, with its own address (``--listen-host`` and a port of its own,
``--first-port`` + its index), its own secret (``DIR/<name>.secret``, at least 16 characters, written
by whoever registers the VSP) and its own guests (one simulated driver each). Only the process, its
event loop, its event-loop watch and (with TLS) its certificate are shared: one certificate names the
listen host for every VSP, as one machine's agents would share a host name.

Names are ``--prefix`` followed by the index, zero-padded to the width of the count (``fleet001`` ...
``fleet500``). Simulated driver only: a real hypervisor has one agent per host.

Errors: exits with a message (status 1) on a missing or short secret, a port range past 65535, a port
already taken, or TLS files that do not load.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from hostagent.driver import DriverSettings, load_driver
from hostagent.loopwatch import LoopWatch
from hostagent.options import driver_options, tls_settings
from hostagent.server import create_app
from hostagent.tls import TlsSettings

log = logging.getLogger("hostagent.fleet")

MIN_SECRET_CHARS = 16


@dataclass(frozen=True)
class FleetMember:
    """One VSP of the fleet: its name, the port its API listens on and its secret."""

    name: str
    port: int
    secret: str


def member_names(prefix: str, count: int) -> list[str]:
    """``prefix`` + 1..count, zero-padded to the count's width: ``member_names("f", 12)[0] == "f01"``."""
    width = len(str(count))
    return [f"{prefix}{index:0{width}d}" for index in range(1, count + 1)]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hostagent.fleet", description="Many simulated VSPs, each its own host, in one process."
    )
    parser.add_argument("--vsps", type=int, required=True, help="how many VSPs (1-5000)")
    parser.add_argument("--prefix", default="fleet", help="VSP names: PREFIX + number (default fleet)")
    parser.add_argument("--listen-host", default="127.0.0.1", help="address every VSP's API listens on")
    parser.add_argument("--first-port", type=int, required=True, help="the first VSP's port; one port each")
    parser.add_argument(
        "--secret-dir", type=Path, required=True, help="directory of NAME.secret files, one per VSP"
    )
    parser.add_argument(
        "--driver-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="simulated driver option for every VSP, repeatable (capacity_mib=65536)",
    )
    parser.add_argument("--tls-cert", type=Path, help="the certificate every VSP serves (PEM)")
    parser.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    parser.add_argument("--tls-ca", type=Path, help="the deployment CA (PEM) for the data plane")
    parser.add_argument(
        "--insecure-http", action="store_true", help="development only: plain HTTP, data plane policy off"
    )
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    if not 1 <= args.vsps <= 5000:
        parser.error("--vsps must be between 1 and 5000")
    if not 1 <= args.first_port or args.first_port + args.vsps - 1 > 65535:
        parser.error(f"ports {args.first_port}-{args.first_port + args.vsps - 1} are not all valid ports")
    return args


def read_members(args: argparse.Namespace) -> list[FleetMember]:
    """Every VSP with its port and secret; exits naming the first secret file missing or too short."""
    members = []
    for index, name in enumerate(member_names(args.prefix, args.vsps)):
        path = args.secret_dir / f"{name}.secret"
        try:
            secret = path.read_text().strip()
        except OSError as error:
            sys.exit(f"hostagent.fleet: cannot read {name}'s secret {path}: {error.strerror}")
        if len(secret) < MIN_SECRET_CHARS:
            sys.exit(f"hostagent.fleet: {name}'s secret in {path} is under {MIN_SECRET_CHARS} characters")
        members.append(FleetMember(name, args.first_port + index, secret))
    return members


async def serve(args: argparse.Namespace) -> None:
    """Serve every member until SIGINT or SIGTERM; the apps share one loop watch."""
    tls: TlsSettings | None = tls_settings(args)
    members = read_members(args)
    watch = LoopWatch()
    watch.start()
    runners = []
    try:
        for member in members:
            settings = DriverSettings(
                agent_name=member.name,
                data_host=args.listen_host,
                options=driver_options(args.driver_option),
                tls=tls,
            )
            driver = load_driver("simulated", settings)
            app = create_app(driver, member.secret, member.name, watch=watch)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            runners.append(runner)
            site = web.TCPSite(
                runner, args.listen_host, member.port, ssl_context=tls.api_context() if tls else None
            )
            try:
                await site.start()
            except OSError as error:
                where = f"{args.listen_host}:{member.port}"
                sys.exit(f"hostagent.fleet: {member.name} cannot listen on {where}: {error.strerror}")
        log.warning(
            "fleet of %d VSPs (%s ... %s) listening on %s://%s:%d-%d",
            len(members),
            members[0].name,
            members[-1].name,
            "https" if tls else "http",
            args.listen_host,
            members[0].port,
            members[-1].port,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        for runner in runners:
            await runner.cleanup()
        await watch.stop()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
