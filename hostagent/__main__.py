"""``python -m hostagent --name vsp1 --listen 127.0.0.1:7101 --secret-file ... --driver simulated``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from aiohttp import web

from hostagent.driver import DRIVERS, DriverSettings, load_driver
from hostagent.hostconfig import NetworkConfig, PoolConfig, parse_network, parse_pool
from hostagent.options import driver_options, tls_settings
from hostagent.server import create_app

log = logging.getLogger("hostagent")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hostagent", description="Host agent for one VSP.")
    parser.add_argument("--name", required=True, help="this VSP's name, e.g. vsp1")
    parser.add_argument("--listen", default="127.0.0.1:7101", help="HOST:PORT for the HTTP API")
    parser.add_argument("--secret-file", type=Path, help="file holding the API secret")
    parser.add_argument(
        "--secret-env", help="environment variable holding the API secret (default HOSTAGENT_SECRET)"
    )
    parser.add_argument("--driver", default="simulated", help=f"one of {', '.join(DRIVERS)} or module:Class")
    parser.add_argument(
        "--data-host", help="address the data-plane listeners bind to (default: the API host)"
    )
    parser.add_argument(
        "--driver-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="driver option, repeatable (simulated: capacity_mib=65536)",
    )
    parser.add_argument(
        "--pool",
        action="append",
        default=[],
        metavar="NAME:KIND:PATH[:IDENTITY]",
        help="a storage pool, repeatable: KIND shared or local, PATH a directory; IDENTITY: equal on every "
        "host mounting the same shared storage (default: from the marker file .matrixoe-pool in PATH)",
    )
    parser.add_argument(
        "--network",
        action="append",
        default=[],
        metavar="NAME:KIND[:BRIDGE]",
        help="a network guests' cards plug into, repeatable: KIND bridge ([NETNS/]BRIDGE), user or simulated",
    )
    parser.add_argument(
        "--tls-cert", type=Path, help="this agent's certificate (PEM) for HTTPS and the data plane"
    )
    parser.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    parser.add_argument(
        "--tls-ca",
        type=Path,
        help="the deployment CA (PEM): data-plane peers must show a certificate from it",
    )
    parser.add_argument(
        "--insecure-http",
        action="store_true",
        help="development only: serve the API over plain HTTP and the data plane only with the policy off",
    )
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def read_secret(args: argparse.Namespace) -> str:
    if args.secret_file:
        secret = args.secret_file.read_text().strip()
    else:
        secret = os.environ.get(args.secret_env or "HOSTAGENT_SECRET", "").strip()
    if len(secret) < 16:
        sys.exit(
            "hostagent: a secret of at least 16 characters is required "
            "(--secret-file, --secret-env or HOSTAGENT_SECRET)"
        )
    return secret


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        sys.exit(f"hostagent: --listen must be HOST:PORT, not {listen!r}")
    return host.strip("[]"), int(port)


def host_resources(args: argparse.Namespace) -> tuple[list[PoolConfig], list[NetworkConfig]]:
    """The ``--pool`` and ``--network`` options; exits naming a bad one or a name given twice."""
    try:
        pools = [parse_pool(text, args.name) for text in args.pool]
        networks = [parse_network(text) for text in args.network]
    except (ValueError, OSError) as error:
        sys.exit(f"hostagent: {error}")
    for what, names in (("pool", [p.name for p in pools]), ("network", [n.name for n in networks])):
        twice = {name for name in names if names.count(name) > 1}
        if twice:
            sys.exit(f"hostagent: {what} {sorted(twice)[0]} is given twice")
    return pools, networks


async def serve(args: argparse.Namespace) -> None:
    host, port = split_listen(args.listen)
    tls = tls_settings(args)
    pools, networks = host_resources(args)
    settings = DriverSettings(
        agent_name=args.name,
        data_host=args.data_host or host,
        options=driver_options(args.driver_option),
        tls=tls,
        pools=pools,
        networks=networks,
    )
    driver = load_driver(args.driver, settings)
    runner = web.AppRunner(create_app(driver, read_secret(args), args.name), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=tls.api_context() if tls else None).start()
    if tls is None:
        log.warning(
            "INSECURE: agent %s serves its API over plain HTTP (--insecure-http): the secret and every "
            "request cross the network in clear, and its data plane cannot encrypt (policy off only). "
            "Development only.",
            args.name,
        )
    log.info(
        "agent %s listening on %s://%s:%s (driver %s, data host %s)",
        args.name,
        "https" if tls else "http",
        host,
        port,
        driver.name,
        settings.data_host,
    )
    if tls is not None:  # what the admin compares when adding this VSP in the console
        log.info("agent %s certificate SHA-256 fingerprint: %s", args.name, tls.fingerprint())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("agent %s stopping", args.name)
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    profile = os.environ.get("HOSTAGENT_PROFILE")
    if not profile:
        asyncio.run(serve(args))
        return
    # Development: cProfile of the event-loop thread (the data plane's worker threads are
    # not in it), written to HOSTAGENT_PROFILE.<name> when the agent stops (bench_agent_migration --profile).
    import cProfile

    profiler = cProfile.Profile()
    try:
        profiler.runcall(asyncio.run, serve(args))
    finally:
        profiler.dump_stats(f"{profile}.{args.name}")


if __name__ == "__main__":
    main()
