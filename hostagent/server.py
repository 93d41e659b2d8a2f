"""The agent's HTTP API (aiohttp). It talks only to the ``Driver`` and ``Migration`` protocols."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry
from pydantic import TypeAdapter, ValidationError

from agentprotocol import (
    ACTIVE_STATES,
    COMMANDS,
    TERMINAL_STATES,
    Deleted,
    GuestId,
    GuestList,
    GuestSpec,
    Health,
    IncomingRequest,
    Message,
    OutgoingRequest,
    ParamsChange,
    PreparedIncoming,
    ProbeRequest,
    ProbeRun,
    ProgressSnapshot,
    ProtocolViolation,
    StopRequest,
    load_json,
    parse,
    plain_words,
)
from hostagent import __version__
from hostagent.driver import (
    AgentError,
    Conflict,
    Driver,
    DriverSettings,
    InvalidRequest,
    Migration,
    NotFound,
    UnknownMigration,
)
from hostagent.loopwatch import KEPT_S, LoopWatch
from hostagent.metrics import CONTENT_TYPE, agent_registry, exposition
from hostagent.probe import ProbeListeners, run_probe

log = logging.getLogger("hostagent.server")
STREAM_INTERVAL_S = 0.05
HEARTBEAT_S = 5.0
DRIVER_KEY = web.AppKey("driver", Driver)
SECRET_KEY = web.AppKey("secret", bytes)
LOOP_WATCH_KEY = web.AppKey("loop_watch", LoopWatch)
NAME_KEY = web.AppKey("name", str)
MIGRATIONS_KEY = web.AppKey("migrations", dict)
METRICS_KEY = web.AppKey("metrics", CollectorRegistry)
SETTINGS_KEY = web.AppKey("settings", DriverSettings)
PROBES_KEY = web.AppKey("probes", ProbeListeners)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


M = TypeVar("M", bound=Message)
GUEST_ID = TypeAdapter(GuestId)


def error_response(status: int, message: str, code: str | None = None) -> web.Response:
    """A refusal (``agentprotocol.ErrorReply``): plain words, and a ``code`` where decisions depend on it."""
    body = {"error": message} if code is None else {"error": message, "code": code}
    return web.json_response(body, status=status)


def reply(message: Message) -> web.Response:
    """A protocol message as the JSON answer."""
    return web.Response(body=message.model_dump_json(), content_type="application/json")


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        log.warning("refused %s %s from %s: missing credential", request.method, request.path, request.remote)
        return error_response(401, "missing credential: send Authorization: Bearer <secret>")
    if not hmac.compare_digest(presented.strip().encode(), request.app[SECRET_KEY]):
        log.warning("refused %s %s from %s: wrong credential", request.method, request.path, request.remote)
        return error_response(401, "wrong credential")
    return await handler(request)


@web.middleware
async def plain_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request gets an answer: a refusal in plain words, or a 500 naming what went wrong.

    A ``CancelledError`` that is not this request's own cancellation (an awaited task of a migration
    was cancelled) would make aiohttp close the connection without a word, and the control plane
    could only retry for ever (soak, seed 1 run 93): it is answered as an internal error instead.
    """
    try:
        return await handler(request)
    except AgentError as error:
        return error_response(error.status, error.message, error.code)
    except web.HTTPException as error:
        if error.status >= 400:
            return error_response(error.status, error.reason or "request refused")
        raise
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise  # this request itself is cancelled (the agent stops): nothing to answer
        log.exception("%s %s: interrupted by a cancelled task", request.method, request.path)
        return error_response(500, f"internal error: {request.method} {request.path} was interrupted")
    except Exception as error:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, f"internal error: {request.method} {request.path}: {error!r}")


async def read_message(request: web.Request, model: type[M], **from_url: Any) -> M:
    """The body as ``model`` (values from the URL win, and must agree); bad input is ``InvalidRequest``."""
    raw = await request.read()
    try:
        body = load_json(raw)
    except ProtocolViolation as error:
        raise InvalidRequest(str(error)) from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    for key, value in from_url.items():
        if key in body and body[key] != value:
            raise InvalidRequest(f"the {key} in the body differs from the one in the URL")
        body[key] = value
    try:
        return parse(model, body)
    except ProtocolViolation as error:
        raise InvalidRequest(str(error)) from None


def guest_id_of(request: web.Request) -> str:
    """The ``{guest_id}`` of the URL, checked (a UUID)."""
    try:
        checked: str = GUEST_ID.validate_python(request.match_info["guest_id"])
    except ValidationError as error:
        raise InvalidRequest(plain_words(error, "guest_id")) from None
    return checked


def driver_of(request: web.Request) -> Driver:
    return request.app[DRIVER_KEY]


def migration_of(request: web.Request) -> Migration:
    migration = request.app[MIGRATIONS_KEY].get(request.match_info["migration_id"])
    if migration is None:
        raise UnknownMigration(f"no migration {request.match_info['migration_id']} on this host")
    return migration


# -- health and guests ----------------------------------------------------
async def health(request: web.Request) -> web.Response:
    driver = driver_of(request)
    try:
        window_s = min(float(request.query.get("window_s", KEPT_S)), KEPT_S)
    except ValueError:
        raise InvalidRequest("window_s must be a number of seconds") from None
    stall_ms, busy_ms = request.app[LOOP_WATCH_KEY].longest(window_s)
    health = Health(
        name=request.app[NAME_KEY],
        version=__version__,
        driver=driver.name,
        guests=len(driver.list_guests()),
        loop_stall_ms=round(stall_ms, 1),
        loop_busy_ms=round(busy_ms, 1),
        memory_mib=host_memory_mib(driver),
        cpus=os.cpu_count(),
        switchover_commits=bool(getattr(driver, "switchover_commits", False)),
        mirrors_local_disks=bool(getattr(driver, "mirrors_local_disks", False)),
    )
    return reply(health)


def host_memory_mib(driver: Any) -> int | None:
    """The memory guests may use on this host (MiB): the driver's ``capacity_mib`` when it has one (the
    simulated driver's option), else the machine's (``MemTotal`` in ``/proc/meminfo``); None: unknown."""
    capacity = getattr(driver, "capacity_mib", None)
    if isinstance(capacity, int):
        return capacity
    try:
        with open("/proc/meminfo") as meminfo:
            for row in meminfo:
                if row.startswith("MemTotal:"):
                    return int(row.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


async def metrics(request: web.Request) -> web.Response:
    """Prometheus' text format (``hostagent/metrics.py``), behind the secret like every route."""
    body = exposition(request.app[METRICS_KEY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def resources(request: web.Request) -> web.Response:
    """``GET /v1/resources``: ``agentprotocol.HostResources`` (pools, networks, volume writers)."""
    return reply(driver_of(request).resources())


async def list_guests(request: web.Request) -> web.Response:
    return reply(GuestList(guests=driver_of(request).list_guests()))


async def get_guest(request: web.Request) -> web.Response:
    return reply(driver_of(request).get_guest(guest_id_of(request)))


async def define_guest(request: web.Request) -> web.Response:
    spec = await read_message(request, GuestSpec, guest_id=guest_id_of(request))
    return reply(await driver_of(request).define_guest(spec))


async def start_guest(request: web.Request) -> web.Response:
    return reply(await driver_of(request).start_guest(guest_id_of(request)))


async def stop_guest(request: web.Request) -> web.Response:
    """Stop gracefully within ``graceful_timeout_s`` or at once (``StopRequest``; empty: at once)."""
    guest_id = guest_id_of(request)
    stop = await read_message(request, StopRequest) if request.can_read_body else StopRequest()
    grace = None if stop.force else stop.graceful_timeout_s
    stopped = await driver_of(request).stop_guest(guest_id, graceful_timeout_s=grace)
    log.info("stopped %s: %s after %.1f s", guest_id, stopped.stop, stopped.stop_s)
    return reply(stopped)


async def delete_guest(request: web.Request) -> web.Response:
    guest_id = guest_id_of(request)
    await driver_of(request).delete_guest(guest_id)
    return reply(Deleted(deleted=guest_id))


# -- migrations -------------------------------------------------------------
def check_new_migration(request: web.Request, migration_id: str) -> None:
    if migration_id in request.app[MIGRATIONS_KEY]:
        raise Conflict(f"migration {migration_id} already exists on this host")


async def prepare_incoming(request: web.Request) -> web.Response:
    incoming = await read_message(request, IncomingRequest)
    migration_id, spec = incoming.migration_id, incoming.guest
    check_new_migration(request, migration_id)
    migration, endpoint = await driver_of(request).prepare_incoming(
        spec,
        migration_id,
        incoming.limits,
        encryption=incoming.encryption,
        streams=incoming.streams,
        local_disks=incoming.local_disks,
    )
    request.app[MIGRATIONS_KEY][migration_id] = migration
    log.info("prepared incoming migration %s of %s on port %s", migration_id, spec.guest_id, endpoint.port)
    prepared = PreparedIncoming(
        migration_id=migration_id, data_host=endpoint.host, data_port=endpoint.port, token=endpoint.token
    )
    return reply(prepared)


async def start_outgoing(request: web.Request) -> web.Response:
    outgoing = await read_message(request, OutgoingRequest)
    migration_id, guest, target = outgoing.migration_id, outgoing.guest, outgoing.target
    check_new_migration(request, migration_id)
    migration = await driver_of(request).start_outgoing(
        guest,
        migration_id,
        target,
        outgoing.params,
        encryption=outgoing.encryption,
        streams=outgoing.streams,
        local_disks=outgoing.local_disks,
    )
    request.app[MIGRATIONS_KEY][migration_id] = migration
    log.info("started outgoing migration %s of %s to %s:%s", migration_id, guest, target.host, target.port)
    return reply(migration.snapshot())


async def change_params(request: web.Request) -> web.Response:
    """Change a running Copy's policy (``agentprotocol.ParamsChange``); only an outgoing migration has one."""
    change = await read_message(request, ParamsChange)
    migration = migration_of(request)
    apply = getattr(migration, "change_params", None)
    if apply is None:
        raise Conflict(f"migration {migration.migration_id} is an incoming one here; change it on its source")
    snapshot = await apply(change) if asyncio.iscoroutinefunction(apply) else apply(change)
    log.info("changed %s: %s", migration.migration_id, change.model_dump(exclude_defaults=True))
    return reply(snapshot)


MAX_DIRTY_RATE_WINDOW_S = 10.0


async def measure_dirty_rate(request: web.Request) -> web.Response:
    """``GET /v1/guests/{guest_id}/dirty-rate?seconds=S`` (default 1 s, at most 10 s)."""
    guest_id = guest_id_of(request)
    raw = request.query.get("seconds", "1")
    try:
        seconds = float(raw)
    except ValueError:
        raise InvalidRequest(f"seconds must be a number of seconds, not {raw!r}") from None
    if not 0.1 <= seconds <= MAX_DIRTY_RATE_WINDOW_S:
        raise InvalidRequest(f"seconds must be between 0.1 and {MAX_DIRTY_RATE_WINDOW_S:g}")
    return reply(await driver_of(request).measure_dirty_rate(guest_id, seconds))


# -- link probes (``hostagent/probe.py``) -------------------------------------------------------------
def check_no_active_migration(request: web.Request) -> None:
    """A probe would slow a running migration and measure a link it shares: 409 while one is active."""
    for migration in request.app[MIGRATIONS_KEY].values():
        snapshot = migration.snapshot()
        if snapshot.state in ACTIVE_STATES:
            raise Conflict(
                f"a migration ({snapshot.role} of {snapshot.migration_id}) is running here; probe later"
            )


async def prepare_probe(request: web.Request) -> web.Response:
    """``POST /v1/probes/incoming``: open a one-time probe listener (``agentprotocol.PreparedProbe``)."""
    probe = await read_message(request, ProbeRequest)
    check_no_active_migration(request)
    settings = request.app[SETTINGS_KEY]
    prepared = request.app[PROBES_KEY].open(probe, settings.data_host, settings.tls)
    log.info("prepared a link probe on port %s (%s)", prepared.data_port, probe.encryption)
    return reply(prepared)


async def start_probe(request: web.Request) -> web.Response:
    """``POST /v1/probes/outgoing``: probe a peer's prepared listener now (``agentprotocol.ProbeResult``)."""
    run = await read_message(request, ProbeRun)
    check_no_active_migration(request)
    result = await run_probe(run, request.app[SETTINGS_KEY].tls)
    log.info(
        "link probe to %s:%s: %d bytes in %.3f s",
        run.target.host,
        run.target.port,
        result.bytes,
        result.seconds,
    )
    return reply(result)


async def get_migration(request: web.Request) -> web.Response:
    return reply(migration_of(request).snapshot())


async def run_command(request: web.Request) -> web.Response:
    command = request.match_info["command"]
    if command not in COMMANDS:
        raise NotFound(f"no command {command}; commands are {', '.join(COMMANDS)}")
    migration = migration_of(request)
    snapshot = await getattr(migration, command)()
    log.info("%s %s -> %s", command, migration.migration_id, snapshot.state)
    return reply(snapshot)


async def stream_progress(request: web.Request) -> web.StreamResponse:
    """NDJSON: the current snapshot, then changes (at most ~20/s, but every phase change), until terminal.

    When nothing changes for HEARTBEAT_S the current snapshot is repeated.
    """
    migration = migration_of(request)
    response = web.StreamResponse(
        headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    sent = migration.snapshot()
    await response.write(line(sent))
    try:
        await follow_changes(migration, response, sent)
    except ConnectionResetError:
        log.info("progress reader of %s went away", migration.migration_id)
    return response


async def follow_changes(migration: Migration, response: web.StreamResponse, sent: ProgressSnapshot) -> None:
    seen_seq, sent_at = sent.seq, time.monotonic()
    pending = None
    while sent.state not in TERMINAL_STATES:
        if pending is None:
            wait = HEARTBEAT_S
        else:
            wait = max(0.0, STREAM_INTERVAL_S - (time.monotonic() - sent_at))
        try:
            latest = await asyncio.wait_for(migration.next_change(seen_seq), wait)
        except TimeoutError:
            # Nothing new for a while: repeat the latest, so readers can tell a quiet agent from a dead one.
            latest, pending = pending or migration.snapshot(), None
        else:
            seen_seq = latest.seq
            changed = (latest.state, latest.phase) != (sent.state, sent.phase)
            if not changed and time.monotonic() - sent_at < STREAM_INTERVAL_S:
                pending = latest
                continue
            pending = None
        sent, sent_at = latest, time.monotonic()
        await response.write(line(sent))
    await response.write_eof()


def line(snapshot: ProgressSnapshot) -> bytes:
    """One NDJSON line of the progress stream."""
    return snapshot.model_dump_json().encode() + b"\n"


async def _start_watch(watch: LoopWatch) -> None:
    watch.start()


def create_app(
    driver: Driver,
    secret: str,
    name: str,
    settings: DriverSettings | None = None,
    *,
    watch: LoopWatch | None = None,
) -> web.Application:
    """The agent's API over ``driver``; ``settings`` (the driver's by default) give the data plane's
    address and TLS to link probes.

    ``watch``: an event-loop watch shared by every app of one process (``hostagent.fleet``), started and
    stopped by its owner; None: the app starts and stops a watch of its own.
    """
    app = web.Application(middlewares=[plain_errors, authenticate], client_max_size=1 << 20)
    found = settings or getattr(driver, "settings", None)
    app[SETTINGS_KEY] = found if isinstance(found, DriverSettings) else DriverSettings(agent_name=name)
    app[PROBES_KEY] = probes = ProbeListeners()
    app[DRIVER_KEY] = driver
    app[SECRET_KEY] = secret.encode()
    app[NAME_KEY] = name
    app[MIGRATIONS_KEY] = {}
    migrations: dict[str, Migration] = app[MIGRATIONS_KEY]
    app[METRICS_KEY] = agent_registry(name, driver, lambda: migrations)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/resources", resources)
    app.router.add_get("/v1/guests", list_guests)
    app.router.add_get("/v1/guests/{guest_id}", get_guest)
    app.router.add_get("/v1/guests/{guest_id}/dirty-rate", measure_dirty_rate)
    app.router.add_put("/v1/guests/{guest_id}", define_guest)
    app.router.add_delete("/v1/guests/{guest_id}", delete_guest)
    app.router.add_post("/v1/guests/{guest_id}/start", start_guest)
    app.router.add_post("/v1/guests/{guest_id}/stop", stop_guest)
    app.router.add_post("/v1/migrations/incoming", prepare_incoming)
    app.router.add_post("/v1/migrations/outgoing", start_outgoing)
    app.router.add_post("/v1/probes/incoming", prepare_probe)
    app.router.add_post("/v1/probes/outgoing", start_probe)
    app.router.add_get("/v1/migrations/{migration_id}", get_migration)
    app.router.add_get("/v1/migrations/{migration_id}/progress", stream_progress)
    app.router.add_post("/v1/migrations/{migration_id}/params", change_params)
    app.router.add_post("/v1/migrations/{migration_id}/{command}", run_command)
    app.on_startup.append(lambda app: driver.open())
    if watch is None:
        app[LOOP_WATCH_KEY] = own = LoopWatch()
        app.on_startup.append(lambda app: _start_watch(own))
        app.on_cleanup.append(lambda app: own.stop())
    else:
        app[LOOP_WATCH_KEY] = watch
    app.on_cleanup.append(lambda app: probes.close())
    app.on_cleanup.append(lambda app: driver.close())
    return app
