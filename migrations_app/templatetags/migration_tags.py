"""Words and icons for migrations, shared by the General tab, the VSP tab and pushed updates."""

from __future__ import annotations

from typing import Any

from django import template
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

from migrations_app.access import migration_targets
from migrations_app.checks import host_refusal
from migrations_app.controls import control_allowed
from migrations_app.forecast import duration_words
from migrations_app.migration_policy import INPUT_BOUNDS
from migrations_app.models import PHASE_PERCENT_FIELD, Migration
from migrations_app.placement import begins_with_a_name
from migrations_app.progress import MigrationDisplay, get_migration_display
from migrations_app.samples import RECENT_RATE_S
from migrations_app.steering import Outlook, can_throttle_live, copy_over_note, outlook
from migrations_app.steering import steer_values as steering_values
from vms.devices import size_text
from vms.models import VSP, VirtualMachine

register = template.Library()

State = Migration.State

PHASE_STATUS_LABELS = {"pending": "Waiting", "running": "Running", "done": "Done", "failed": "Failed"}


@register.simple_tag
def policy_bounds(key: str) -> SafeString:
    """``min=".." max=".." step=".."`` of the number input for the policy value ``key``: exactly what the
    server takes (``migration_policy.INPUT_BOUNDS``), so a value the browser accepts is never refused."""
    low, high, step = (f"{bound:.3f}".rstrip("0").rstrip(".") for bound in INPUT_BOUNDS[key])
    return format_html('min="{}" max="{}" step="{}"', low, high, step)


@register.simple_tag
def throughput_figures(migration: Migration) -> dict[str, float | None]:
    """The panel's two rates (bytes/s): ``recent`` over the last ``window_s`` seconds (the live rate,
    ``Migration.recent_throughput_bytes_s``) and ``average``, the bytes sent over the time since Copy
    began (until it ended; None before Copy)."""
    average = None
    if migration.copy_started_at is not None:
        until = migration.copy_ended_at or timezone.now()
        seconds = (until - migration.copy_started_at).total_seconds()
        average = migration.bytes_sent / seconds if seconds > 0 else None
    return {"recent": migration.recent_throughput_bytes_s, "average": average, "window_s": RECENT_RATE_S}


@register.simple_tag
def shown_percent(migration: Migration, status: str, percent: int) -> str:
    """``{% shown_percent migration status percent as shown %}``: a phase's percent as the panel says it.

    The running Copy below 10 % gets a tenth from its bytes (sent / (sent + left), the agent's own
    formula), so a big guest's first minutes never read "0 %" while bytes move (issue 21.2): "0.4",
    "<0.1" once anything moved.
    Otherwise the whole percent the agent reported ("37").
    """
    if status == "running" and migration.state == State.COPY and percent < 10:
        total = migration.bytes_sent + migration.bytes_remaining
        if total > 0:
            fine = 100 * migration.bytes_sent / total
            if 0 < fine < 0.1:
                return "<0.1"  # started: bytes moved, fewer than a thousandth of them
            return f"{min(max(fine, float(percent)), 9.9):.1f}"
    return str(percent)


@register.simple_tag
def migration_display(vm: VirtualMachine) -> MigrationDisplay:
    """``{% migration_display vm as display %}``: what the General tab shows (see progress.py)."""
    return get_migration_display(vm)


@register.simple_tag
def migration_outlook(migration: Migration) -> Outlook | None:
    """The live forecast of a running Copy (``steering.outlook``)."""
    return outlook(migration)


@register.filter
def steer_values(migration: Migration) -> dict[str, Any]:
    """``{% with now=migration|steer_values %}``: the policy in force (``steering.steer_values``)."""
    return steering_values(migration)


@register.filter
def steer_closed(migration: Migration) -> str:
    """``steering.copy_over_note``: why the steering buttons no longer apply ("" while they do)."""
    return copy_over_note(migration)


@register.filter
def throttles_live(migration: Migration) -> bool:
    """``{% if migration|throttles_live %}``: throttling can be turned on while it runs (not on QEMU)."""
    return can_throttle_live(migration)


@register.filter
def get_row(rows: dict[int, Migration], vm_id: int) -> Migration | None:
    return rows.get(vm_id)


@register.filter
def reason_sentence(reason: str) -> str:
    """A check's reason as the start of a sentence; "vPars" keeps its lower-case v, and a reason opening
    with a host's or guest's name keeps the name as written ("vsp3 does not mount pool ...")."""
    if reason.startswith("vPar") or begins_with_a_name(reason):
        return reason
    return reason[:1].upper() + reason[1:]


@register.filter
def phase_status_label(status: str) -> str:
    return PHASE_STATUS_LABELS.get(status, status)


def at_once(migration: Migration) -> str:
    """How many migrations may leave the migration's source at once, in words."""
    source = migration.source
    limit = source.max_concurrent_migrations if source is not None else 1
    if limit == 1:
        return "one migration at a time leaves a VSP"
    return f"{limit} migrations at a time leave {source}"


@register.filter
def migration_summary(migration: Migration) -> str:
    target = migration.target.name
    if migration.state == State.QUEUED:
        return f"Waiting its turn to migrate to VSP {target} ({at_once(migration)})."
    if migration.state in Migration.PHASES:
        return f"Migrating to VSP {target}: {migration.get_state_display()} phase."
    if migration.state == State.COMMITTING:
        return f"Switching over to VSP {target}."
    if migration.state == State.COMPLETED:
        return f"Migrated to VSP {target} at {migration.state_changed_at:%Y-%m-%d %H:%M:%S}."
    return f"Migration to VSP {target} {migration.get_state_display().lower()}."


@register.filter
def last_migration_line(migration: Migration) -> str:
    """The one line left of the phases panel once a migration completed."""
    line = (
        f"Last migration: completed to VSP {migration.target.name} at {migration.state_changed_at:%H:%M} UTC"
    )
    if migration.downtime_ms is not None:
        line += f", downtime {migration.downtime_ms} ms"
    return line + "."


@register.filter
def migration_alert_text(migration: Migration) -> str:
    if migration.alert:
        return migration.alert
    phase = State(migration.failed_phase).label if migration.failed_phase in State.values else ""
    verb = "was cancelled" if migration.state == State.CANCELLED else "failed"
    return f"{phase} phase {verb}." if phase else f"The migration {verb}."


@register.filter
def never_migrates(vm: VirtualMachine) -> str:
    """Why ``vm`` cannot migrate whatever the target, in words ("" when it may): a vPar never migrates;
    a VM with online migration disabled does not until it is enabled. The General tab then shows
    Migrate… disabled with these words beside it instead of a dialog that refuses every target."""
    if vm.is_vpar:
        return f"{vm.name} is a vPar: vPars never migrate."
    if not vm.online_migration_enabled:
        return (
            f"Online migration is disabled for {vm.name}: enable it (Online Migration Enabled, above) "
            "to migrate."
        )
    return ""


@register.filter
def row_migration_text(migration: Migration, vsp: VSP) -> str:
    outgoing = migration.source_id == vsp.pk
    other = migration.target.name if outgoing else migration.require_source().name
    direction = "to" if outgoing else "from"
    if migration.state == State.QUEUED:
        return f"Waiting to migrate {direction} {other}"
    if migration.is_active:
        field = PHASE_PERCENT_FIELD.get(migration.state)
        percent = f" {getattr(migration, field)}%" if field else ""
        return f"Migrating {direction} {other}: {migration.get_state_display()}{percent}"
    if migration.state == State.COMPLETED:
        return f"Migrated {direction} {other}"
    return f"Migration {direction} {other} {migration.get_state_display().lower()}"


# Inline SVG where fonts may lack the glyph (headless and minimal systems have no emoji font).
HOURGLASS_SVG = (
    '<svg viewBox="0 0 16 16" width="14" height="14" aria-hidden="true" focusable="false">'
    '<path d="M4 1.5h8M4 14.5h8M5 1.5v2.5l3 4-3 4v2.5M11 1.5v2.5l-3 4 3 4v2.5" fill="none" '
    'stroke="currentColor" stroke-width="1.6" stroke-linecap="round"/></svg>'
)
WARNING_SVG = (
    '<svg viewBox="0 0 16 16" width="14" height="14" aria-hidden="true" focusable="false">'
    '<path d="M8 1.5 15 14.5H1z" fill="none" stroke="currentColor" stroke-width="1.5"/>'
    '<path d="M8 6v4.5M8 12v1" stroke="currentColor" stroke-width="1.6"/></svg>'
)


@register.simple_tag
def migration_icon(migration: Migration, vsp: VSP) -> SafeString:
    """The hourglass or direction icon, seen from ``vsp``; accessible text in title and aria-label."""
    outgoing = migration.source_id == vsp.pk
    other = migration.target.name if outgoing else migration.require_source().name
    symbol: str
    if migration.state == State.QUEUED:
        symbol, kind = SafeString(HOURGLASS_SVG), "queued"
        text = f"Waiting to migrate {'to' if outgoing else 'here from'} VSP {other}"
    elif migration.is_active:
        symbol, kind = ("\u2192", "to") if outgoing else ("\u2190", "from")
        text = f"Migrating to VSP {other}" if outgoing else f"Migrating from VSP {other}"
    elif migration.state == State.ABORTED:  # a cancel is someone's choice, not a failure: no warning
        symbol, kind = SafeString(WARNING_SVG), "failed"
        text = f"Migration to VSP {migration.target.name} {migration.get_state_display().lower()}"
    else:
        return SafeString("")
    return format_html(
        '<span class="migration-icon migration-icon-{}" role="img" title="{}" aria-label="{}">{}</span>',
        kind,
        text,
        text,
        symbol,
    )


@register.filter
def other_vsps(vsp: VSP, user: Any) -> list[tuple[VSP, str]]:
    """The targets "migrate selected" offers ``user`` from ``vsp``: VSPs where they are an operator, each
    with why it cannot take any guest from ``vsp`` now ("" when it can; ``checks.host_refusal``:
    maintenance, disabled, not licensed, agent unreachable), so the form shows it disabled with the reason,
    as the single-VM dialog does. Memory and per-guest checks stay the action's (they differ per guest)."""
    return [
        (other, host_refusal(vsp, other) or "")
        for other in migration_targets(user).exclude(pk=vsp.pk).order_by("name")
    ]


@register.filter
def seconds(value: float | None) -> str:
    """A duration, forecast or time left in words: "not known yet" for None, "under 1 s" for less
    than a second (rounded it read "took 0 s"), else "42 s" or "3 min 5 s"."""
    return duration_words(value)


@register.simple_tag(takes_context=True)
def control_shown(context: template.Context, control: str) -> bool:
    """Whether to draw live ``control`` (``migrations_app.controls.CONTROLS``) for ``vm`` / ``migration``.

    Rendered for a class of watchers (a push, ``view_controls``: ``controls.ViewClass.controls``):
    whether the class may use it. Rendered for a request: whether its user may use it. For neither
    (tests): True.
    """
    view_controls = context.get("view_controls")
    if view_controls is not None:
        return control in view_controls
    user = context.get("user")
    if user is None:
        return True
    return control_allowed(user, control, context["vm"], context.get("migration"))


@register.filter
def any_target_open(targets: list[tuple[VSP, str]]) -> bool:
    """Whether one of ``other_vsps``'s targets can take guests now (no refusal)."""
    return any(not reason for _, reason in targets)


@register.filter
def guest_disks(devices: dict | None) -> str:
    """A migration's ``guest_devices`` disks in words: "vda: san-a/db01-vda.qcow2 (20 GiB)", a disk on a
    local pool (mirrored) "vdb: scratch/db01-vdb.qcow2 (10 GiB, local: mirrored)"; "" if none."""
    disks = (devices or {}).get("disks") or []
    return "; ".join(
        f"{disk['device']}: {disk['pool']}/{disk['volume']} ({size_text(disk['virtual_size_bytes'])}"
        f"{', local: mirrored' if disk.get('local') else ''})"
        for disk in disks
    )


@register.filter
def guest_networks(devices: dict | None) -> str:
    """A migration's ``guest_devices`` cards in words: "nic 0: prod-net (52:54:00:..)"; "" if none."""
    nics = (devices or {}).get("nics") or []
    return "; ".join(f"nic {index}: {nic['network']} ({nic['mac']})" for index, nic in enumerate(nics))
