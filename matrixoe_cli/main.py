"""The ``matrixoe`` command: ``login``, ``vsps``, ``pools``, ``vms``, ``status``, ``define``, ``migrate``,
``change``, ``switchover``, ``cancel``, ``history``, ``evacuate``.

Every command takes ``--json`` (the API's JSON, for scripts). Exit status: 0 done; 1 refused or failed
(the console's words on stderr), a bad value of a numeric option included (taken as text and checked
by the API, so the words are the Migrate dialog's); 2 bad usage (typer: an unknown option, a missing
argument).
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .client import ApiError, Client
from .config import Login, NotLoggedIn, load_login, save_login
from .safe import segment, terminal_text
from .watch import watch_migration

app = typer.Typer(help="The Matrix OE console from a shell.", no_args_is_help=True, add_completion=False)
out = Console()
err = Console(stderr=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Print the API's JSON, for scripts.")]
# The API names no pool or network of a VSP outside the caller's host groups (null): the pages' words.
HIDDEN_POOL = "a pool of another host group"
HIDDEN_NETWORK = "a network of another host group"


def fail(message: str) -> typer.Exit:
    err.print(terminal_text(message), style="bold red", markup=False, highlight=False)
    return typer.Exit(1)


def plain(*values: str) -> list[Text]:
    """Table cells shown as the text they are: never read as rich markup (a name like "[blink]x")."""
    return [Text(value) for value in values]


def json_number(text: str) -> int | float | str:
    """An option's text as the JSON number the API takes ("300" -> 300, "1e3" -> 1000, "2.5" -> 2.5).

    Text that is not a finite number is sent as it is: the API refuses it with the Migrate dialog's
    words ("Maximum downtime: a number, not 'abc'."), which the command prints, exit status 1. So
    numeric options are taken as text, never refused by the option parser in other words (exit 2).
    """
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text
    if not math.isfinite(number):
        return text
    return int(number) if number.is_integer() else number


def whole_option(text: str, option: str, low: int, high: int) -> int:
    """A whole-number option checked here (not a policy value: no API field says it in words).

    Raises ``typer.Exit(1)`` with "--limit: a whole number from 1 to 500, not 'abc'." when it is not.
    """
    number = json_number(text)
    if isinstance(number, int) and low <= number <= high:
        return number
    raise fail(f"{option}: a whole number from {low} to {high}, not {text!r}.")


def client(as_json: bool = False) -> Client:
    """The API client; its answers made safe for a terminal unless ``as_json`` (``safe.py``)."""
    try:
        return Client(load_login(), for_terminal=not as_json)
    except NotLoggedIn as error:
        raise fail(str(error)) from None


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


@app.command()
def login(
    url: Annotated[str, typer.Argument(help="The console's address, e.g. https://console.example.com")],
    token: Annotated[str | None, typer.Option(help="An API token (else asked for, hidden)")] = None,
    as_json: JsonOption = False,
) -> None:
    """Store the console's address and your API token (create one on the console's API tokens page)."""
    url = url.rstrip("/")
    if not token:
        token = typer.prompt(f"API token (from {url}/account/tokens/)", hide_input=True)
    try:
        Client(Login(url, token.strip())).get("/vsps", limit=1)
    except ApiError as error:
        raise fail(f"Login refused: {error}") from None
    path = save_login(Login(url, token.strip()))
    if as_json:
        print_json({"url": url, "config": str(path)})
    else:
        out.print(f"Logged in to {url}; token stored in {path} (mode 600).", markup=False)


@app.command()
def vsps(as_json: JsonOption = False) -> None:
    """The VSPs (VM hosts)."""
    items = call(lambda api: api.all_pages("/vsps"), as_json)
    if as_json:
        return print_json(items)
    table = Table("VSP", "Online migration", "Licensed", "Memory", "CPUs", "Agent")
    for vsp in items:
        table.add_row(
            *plain(
                vsp["name"],
                "enabled" if vsp["migration_enabled"] else "disabled",
                "yes" if vsp["licensed"] else "no",
                f"{vsp['memory_mib']} MiB",
                str(vsp["cpus"]),
                "reachable"
                if vsp["agent_reachable"]
                else unreachable(vsp.get("unreachable_since"), vsp.get("agent_problem") or ""),
            )
        )
    out.print(table)


def unreachable(since: str | None, problem: str = "") -> str:
    """ "UNREACHABLE since 2026-11-29 20:41 UTC: agent not running (connection refused)" from the API's
    ISO time (as the console sent it) and the VSP's ``agent_problem`` (why, when known)."""
    why = f": {problem}" if problem else ""
    if not since:
        return f"UNREACHABLE{why}"
    moment = datetime.fromisoformat(since.replace("Z", "+00:00"))
    return f"UNREACHABLE since {moment:%Y-%m-%d %H:%M} {moment.tzname() or ''}".rstrip() + why


@app.command()
def vms(
    vsp: Annotated[str | None, typer.Option("--vsp", help="Only VMs with a copy on this VSP")] = None,
    as_json: JsonOption = False,
) -> None:
    """VMs and vPars, where each runs, and whether it can migrate online."""
    items = call(lambda api: api.all_pages("/vms", vsp=vsp), as_json)
    if as_json:
        return print_json(items)
    table = Table("Name", "Kind", "VSP", "OS Status", "Hardware", "Online Migration", "Migration")
    for vm in items:
        migration = vm["migration"]
        table.add_row(
            *plain(
                vm["name"],
                vm["kind"]["label"],
                vm["vsp"] or "—",
                vm["os_status"]["label"],
                (vm["hardware_status"] or {}).get("label", "—") + as_last_reported(vm),
                vm["online_migration"]["label"],
                f"{migration['state']['label']} → {migration['target']}"
                if migration and migration["active"]
                else "",
            )
        )
    out.print(table)


@app.command()
def status(vm: Annotated[str, typer.Argument(help="VM name or id")], as_json: JsonOption = False) -> None:
    """The VM's General tab, as text."""
    data = call(lambda api: api.get(f"/vms/{segment(vm)}"), as_json)
    if as_json:
        return print_json(data)
    for label, value in general_tab_lines(data):
        out.print(Text.assemble((f"{label + ':':<26}", "bold"), " ", value), highlight=False)
    if data["migration"]:
        migration = data["migration"]
        heading = f"\nOnline Migration Phases (to {migration['target']}, {migration['state']['label']}):"
        out.print(heading, markup=False, highlight=False)
        for phase in migration["phases"]:
            out.print(f"  {phase['label']:<12} {phase['percent']:>3}%", markup=False, highlight=False)
    print_devices(data)
    if data["alert"]:
        out.print(Text.assemble("\n", ("Alert:", "bold red"), " ", data["alert"]["alert"]), highlight=False)


def size_text(size: int) -> str:
    """Bytes for people, as the console's pages say them: "10 GiB", "1.5 TiB"."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    value, unit = float(size), 0
    while value >= 1024 and unit < len(units) - 1:
        value, unit = value / 1024, unit + 1
    return f"{f'{value:.1f}'.removesuffix('.0')} {units[unit]}"


def print_devices(vm: dict) -> None:
    """The Storage and Network tabs: one table each (nothing when the VM has none)."""
    if vm.get("disks"):
        table = Table("Disk", "Pool", "Volume", "Virtual size", "Allocated", "Access", title="Storage")
        for disk in vm["disks"]:
            access = "read-only" if disk["read_only"] else "read-write"
            table.add_row(
                *plain(
                    disk["device"],
                    disk["pool"] or HIDDEN_POOL,
                    disk["volume"],
                    size_text(disk["virtual_size_bytes"]),
                    size_text(disk["allocated_bytes"]),
                    access + (", shareable" if disk["shareable"] else ""),
                )
            )
        out.print(table)
    if vm.get("nics"):
        table = Table("Card", "Network", "MAC", "Model", title="Network")
        for nic in vm["nics"]:
            network = nic["network"] or HIDDEN_NETWORK
            table.add_row(*plain(f"nic {nic['index']}", network, nic["mac"], nic["model"]))
        out.print(table)


@app.command()
def pools(vsp: Annotated[str, typer.Argument(help="VSP name or id")], as_json: JsonOption = False) -> None:
    """A VSP's storage pools (free space) and networks, as its agent last reported them."""
    data = call(lambda api: api.get(f"/vsps/{segment(vsp)}"), as_json)
    if as_json:
        return print_json(
            {key: data.get(key) for key in ("name", "resources_collected_at", "pools", "networks")}
        )
    if not data.get("resources_collected_at"):
        out.print(
            f"{data['name']}: storage pools and networks not known (its agent does not report them).",
            markup=False,
            highlight=False,
        )
        return
    table = Table("Pool", "Kind", "Identity", "Capacity", "Free", title=f"Storage pools of {data['name']}")
    for pool in data["pools"]:
        table.add_row(
            *plain(
                pool["name"],
                pool["kind"],
                pool["identity"],
                size_text(pool["capacity_bytes"]),
                size_text(pool["free_bytes"]),
            )
        )
    out.print(table)
    networks = Table("Network", "Kind", "Bridged to", title=f"Networks of {data['name']}")
    for network in data["networks"]:
        networks.add_row(*plain(network["name"], network["kind"], network["bridge"] or "—"))
    out.print(networks)


def disk_option(text: str) -> dict[str, Any]:
    """``--disk POOL:SIZE`` (a new volume: "10G", "512M", bytes) or ``--disk POOL:image=NAME``."""
    pool, _, rest = text.partition(":")
    if rest.startswith("image="):
        return {"pool": pool, "image": rest.removeprefix("image=")}
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number, unit = (rest[:-1], units[rest[-1].upper()]) if rest[-1:].upper() in units else (rest, 1)
    try:
        size = float(number) * unit
    except ValueError:
        raise fail(f"--disk {text!r}: give POOL:SIZE (e.g. san-a:10G) or POOL:image=NAME.") from None
    if not math.isfinite(size) or abs(size) > 1 << 62:
        raise fail(f"--disk {text!r}: give POOL:SIZE (e.g. san-a:10G) or POOL:image=NAME.")
    return {"pool": pool, "size_bytes": int(size)}  # 0 or too large: the console's refusal names the bounds


@app.command()
def define(
    name: Annotated[str, typer.Argument(help="The new VM's name")],
    vsp: Annotated[str, typer.Option("--vsp", help="The VSP to define it on (name or id)")],
    memory: Annotated[str, typer.Option("--memory", help="Memory (MiB)")] = "512",
    vcpus: Annotated[str, typer.Option("--vcpus", help="Virtual CPUs")] = "1",
    disk: Annotated[
        list[str] | None,
        typer.Option(
            "--disk", help="POOL:SIZE (a new volume, e.g. san-a:10G) or POOL:image=NAME (repeatable)"
        ),
    ] = None,
    nic: Annotated[
        list[str] | None, typer.Option("--nic", help="NETWORK or NETWORK=MAC (repeatable; MAC generated)")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Define a VM on a VSP with disks in its pools and network cards on its networks."""
    body = {
        "name": name,
        "vsp": vsp,
        "memory_mib": json_number(memory),
        "vcpus": json_number(vcpus),
        "disks": [disk_option(text) for text in disk or []],
        "nics": [dict(zip(("network", "mac"), text.split("=", 1), strict=False)) for text in nic or []],
    }
    data = call(lambda api: api.post("/vms", body), as_json)
    if as_json:
        return print_json(data)
    out.print(f"{data['name']} defined on {data['vsp'] or vsp}.", markup=False, highlight=False)
    print_devices(data)


def as_last_reported(vm: dict) -> str:
    """ " (as last reported: vsp2 unreachable since 20:13:05)" when the VM's host does not answer (the
    API's ``host_unreachable``), else "": the statuses shown are then only the last ones reported."""
    note = vm.get("host_unreachable") or ""
    return f" ({note})" if note else ""


def general_tab_lines(vm: dict) -> list[tuple[str, str]]:
    limits = vm["phase_time_limits_s"]
    copy_limit = "unlimited" if limits["copy"] is None else f"{limits['copy']} s"
    return [
        ("Name", f"{vm['name']} ({vm['kind']['label']})"),
        ("VSP", vm["vsp"] or "—"),
        ("Operating System", vm["operating_system"] or "—"),
        (
            "OS Status",
            vm["os_status"]["label"]
            + {"queued": " (waiting to migrate)", "outgoing": " (migrating)"}.get(vm["migration_icon"], "")
            + ("" if (vm["hardware_status"] or {}).get("value") == "not_runnable" else as_last_reported(vm)),
        ),
        ("Virtual Hardware Status", (vm["hardware_status"] or {}).get("label", "—") + as_last_reported(vm)),
        ("Boot Attribute", vm["boot_attribute"]["label"]),
        ("Graceful Stop Timeout", f"{vm['graceful_stop_timeout_s']} s"),
        ("Online Migration Enabled", vm["online_migration"]["label"]),
        ("Not Runnable Set By", vm["not_runnable_set_by"]["label"]),
        ("Not Runnable Reason", vm["not_runnable_reason"] or "—"),
        ("Memory", f"{vm['memory_mib']} MiB"),
        ("vCPUs", str(vm["vcpus"])),
        (
            "Phase time limits",
            f"Init {limits['init']} s · Copy {copy_limit} · I/O Quiesce {limits['io_quiesce']} s · "
            f"Frozen {limits['frozen']} s",
        ),
    ]


@app.command()
def migrate(
    vm: Annotated[str, typer.Argument(help="VM name or id")],
    to: Annotated[str, typer.Option("--to", help="Target VSP name or id")],
    watch: Annotated[bool, typer.Option("--watch", help="Show live progress until it ends")] = False,
    max_downtime: Annotated[
        str | None, typer.Option("--max-downtime", help="Allowed downtime (ms) for this migration")
    ] = None,
    bandwidth: Annotated[str | None, typer.Option("--bandwidth", help="Bandwidth cap (MB/s)")] = None,
    auto_converge: Annotated[
        bool, typer.Option("--auto-converge", help="Throttle the guest stepwise if it does not converge")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Migrate a running VM online to another VSP (the Migrate dialog's checks and policy bounds apply)."""
    policy: dict[str, int | float | bool | str] = {}
    if max_downtime is not None:
        policy["max_downtime_ms"] = json_number(max_downtime)
    if bandwidth is not None:
        policy["bandwidth_cap_mb_s"] = json_number(bandwidth)
    if auto_converge:
        policy["auto_converge"] = True
    api = client(as_json)
    try:
        migration = api.create_migration(vm, to, {"preset": "custom", **policy} if policy else None)
    except ApiError as error:
        raise fail(str(error)) from None
    if migration.get("forecast_warning") and not as_json:  # started all the same; JSON carries it
        err.print(
            f"Warning: {terminal_text(migration['forecast_warning'])}",
            style="yellow",
            markup=False,
            highlight=False,
        )
    if not watch:
        if as_json:
            return print_json(migration)
        out.print(
            f"Migration {migration['id']} of {migration['vm']} to {migration['target']} queued.", markup=False
        )
        return
    try:
        final = watch_migration(api, migration, out, as_json=as_json)
    except ApiError as error:
        raise fail(str(error)) from None
    if final["state"]["value"] != "completed":
        raise fail(final["alert"] or f"The migration ended {final['state']['label']}.")
    if not as_json:
        out.print(f"{final['vm']} now runs on VSP {final['target']}.", markup=False, highlight=False)


@app.command()
def cancel(vm: Annotated[str, typer.Argument(help="VM name or id")], as_json: JsonOption = False) -> None:
    """Cancel the VM's queued or running migration (the VM keeps running on its source)."""
    api = client(as_json)
    try:
        active = api.get("/migrations", vm=vm, active="true", limit=1)["items"]
        if not active:
            raise ApiError(f"Nothing to cancel: {vm} has no queued or running migration.")
        migration = api.post(f"/migrations/{active[0]['id']}/cancel")
    except ApiError as error:
        raise fail(str(error)) from None
    if as_json:
        return print_json(migration)
    out.print(
        f"Cancel of the migration of {migration['vm']} requested ({migration['state']['label']}).",
        markup=False,
    )


@app.command()
def change(
    vm: Annotated[str, typer.Argument(help="VM name or id")],
    max_downtime: Annotated[
        str | None, typer.Option("--max-downtime", help="Allowed downtime (ms); raising it lets Copy finish")
    ] = None,
    bandwidth: Annotated[
        str | None, typer.Option("--bandwidth", help="Bandwidth cap (MB/s); 0: no cap")
    ] = None,
    auto_converge: Annotated[
        bool | None,
        typer.Option("--auto-converge/--no-auto-converge", help="Turn throttling of the guest on or off"),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Change the VM's running migration (Init or Copy) at once, as its phases panel does."""
    body: dict[str, Any] = {}
    if max_downtime is not None:
        body["max_downtime_ms"] = json_number(max_downtime)
    if bandwidth is not None:
        body["bandwidth_cap_mb_s"] = json_number(bandwidth)
    if auto_converge is not None:
        body["auto_converge"] = auto_converge
    if not body:
        raise fail(
            "Nothing to change: give --max-downtime, --bandwidth or --auto-converge/--no-auto-converge."
        )
    steer(vm, lambda api, migration_id: api.patch(f"/migrations/{migration_id}/policy", body), as_json)


@app.command()
def switchover(vm: Annotated[str, typer.Argument(help="VM name or id")], as_json: JsonOption = False) -> None:
    """Switch the VM's running migration over now: Copy ends at once, the guest is frozen for what is left."""
    steer(vm, lambda api, migration_id: api.post(f"/migrations/{migration_id}/switchover"), as_json)


def steer(vm: str, request: Any, as_json: bool) -> None:
    """``request(api, id)`` on the VM's queued or running migration; the console's words either way."""
    api = client(as_json)
    try:
        active = api.get("/migrations", vm=vm, active="true", limit=1)["items"]
        if not active:
            raise ApiError(f"Nothing to change: {vm} has no running migration.")
        migration = request(api, active[0]["id"])
    except ApiError as error:
        raise fail(str(error)) from None
    if as_json:
        return print_json(migration)
    out.print(f"{migration['vm']}: {migration['done']}", markup=False, highlight=False)


@app.command()
def history(
    vm: Annotated[str | None, typer.Argument(help="Only this VM (name or id)")] = None,
    limit: Annotated[str, typer.Option(help="How many, newest first (1 to 500)")] = "20",
    as_json: JsonOption = False,
) -> None:
    """Past and current migrations, newest first."""
    count = whole_option(limit, "--limit", 1, 500)
    items = call(lambda api: api.get("/migrations", vm=vm, limit=count)["items"], as_json)
    if as_json:
        return print_json(items)
    table = Table("Id", "VM", "From", "To", "Requested", "By", "Outcome", "Downtime")
    for m in items:
        table.add_row(
            *plain(
                str(m["id"]),
                m["vm"],
                m["source"],
                m["target"],
                m["requested_at"][:19].replace("T", " "),
                m["requested_by"] or "—",
                m["state"]["label"] + (f" in {m['failed_phase']}" if m["failed_phase"] else ""),
                downtime_cell(m),
            )
        )
    out.print(table)


def downtime_cell(migration: dict[str, Any]) -> str:
    """ "4012 ms (3712 ms over the allowed 300 ms)": the history's Downtime, flagged when over."""
    downtime = migration["statistics"]["downtime_ms"]
    if downtime is None:
        return "—"
    allowed = migration.get("allowed_downtime_ms")
    if migration.get("downtime_over") and isinstance(allowed, int):
        return f"{downtime} ms ({downtime - allowed} ms over the allowed {allowed} ms)"
    return f"{downtime} ms"


def call(function: Any, as_json: bool = False) -> Any:
    api = client(as_json)
    try:
        return function(api)
    except ApiError as error:
        raise fail(str(error)) from None


def run() -> None:
    app()


@app.command()
def evacuate(
    vsp: Annotated[str, typer.Argument(help="The VSP to empty (name or id)")],
    plan_only: Annotated[bool, typer.Option("--plan-only", help="Show the plan, start nothing")] = False,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", help="A VM that stays (repeatable)")
    ] = None,
    confirm: Annotated[
        list[str] | None,
        typer.Option("--confirm", help="Start this VM although it may or will not converge (repeatable)"),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Evacuate a VSP: show the plan (each guest's target and forecast, who stays and why), then start it.

    Started, the VSP enters maintenance and its guests leave one at a time (or as many at once as the
    VSP allows); follow it on the VSP's page or with ``GET /api/v1/evacuations/ID``. Exit status 1
    with the console's words when refused: a guest that may or will not converge is not started unless
    it is given to ``--confirm`` (or ``--exclude``, or its policy is changed).
    """
    choices = {"exclude": exclude or [], "confirm": confirm or []}
    plan = call(lambda api: api.get(f"/vsps/{segment(vsp)}/evacuation-plan", **choices), as_json)
    if plan_only or not plan["can_start"]:
        if as_json:
            print_json(plan)
        else:
            print_plan(plan)
        if not plan_only:
            raise fail(" ".join(plan["problems"]) or f"Nothing on {plan['vsp']} can leave.")
        return
    evacuation = call(lambda api: api.post(f"/vsps/{segment(vsp)}/evacuations", choices), as_json)
    if as_json:
        return print_json(evacuation)
    print_plan(plan)
    out.print(
        f"Evacuation {evacuation['id']} of {evacuation['vsp']} started: {evacuation['summary']}.",
        markup=False,
        highlight=False,
    )


def seconds_text(seconds: float) -> str:
    """A forecast in words as the evacuation page says it: "under 1 s", "42 s", "3 min 5 s"."""
    if 0 < seconds < 1:
        return "under 1 s"
    whole = round(seconds)
    return f"{whole} s" if whole < 60 else f"{whole // 60} min {whole % 60} s"


def print_plan(plan: dict[str, Any]) -> None:
    table = Table("Guest", "Target", "Forecast", "Problem")
    for step in plan["steps"]:
        forecast = "not known yet" if step["predicted_s"] is None else seconds_text(step["predicted_s"])
        if step.get("verdict") in ("may_not_converge", "will_not_converge"):  # forecast.Verdict.warns
            forecast += f" ({step['verdict_label']})"
        table.add_row(*plain(step["vm"], step["target"] or "-", forecast, step["problem"]))
    out.print(table)
    for arriving in plan.get("arriving", []):  # migrating to the VSP now: moved on once landed
        out.print(f"arriving: {arriving['vm']}: {arriving['words']}", markup=False, highlight=False)
    for stay in plan["staying"]:
        out.print(f"stays: {stay['vm']}: {stay['reason']}", markup=False, highlight=False)
