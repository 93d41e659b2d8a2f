"""Small display helpers for console templates (badges for statuses), and ``{% slot %}``."""

from __future__ import annotations

from datetime import datetime

from django import template
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

from vms.devices import size_text
from vms.hooks import slot_templates
from vms.models import Registration
from vms.power import PowerAction, refusals

register = template.Library()


@register.simple_tag(takes_context=True)
def slot(context: template.Context, name: str) -> SafeString:
    """``{% slot "vsp_detail.overview" %}``: the templates other apps registered for this place of the
    page (``vms.hooks.register_slot``), rendered with the page's context, as ``{% include %}`` would;
    nothing when none is registered."""
    assert context.template is not None  # a tag renders inside a template
    engine = context.template.engine
    parts = []
    for template_name in slot_templates(name):
        with context.push():
            parts.append(engine.get_template(template_name).render(context))
    return SafeString("".join(parts))


BADGE_TONES = {
    "up": "ok",
    "on": "ok",
    "vm_enabled": "ok",
    "down": "muted",
    "off": "muted",
    "vm_disabled": "warn",
    "initializing": "info",
    "in_efi": "info",
    "not_runnable": "bad",
    "lost": "bad",
    "host_disabled": "warn",
    "host_not_licensed": "warn",
    "maintenance": "warn",
    "not_supported": "muted",
}


@register.simple_tag
def badge(value: str, label: str, field: str = "", stale: str = "") -> str:
    """A status badge: ``value`` picks its colour, ``label`` is shown escaped, ``field`` names it.

    ``stale``: why the status is only as last reported (``unreachable_note``): the badge is then grey,
    never the green of a status known now, with ``stale`` as its title and ``data-stale``."""
    tone = "muted" if stale else BADGE_TONES.get(str(value), "muted")
    extra = format_html(' title="{}" data-stale="true"', stale) if stale else ""
    if field:
        return format_html(
            '<span class="badge badge-{}" data-field="{}" data-value="{}"{}>{}</span>',
            tone,
            field,
            value,
            extra,
            label,
        )
    return format_html('<span class="badge badge-{}" data-value="{}"{}>{}</span>', tone, value, extra, label)


@register.filter
def size(value: int | None) -> str:
    """Bytes for people: "10 GiB", "1.5 TiB" ("—" for None)."""
    return "—" if value is None else size_text(value)


@register.filter
def mib(value: int | None) -> str:
    """Memory in MiB shown as MiB or GiB."""
    if value is None:
        return "—"
    if abs(value) >= 1024 and value % 1024 == 0:
        return f"{value // 1024} GiB"
    if abs(value) >= 1024:
        return f"{value / 1024:.1f} GiB"
    return f"{value} MiB"


@register.filter
def processor_name(vsp: object) -> str:
    """Family and model as one name, without saying a word twice ("Intel Xeon" + "Xeon Gold 6338")."""
    family = (getattr(vsp, "processor_family", "") or "").strip()
    model = (getattr(vsp, "processor_model", "") or "").strip()
    family_words, model_words = family.split(), model.split()
    for size in range(min(len(family_words), len(model_words)), 0, -1):
        if [w.lower() for w in family_words[-size:]] == [w.lower() for w in model_words[:size]]:
            model_words = model_words[size:]
            break
    return " ".join(family_words + model_words) or "—"


@register.filter
def since(moment: datetime | None) -> str:
    """ "since 20:41 UTC" (today) or "since 2026-11-28 20:41 UTC", in the console's time zone; "" if None."""
    if moment is None:
        return ""
    local = timezone.localtime(moment)
    when = f"{local:%H:%M}" if local.date() == timezone.localdate() else f"{local:%Y-%m-%d %H:%M}"
    return f"since {when} {local.tzname()}"


@register.filter
def free_memory(value: int | None) -> str:
    """Free memory, never negative: an overcommitted host says by how much."""
    if value is not None and value < 0:
        return f"overcommitted by {mib(-value)}"
    return mib(value)


@register.simple_tag
def power_refusals(registration: Registration, busy: str) -> dict[str, str]:
    """``{% power_refusals registration busy as refused %}``: why each power button is disabled (``busy``:
    why the guest is busy now, "" when it is not)."""
    return refusals(registration, str(busy or ""))


@register.filter
def get_item(mapping: dict[str, str], key: str) -> str:
    return mapping.get(key, "")


@register.simple_tag
def power_action_list() -> list[tuple[str, str]]:
    """The power buttons as (action, label), in the order they are shown."""
    return [(action.value, action.label) for action in PowerAction]


@register.filter
def may_set_up_hosts(user: object) -> bool:
    """Whether the navigation offers ``user`` **Hosts and rights** (``vms.host_setup.may_set_up_hosts``)."""
    from vms.host_setup import may_set_up_hosts as allowed

    return allowed(user)


@register.filter
def may_manage_vsp(user: object, vsp: object) -> bool:
    """Whether ``user`` may change ``vsp`` on its setup page (``vms.host_setup.check_can_manage_vsp``)."""
    from vms.access import allowed
    from vms.host_setup import check_can_manage_vsp

    return allowed(check_can_manage_vsp, user, vsp)


@register.filter
def runnable_elsewhere(registration: Registration) -> Registration | None:
    """The VM's other copy that is runnable (On or Off, not Not Runnable), or None: while it is, marking
    ``registration`` runnable is always refused (``actions.check_no_other_runnable_copy``), so the
    button is shown disabled with why. Reads ``vm.registrations`` (prefetched on the General tab)."""
    for other in registration.vm.registrations.all():
        if other.pk != registration.pk and other.hardware_status != Registration.HardwareStatus.NOT_RUNNABLE:
            return other
    return None


@register.filter
def unreachable_note(registration: Registration | None) -> str:
    """``Registration.unreachable_note`` ("as last reported: vsp2 unreachable since 20:13:05"), or ""."""
    return registration.unreachable_note() if registration is not None else ""
