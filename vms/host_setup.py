"""Setting up hosts and rights from the console: add a VSP, change it, retire it; host groups and roles.

**Adding a VSP: trust on first use** (as ssh, or Proxmox adding a node):

1. ``first_contact(url)``: the console opens a TLS connection to the agent *without* checking its
   certificate and sends nothing over it (no secret, no request): it only reads the certificate and
   returns its SHA-256 fingerprint, for the admin to compare with the one the agent printed when it
   started (``python -m hostagent`` logs it).
2. ``check_agent(url, secret, pin)``: once the admin confirmed that fingerprint, the pinned
   connection (``AgentClient`` with the fingerprint as its trust: the secret goes only to the
   certificate with exactly that fingerprint) asks the agent for its health and guests: its driver,
   memory, CPUs and guests (``AgentReport``).
3. ``do_add_vsp``: the VSP is stored with the pin as its ``agent_certificate`` (so every later call
   is pinned too) and the secret encrypted (``vms.fields``); an ``AuditEvent`` records it (the secret
   never: neither in the event nor in a log).

A plain ``http://`` address has no certificate: allowed only where ``vms.agent_address`` allows it
(development, or ``AGENT_PLAIN_HTTP_ALLOWED``), and never beside a pin.

**Rights** (``docs/permissions.md``): superusers may do everything here. A host group's
*administrator* may add VSPs into that group (with ``vms.add_vsp``), change its VSPs (``vms.change_vsp``;
moving one to another group needs the administrator role there too), retire them (``vms.delete_vsp``),
and give and take roles in that group and change its description (``vms.change_hostgroup``). Creating
and deleting groups, and VSPs in no group, are superusers' only. Every change is an ``AuditEvent``.

**Retiring** a VSP keeps its history (migrations, evacuations, audit events name it): it leaves the
lists and inventory collection, takes no guests, and its agent secret is erased, so nothing is sent to
that address again. Refused, with why, while a guest can run there (a copy On or Off) or a migration or
an evacuation involves it (``vms.hooks.vsp_busy_reasons``).
"""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from agentprotocol import GuestInfo
from vms.access import AccessDenied, has_global, has_role_on, require_global
from vms.agent_address import check_agent_address
from vms.agent_client import (
    AgentClient,
    AgentError,
    AgentUntrusted,
    certificate_fingerprint,
    normalize_fingerprint,
)
from vms.hooks import vsp_busy_reasons
from vms.models import VSP, AuditEvent, HostGroup, HostGroupMembership, Registration, Role

logger = logging.getLogger(__name__)

ADD_VSP_PERMISSION = "vms.add_vsp"
CHANGE_VSP_PERMISSION = "vms.change_vsp"
RETIRE_VSP_PERMISSION = "vms.delete_vsp"
CHANGE_GROUP_PERMISSION = "vms.change_hostgroup"
# Never carried by a role (vms.access.ROLE_PERMISSIONS): a superuser gives them.
SETUP_PERMISSIONS = (
    ADD_VSP_PERMISSION,
    CHANGE_VSP_PERMISSION,
    RETIRE_VSP_PERMISSION,
    CHANGE_GROUP_PERMISSION,
)
CONTACT_TIMEOUT_S = 5.0
# The fields of a VSP the console's setup pages change (the agent's address and secret apart).
VSP_FIELDS = (
    "name",
    "group",
    "memory_mib",
    "cpus",
    "migration_enabled",
    "licensed",
    "max_concurrent_migrations",
)


class SetupRefused(ValidationError):
    """A setup change was refused; ``message`` says why in plain words. Nothing was changed."""


# -- rights ----------------------------------------------------------------------------------------------


def _superuser(user: Any) -> bool:
    return bool(getattr(user, "is_superuser", False) and getattr(user, "is_active", False))


def groups_for_hosts(user: Any, permission: str = ADD_VSP_PERMISSION) -> list[HostGroup]:
    """The host groups ``user`` may put VSPs in (superusers: all; others: ``permission`` and the
    administrator role there)."""
    if _superuser(user):
        return list(HostGroup.objects.order_by("name"))
    if not has_global(user, permission):
        return []
    return list(
        HostGroup.objects.filter(memberships__user_id=user.pk, memberships__role=Role.ADMINISTRATOR).order_by(
            "name"
        )
    )


def may_set_up_hosts(user: Any) -> bool:
    """Whether the console's setup pages offer ``user`` anything: a superuser, or the administrator of a
    group holding one of the setup permissions."""
    if _superuser(user):
        return True
    return (
        any(has_global(user, p) for p in SETUP_PERMISSIONS)
        and HostGroupMembership.objects.filter(user_id=user.pk, role=Role.ADMINISTRATOR).exists()
    )


def check_can_place(user: Any, group: HostGroup | None, permission: str, what: str) -> None:
    """Raises ``AccessDenied`` unless ``user`` may ``what`` a VSP in ``group`` (None: no group)."""
    if _superuser(user):
        return
    require_global(user, permission)
    if group is None:
        raise AccessDenied(f"You may not {what} a VSP outside every host group: only superusers may.")
    if not HostGroupMembership.objects.filter(group=group, user_id=user.pk, role=Role.ADMINISTRATOR).exists():
        raise AccessDenied(f"You may not {what} a VSP in {group.name}: you are not an administrator of it.")


def check_can_manage_vsp(user: Any, vsp: VSP, permission: str = CHANGE_VSP_PERMISSION) -> None:
    """Change or retire ``vsp``: ``permission`` and administrator of its group (superusers: always)."""
    if _superuser(user):
        return
    require_global(user, permission)
    if vsp.group_id is None or not has_role_on(user, Role.ADMINISTRATOR, [vsp.pk]):
        raise AccessDenied(f"You may not change {vsp.name}: you are not an administrator of its host group.")


def check_can_manage_group(user: Any, group: HostGroup) -> None:
    """Describe ``group`` and give or take roles in it: ``vms.change_hostgroup`` and its administrator."""
    if _superuser(user):
        return
    require_global(user, CHANGE_GROUP_PERMISSION)
    if not HostGroupMembership.objects.filter(group=group, user_id=user.pk, role=Role.ADMINISTRATOR).exists():
        raise AccessDenied(f"You may not manage {group.name}: you are not an administrator of it.")


def check_superuser(user: Any, what: str) -> None:
    if not _superuser(user):
        raise AccessDenied(f"Only superusers may {what}.")


def manageable_groups(user: Any) -> list[HostGroup]:
    """The groups whose roles ``user`` may manage (``check_can_manage_group``)."""
    return groups_for_hosts(user, CHANGE_GROUP_PERMISSION)


# -- first contact and the pinned check ------------------------------------------------------------------


@dataclass(frozen=True)
class FirstContact:
    """What the console saw of an agent before sending it anything: its address (normalized), the
    SHA-256 fingerprint of its certificate (None for plain http) and a warning for plain http."""

    url: str
    fingerprint: str | None
    warning: str = ""


def normalize_url(url: str) -> str:
    """``url`` stripped, without a trailing slash, ``https://`` added when no scheme was typed; raises
    ``SetupRefused`` for an address that is not http(s)://host:port."""
    check_text(agent_url=url)
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = f"https://{url}"
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise SetupRefused("The agent address has a port that is not a number from 1 to 65535.") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
        raise SetupRefused(
            "The agent address must look like https://host:port (e.g. https://10.0.0.11:7101)."
        )
    if parts.path or parts.query or parts.fragment or parts.username:
        raise SetupRefused("The agent address is https://host:port only: no path, query or user name.")
    del port
    return url


def first_contact(url: str, timeout_s: float = CONTACT_TIMEOUT_S) -> FirstContact:
    """Read the agent's certificate at ``url`` and return its fingerprint; nothing is sent (no secret).

    Raises ``SetupRefused`` for an address the console may not use (``vms.agent_address``) or an agent
    that does not answer TLS there.
    """
    url = normalize_url(url)
    try:
        check_agent_address(url, "")
    except ValueError as error:
        raise SetupRefused(f"{url}: {error}") from None
    parts = urlsplit(url)
    if parts.scheme == "http":
        return FirstContact(
            url,
            None,
            "Plain http: the agent has no certificate to check, and its secret crosses the network in clear. "
            "Allowed here for a trusted, isolated network only.",
        )
    host, port = parts.hostname or "", parts.port or 443
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE  # first contact: read the certificate, trust nothing yet
            with context.wrap_socket(raw, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
    except (OSError, ValueError) as error:
        raise SetupRefused(f"No TLS answer from {url}: {error or type(error).__name__}.") from None
    if not der:
        raise SetupRefused(f"The agent at {url} presented no certificate.")
    return FirstContact(url, certificate_fingerprint(der))


@dataclass(frozen=True)
class AgentReport:
    """What the agent said over the pinned connection: name, version, driver, memory (MiB; None: it
    does not say), CPUs, and its guests."""

    name: str
    version: str
    driver: str
    memory_mib: int | None
    cpus: int | None
    guests: list[GuestInfo] = field(default_factory=list)

    @property
    def guest_memory_mib(self) -> int:
        return sum(guest.memory_mib for guest in self.guests)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "driver": self.driver,
            "memory_mib": self.memory_mib,
            "cpus": self.cpus,
            "guests": [
                {"name": g.name, "memory_mib": g.memory_mib, "hardware_status": g.hardware_status}
                for g in self.guests
            ],
        }


def pin_of(fingerprint: str | None) -> str:
    """The confirmed fingerprint, normalized; "" for plain http (None); ``SetupRefused`` if unreadable."""
    if fingerprint is None or not fingerprint.strip():
        return ""
    pin = normalize_fingerprint(fingerprint)
    if pin is None:
        raise SetupRefused("The confirmed fingerprint is not a SHA-256 fingerprint (64 hex digits).")
    return pin


def check_agent(url: str, secret: str, pin: str, timeout_s: float = CONTACT_TIMEOUT_S) -> AgentReport:
    """Ask the agent at ``url`` for its health and guests, sending ``secret`` only to the certificate
    ``pin`` names (for https a pin is required). Raises ``SetupRefused`` in plain words."""
    url = normalize_url(url)
    if not secret:
        raise SetupRefused("Enter the agent's secret (the one it was started with).")
    if urlsplit(url).scheme == "https" and not pin:
        raise SetupRefused("Confirm the agent's certificate fingerprint first (Test connection).")
    try:
        with AgentClient(url, secret, trust=pin, timeout_s=timeout_s) as agent:
            health = agent.health()
            guests = agent.list_guests()
    except AgentUntrusted as error:
        raise SetupRefused(f"{error}. Nothing was sent to it.") from None
    except AgentError as error:
        raise SetupRefused(f"The agent at {url} refused or did not answer: {error}") from None
    return AgentReport(
        name=health.name,
        version=health.version,
        driver=health.driver,
        memory_mib=health.memory_mib,
        cpus=health.cpus,
        guests=sorted(guests, key=lambda guest: guest.name),
    )


# -- VSPs ------------------------------------------------------------------------------------------------


def audit_fields(vsp: VSP, names: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``vsp``'s values of ``names`` as JSON for an audit event (the secret never)."""
    values: dict[str, Any] = {}
    for name in names:
        if name == "agent_secret":
            continue
        value = getattr(vsp, name)
        values[name] = value if value is None or isinstance(value, bool | int | str) else str(value)
    return values


def check_text(**values: Any) -> None:
    """Refuse a text value with a NUL character (no database stores it the same; PostgreSQL refuses it)."""
    for name, value in values.items():
        if isinstance(value, str) and "\x00" in value:
            raise SetupRefused(f"{name.replace('_', ' ').capitalize()}: a NUL character is not allowed.")


def _validated(vsp: VSP) -> None:
    check_text(name=vsp.name, agent_url=vsp.agent_url)
    try:
        vsp.full_clean()
    except ValidationError as error:
        words = " ".join(
            f"{field.replace('_', ' ').capitalize()}: {' '.join(messages)}"
            if field != "__all__"
            else " ".join(messages)
            for field, messages in error.message_dict.items()
        )
        raise SetupRefused(words) from None


def do_add_vsp(
    user: Any,
    *,
    name: str,
    group: HostGroup | None,
    url: str,
    secret: str,
    pin: str,
    memory_mib: int,
    cpus: int,
    migration_enabled: bool = True,
    licensed: bool = True,
    driver: str = "",
) -> VSP:
    """Store a new VSP whose agent answered ``check_agent`` (its ``driver``), pinned to ``pin``.

    Raises ``AccessDenied`` without the right (``check_can_place``), ``SetupRefused`` for bad values
    (a name taken, an address the console may not use...). Audited (``created``), the secret never.
    """
    check_can_place(user, group, ADD_VSP_PERMISSION, "add")
    url = normalize_url(url)
    vsp = VSP(
        name=name.strip(),
        group=group,
        agent_url=url,
        agent_secret=secret,
        agent_certificate=pin,
        memory_mib=memory_mib,
        cpus=cpus,
        migration_enabled=migration_enabled,
        licensed=licensed,
        agent_driver=driver[:64],
        agent_checked_at=timezone.now() if driver else None,
    )
    _validated(vsp)
    with transaction.atomic():
        vsp.save()
        AuditEvent.record(
            AuditEvent.Action.CREATED,
            vsp,
            actor=user,
            after=audit_fields(vsp, (*VSP_FIELDS, "agent_url", "agent_certificate")),
            message=f"VSP {vsp.name} added by {user} (agent {url}, driver {vsp.agent_driver or 'unknown'}"
            f"{', certificate pinned' if pin else ', plain http'})",
        )
    logger.info("%s added VSP %s at %s", user, vsp.name, url)
    return vsp


def do_change_vsp(user: Any, vsp: VSP, changes: dict[str, Any]) -> list[str]:
    """Change ``vsp``'s ``changes`` (names of ``VSP_FIELDS``); returns the names that changed.

    Moving it to another group needs the administrator role there too. Raises ``AccessDenied``,
    ``SetupRefused`` (bad value; nothing changed). One ``changed`` audit event with before and after.
    """
    check_can_manage_vsp(user, vsp)
    unknown = set(changes) - set(VSP_FIELDS)
    if unknown:
        raise SetupRefused(f"These cannot be changed here: {', '.join(sorted(unknown))}.")
    if "group" in changes and changes["group"] != vsp.group:
        check_can_place(user, changes["group"], CHANGE_VSP_PERMISSION, "move")
    with transaction.atomic():
        stored = VSP.objects.select_for_update().get(pk=vsp.pk)
        changed = [name for name, value in changes.items() if getattr(stored, name) != value]
        if not changed:
            return []
        before = audit_fields(stored, changed)
        for name in changed:
            setattr(stored, name, changes[name])
        _validated(stored)
        stored.save(update_fields=[("group" if name == "group" else name) for name in changed])
        AuditEvent.record(
            AuditEvent.Action.CHANGED,
            stored,
            actor=user,
            before=before,
            after=audit_fields(stored, changed),
            message=f"VSP {stored.name} changed by {user}: {', '.join(changed)}",
        )
    return changed


def do_change_agent(user: Any, vsp: VSP, *, url: str, secret: str, pin: str, driver: str = "") -> None:
    """Point ``vsp`` at a new agent address, secret and pinned certificate (a reinstalled host, a new
    certificate), after ``check_agent`` answered with them. Needs the superuser or the ``vms.change_vsp``
    + administrator right (``check_can_manage_vsp``). Audited: the address and pin before and after, the
    secret never. ``SetupRefused`` for an address the console may not use."""
    check_can_manage_vsp(user, vsp)
    url = normalize_url(url)
    with transaction.atomic():
        stored = VSP.objects.select_for_update().get(pk=vsp.pk)
        if stored.retired_at is not None:
            raise SetupRefused(f"{stored.name} is retired.")
        before = audit_fields(stored, ("agent_url", "agent_certificate", "agent_driver"))
        stored.agent_url, stored.agent_secret, stored.agent_certificate = url, secret, pin
        stored.agent_driver = driver[:64] or stored.agent_driver
        _validated(stored)
        stored.save(update_fields=["agent_url", "agent_secret", "agent_certificate", "agent_driver"])
        AuditEvent.record(
            AuditEvent.Action.CHANGED,
            stored,
            actor=user,
            before=before,
            after=audit_fields(stored, ("agent_url", "agent_certificate", "agent_driver")),
            message=f"VSP {stored.name}'s agent changed by {user}: {url}"
            f"{', certificate pinned' if pin else ', plain http'}; new secret",
        )


def retire_refusal(vsp: VSP) -> str:
    """Why ``vsp`` cannot be retired now ("" when it can): guests that can run there, busy work."""
    runnable = list(
        Registration.objects.filter(vsp=vsp)
        .exclude(hardware_status=Registration.HardwareStatus.NOT_RUNNABLE)
        .order_by("vm__name")
        .values_list("vm__name", flat=True)
    )
    reasons = []
    if runnable:
        shown = ", ".join(runnable[:5]) + (f" and {len(runnable) - 5} more" if len(runnable) > 5 else "")
        reasons.append(
            f"{len(runnable)} guest{'s' if len(runnable) != 1 else ''} can run there ({shown}): migrate "
            "them away (Evacuate…) or mark them Not Runnable first"
        )
    only_here = sorted(
        Registration.objects.filter(vsp=vsp)
        .exclude(vm__registrations__vsp__in=VSP.objects.exclude(pk=vsp.pk))
        .values_list("vm__name", flat=True)
    )
    if only_here:
        has = "has its only configuration" if len(only_here) == 1 else "have their only configurations"
        reasons.append(
            f"{', '.join(only_here[:5])} {has} here: make it runnable elsewhere or delete the guest first"
        )
    reasons.extend(vsp_busy_reasons(vsp.pk))
    return "; ".join(reasons)


def do_retire_vsp(user: Any, vsp: VSP) -> None:
    """Retire ``vsp`` (see the module's docstring). Raises ``AccessDenied``; ``SetupRefused`` with every
    reason while guests can run there or a migration or evacuation involves it."""
    check_can_manage_vsp(user, vsp, RETIRE_VSP_PERMISSION)
    with transaction.atomic():
        stored = VSP.objects.select_for_update().get(pk=vsp.pk)
        if stored.retired_at is not None:
            raise SetupRefused(f"{stored.name} is already retired.")
        refusal = retire_refusal(stored)
        if refusal:
            raise SetupRefused(f"{stored.name} cannot be retired: {refusal}. Nothing was changed.")
        leftovers = list(Registration.objects.filter(vsp=stored).values_list("vm__name", flat=True))
        Registration.objects.filter(vsp=stored).delete()  # only Not Runnable copies are left
        stored.retired_at = timezone.now()
        stored.migration_enabled = False
        stored.agent_secret = ""  # nothing goes to that address again
        stored.save(update_fields=["retired_at", "migration_enabled", "agent_secret"])
        AuditEvent.record(
            AuditEvent.Action.CHANGED,
            stored,
            actor=user,
            before={"retired": False, "migration_enabled": vsp.migration_enabled},
            after={"retired": True, "migration_enabled": False, "leftover_copies_removed": leftovers},
            message=f"VSP {stored.name} retired by {user}; its agent secret was erased",
        )
    vsp.refresh_from_db()


# -- host groups and roles -------------------------------------------------------------------------------


def do_create_group(user: Any, name: str, description: str = "") -> HostGroup:
    """A new host group (superusers only). Raises ``SetupRefused`` for an empty or taken name."""
    check_superuser(user, "create host groups")
    check_text(name=name, description=description)
    group = HostGroup(name=name.strip(), description=description.strip())
    try:
        group.full_clean()
    except ValidationError as error:
        raise SetupRefused(" ".join(m for ms in error.message_dict.values() for m in ms)) from None
    with transaction.atomic():
        group.save()
        AuditEvent.record(
            AuditEvent.Action.CREATED,
            group,
            actor=user,
            after={"name": group.name, "description": group.description},
            message=f"Host group {group.name} created by {user}",
        )
    return group


def do_describe_group(user: Any, group: HostGroup, description: str) -> None:
    """Change ``group``'s description (its administrators or superusers)."""
    check_can_manage_group(user, group)
    check_text(description=description)
    description = description.strip()
    if len(description) > 200:
        raise SetupRefused("The description is at most 200 characters.")
    if description == group.description:
        return
    with transaction.atomic():
        before = group.description
        HostGroup.objects.filter(pk=group.pk).update(description=description)
        group.description = description
        AuditEvent.record(
            AuditEvent.Action.CHANGED,
            group,
            actor=user,
            before={"description": before},
            after={"description": description},
            message=f"Host group {group.name} described by {user}",
        )


def do_delete_group(user: Any, group: HostGroup) -> None:
    """Delete an empty host group (superusers only); refused while it holds VSPs."""
    check_superuser(user, "delete host groups")
    with transaction.atomic():
        names = list(VSP.objects.filter(group=group).values_list("name", flat=True))
        if names:
            raise SetupRefused(
                f"{group.name} still holds {', '.join(names)}: move them to another group first."
            )
        members = [str(m) for m in group.memberships.select_related("user", "group")]
        AuditEvent.record(
            AuditEvent.Action.DELETED,
            group,
            actor=user,
            before={"name": group.name, "description": group.description, "members": members},
            after={},
            message=f"Host group {group.name} deleted by {user}",
        )
        group.delete()


def do_set_role(user: Any, group: HostGroup, member: Any, role: str) -> HostGroupMembership:
    """Give ``member`` ``role`` (a ``Role`` value) in ``group``, replacing any role they had there."""
    check_can_manage_group(user, group)
    if role not in Role.values:
        raise SetupRefused(f"{str(role)[:40]!r} is not a role: choose viewer, operator or administrator.")
    if not getattr(member, "is_active", False):
        raise SetupRefused(f"{member} is not an active account.")
    with transaction.atomic():
        membership = HostGroupMembership.objects.select_for_update().filter(group=group, user=member).first()
        before = {"role": membership.role} if membership else {}
        if membership is not None and membership.role == role:
            return membership
        membership, _ = HostGroupMembership.objects.update_or_create(
            group=group, user=member, defaults={"role": role}
        )
        AuditEvent.record(
            AuditEvent.Action.CHANGED if before else AuditEvent.Action.CREATED,
            membership,
            actor=user,
            before=before,
            after={"group": group.name, "user": member.get_username(), "role": role},
            message=f"{member} is now {role} of {group.name} (by {user})",
        )
    return membership


def role_note(group: HostGroup, member: Any, role: str) -> str:
    """What ``member``'s new ``role`` in ``group`` does *not* give them, in words ("" when nothing is
    missing): the administrator role carries every right of the group's guests (``vms.access.
    ROLE_PERMISSIONS``), but setting up its VSPs and roles here also needs the setup permissions, which
    a role never carries (``docs/permissions.md``). ``member`` should be a fresh user object (its
    permissions are cached on it)."""
    if role != Role.ADMINISTRATOR or getattr(member, "is_superuser", False):
        return ""
    missing = [p for p in SETUP_PERMISSIONS if not member.has_perm(p)]
    if not missing:
        return ""
    names = {
        ADD_VSP_PERMISSION: "add VSPs",
        CHANGE_VSP_PERMISSION: "change VSPs",
        RETIRE_VSP_PERMISSION: "retire VSPs",
        CHANGE_GROUP_PERMISSION: "give roles",
    }
    codenames = ", ".join(p.split(".", 1)[1] for p in missing)
    return (
        f"{member.get_username()} may change the settings and runnable marks of {group.name}'s guests and "
        f"define guests there, but may not {', '.join(names[p] for p in missing)} in {group.name} on these "
        f"pages: that also needs the model permissions {codenames}, which a superuser gives in the "
        "Django admin (Users)."
    )


def do_remove_member(user: Any, group: HostGroup, member: Any) -> None:
    """Take ``member``'s role in ``group`` away. Raises ``SetupRefused`` if they have none."""
    check_can_manage_group(user, group)
    with transaction.atomic():
        membership = HostGroupMembership.objects.select_for_update().filter(group=group, user=member).first()
        if membership is None:
            raise SetupRefused(f"{member} has no role in {group.name}.")
        AuditEvent.record(
            AuditEvent.Action.DELETED,
            membership,
            actor=user,
            before={"group": group.name, "user": member.get_username(), "role": membership.role},
            after={},
            message=f"{member} no longer has a role in {group.name} (by {user})",
        )
        membership.delete()
