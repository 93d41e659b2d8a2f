"""Setting up hosts and rights in the API: the same functions as the console's **Hosts and rights**
pages (``vms.host_setup``), with the same rights and words.

Adding a VSP is two calls, trust on first use: ``POST /setup/agent-fingerprint`` reads the agent's
certificate (nothing is sent to the agent), then ``POST /vsps`` with that fingerprint as
``confirmed_fingerprint`` sends the secret only to that certificate, reads what the agent reports and
stores the VSP pinned to it.
"""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.http import Http404, HttpRequest
from ninja import Field, Path, Router, Schema
from ninja.responses import Status
from pydantic import ConfigDict

from vms import host_setup
from vms.access import AccessDenied
from vms.models import VSP, HostGroup, HostGroupMembership, Role

from .routes import READ_ERRORS, WRITE_ERRORS, IdRef
from .routes import router as vsp_router
from .schemas import VSPOut, vsp_out

router = Router(tags=["Setup"])
# Operations on /vsps and /vsps/{vsp} join the router that already serves GET there (django-ninja serves
# one path from one router only).
SETUP = ["Setup"]


class FingerprintIn(Schema):
    model_config = ConfigDict(extra="forbid")
    agent_url: str = Field(max_length=200, description="e.g. https://10.0.0.11:7101 (https assumed)")


class FingerprintOut(Schema):
    agent_url: str
    fingerprint: str | None = Field(description="SHA-256 of the agent's certificate; null for plain http")
    warning: str


class GuestReportOut(Schema):
    name: str
    memory_mib: int
    hardware_status: str


class AgentReportOut(Schema):
    name: str
    version: str
    driver: str
    memory_mib: int | None
    cpus: int | None
    guests: list[GuestReportOut]


class VSPAddIn(Schema):
    model_config = ConfigDict(extra="forbid")
    agent_url: str = Field(max_length=200)
    agent_secret: str = Field(min_length=1, max_length=128)
    confirmed_fingerprint: str | None = Field(
        description="The fingerprint from /setup/agent-fingerprint, compared with the agent's own; null "
        "for plain http"
    )
    name: str | None = Field(default=None, max_length=64, description="Default: the agent's name")
    group: str | None = Field(default=None, max_length=64, description="Host group name; null: none")
    memory_mib: int | None = Field(default=None, ge=1, le=2**31 - 1, description="Default: as reported")
    cpus: int | None = Field(default=None, ge=1, le=2**31 - 1, description="Default: as reported")
    migration_enabled: bool = True
    licensed: bool = True


class VSPAddOut(Schema):
    vsp: VSPOut
    report: AgentReportOut


class VSPChangeIn(Schema):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, max_length=64)
    group: str | None = Field(default=None, max_length=64, description="Host group name")
    memory_mib: int | None = Field(default=None, ge=1, le=2**31 - 1)
    cpus: int | None = Field(default=None, ge=1, le=2**31 - 1)
    migration_enabled: bool | None = None
    licensed: bool | None = None
    max_concurrent_migrations: int | None = Field(default=None, ge=1, le=8)


class MemberOut(Schema):
    user: str
    role: str


class GroupOut(Schema):
    id: int
    name: str
    description: str
    vsps: list[str]
    members: list[MemberOut]
    note: str = Field(
        default="",
        description="After giving a role: what it does not give (the administrator role without the setup "
        "permissions may not set up the group's hosts and roles); empty otherwise.",
    )


class GroupIn(Schema):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    description: str = Field(default="", max_length=200)


class RoleIn(Schema):
    model_config = ConfigDict(extra="forbid")
    role: Role


def _refused(error: host_setup.SetupRefused) -> Exception:
    from .problems import Conflict

    return Conflict(str(error.message))


GroupName = Path(..., min_length=1, max_length=64, description="Host group name")
Username = Path(..., min_length=1, max_length=150, description="User name")


def _group_named(name: str | None) -> HostGroup | None:
    if name is None:
        return None
    group = HostGroup.objects.filter(name=name).first() if "\x00" not in name else None
    if group is None:
        raise Http404(f"No host group named {name!r}.")
    return group


def _managed_vsp(request: HttpRequest, ref: str) -> VSP:
    from .lookups import parse_ref

    number, _ = parse_ref(ref)
    vsp = VSP.objects.filter(pk=number).first() if number else None
    if vsp is None and "\x00" not in ref:
        vsp = VSP.objects.filter(name=ref.strip()).first()
    if vsp is None:
        raise Http404(f"No VSP with the id or name {ref.strip()!r}.")
    try:
        host_setup.check_can_manage_vsp(request.user, vsp)
    except AccessDenied:
        raise Http404(f"No VSP with the id or name {ref.strip()!r}.") from None
    return vsp


def _managed_group(request: HttpRequest, name: str) -> HostGroup:
    group = HostGroup.objects.filter(name=name).first() if "\x00" not in name else None
    if group is None or group.pk not in {g.pk for g in host_setup.manageable_groups(request.user)}:
        raise Http404(f"No host group named {name!r}.")
    return group


def group_out(group: HostGroup) -> GroupOut:
    members = (
        HostGroupMembership.objects.filter(group=group).select_related("user").order_by("user__username")
    )
    return GroupOut(
        id=group.pk,
        name=group.name,
        description=group.description,
        vsps=list(
            VSP.objects.filter(group=group, retired_at=None).order_by("name").values_list("name", flat=True)
        ),
        members=[MemberOut(user=m.user.get_username(), role=m.role) for m in members],
    )


@router.post("/setup/agent-fingerprint", response={200: FingerprintOut, **WRITE_ERRORS})
def agent_fingerprint(request: HttpRequest, body: FingerprintIn) -> FingerprintOut:
    """First contact: the agent's certificate fingerprint, read without sending it anything."""
    if not host_setup.groups_for_hosts(request.user):
        raise AccessDenied("You may not add VSPs.")
    try:
        contact = host_setup.first_contact(body.agent_url)
    except host_setup.SetupRefused as error:
        raise _refused(error) from None
    return FingerprintOut(agent_url=contact.url, fingerprint=contact.fingerprint, warning=contact.warning)


@vsp_router.post("/vsps", response={201: VSPAddOut, **WRITE_ERRORS}, tags=SETUP)
def add_vsp(request: HttpRequest, body: VSPAddIn) -> Status[VSPAddOut]:
    """Add a VSP: its agent is asked over the pinned connection first (409 with why if it refuses or
    presents another certificate); memory and CPUs default to what it reports."""
    group = _group_named(body.group)
    host_setup.check_can_place(request.user, group, host_setup.ADD_VSP_PERMISSION, "add")
    try:
        pin = host_setup.pin_of(body.confirmed_fingerprint)
        report = host_setup.check_agent(body.agent_url, body.agent_secret, pin)
        memory = body.memory_mib or report.memory_mib
        cpus = body.cpus or report.cpus
        if memory is None or cpus is None:
            raise host_setup.SetupRefused(
                "The agent does not report its memory or CPUs: give memory_mib and cpus."
            )
        vsp = host_setup.do_add_vsp(
            request.user,
            name=body.name or report.name,
            group=group,
            url=body.agent_url,
            secret=body.agent_secret,
            pin=pin,
            memory_mib=memory,
            cpus=cpus,
            migration_enabled=body.migration_enabled,
            licensed=body.licensed,
            driver=report.driver,
        )
    except host_setup.SetupRefused as error:
        raise _refused(error) from None
    return Status(201, VSPAddOut(vsp=vsp_out(vsp), report=AgentReportOut(**report.as_json())))


@vsp_router.patch("/vsps/{vsp}", response={200: VSPOut, **WRITE_ERRORS}, tags=SETUP)
def change_vsp(request: HttpRequest, body: VSPChangeIn, vsp: str = IdRef) -> VSPOut:
    """Change a VSP's name, group, capacity or switches (only the fields given)."""
    found = _managed_vsp(request, vsp)
    changes = body.model_dump(exclude_unset=True)
    if "group" in changes:
        changes["group"] = _group_named(changes["group"])
    try:
        host_setup.do_change_vsp(request.user, found, changes)
    except host_setup.SetupRefused as error:
        raise _refused(error) from None
    found.refresh_from_db()
    return vsp_out(found)


class AgentChangeIn(Schema):
    model_config = ConfigDict(extra="forbid")
    agent_url: str = Field(max_length=200)
    agent_secret: str = Field(min_length=1, max_length=128)
    confirmed_fingerprint: str | None = Field(
        description="The fingerprint from /setup/agent-fingerprint; null for plain http"
    )


@router.put("/vsps/{vsp}/agent", response={200: VSPAddOut, **WRITE_ERRORS})
def change_agent(request: HttpRequest, body: AgentChangeIn, vsp: str = IdRef) -> VSPAddOut:
    """Point a VSP at a new agent (address, secret, pinned certificate), after asking it over the pinned
    connection (409 with why if it refuses or presents another certificate)."""
    found = _managed_vsp(request, vsp)
    try:
        pin = host_setup.pin_of(body.confirmed_fingerprint)
        report = host_setup.check_agent(body.agent_url, body.agent_secret, pin)
        host_setup.do_change_agent(
            request.user, found, url=body.agent_url, secret=body.agent_secret, pin=pin, driver=report.driver
        )
    except host_setup.SetupRefused as error:
        raise _refused(error) from None
    found.refresh_from_db()
    return VSPAddOut(vsp=vsp_out(found), report=AgentReportOut(**report.as_json()))


@router.post("/vsps/{vsp}/retire", response={200: VSPOut, **WRITE_ERRORS})
def retire_vsp(request: HttpRequest, vsp: str = IdRef) -> VSPOut:
    """Retire a VSP (409 with every reason while guests can run there or migrations involve it)."""
    found = _managed_vsp(request, vsp)
    try:
        host_setup.do_retire_vsp(request.user, found)
    except host_setup.SetupRefused as error:
        raise _refused(error) from None
    return vsp_out(found)


@router.get("/host-groups", response={200: list[GroupOut], **READ_ERRORS})
def list_groups(request: HttpRequest) -> list[GroupOut]:
    """The host groups whose roles you may manage, with their VSPs and members."""
    return [group_out(group) for group in host_setup.manageable_groups(request.user)]


@router.post("/host-groups", response={201: GroupOut, **WRITE_ERRORS})
def create_group(request: HttpRequest, body: GroupIn) -> Status[GroupOut]:
    """Create a host group (superusers)."""
    try:
        group = host_setup.do_create_group(request.user, body.name, body.description)
    except host_setup.SetupRefused as error:
        raise _refused(error) from None
    return Status(201, group_out(group))


@router.delete("/host-groups/{name}", response={204: None, **WRITE_ERRORS})
def delete_group(request: HttpRequest, name: str = GroupName) -> Status[None]:
    """Delete an empty host group (superusers)."""
    group = _managed_group(request, name)
    try:
        host_setup.do_delete_group(request.user, group)
    except host_setup.SetupRefused as error:
        raise _refused(error) from None
    return Status(204, None)


@router.put("/host-groups/{name}/members/{username}", response={200: GroupOut, **WRITE_ERRORS})
def set_role(request: HttpRequest, body: RoleIn, name: str = GroupName, username: str = Username) -> GroupOut:
    """Give ``username`` a role in the group (replacing the one they had)."""
    group = _managed_group(request, name)
    member = get_user_model().objects.filter(username=username).first() if "\x00" not in username else None
    if member is None:
        raise Http404(f"No user {username!r}.")
    try:
        host_setup.do_set_role(request.user, group, member, body.role.value)
    except host_setup.SetupRefused as error:
        raise _refused(error) from None
    fresh = get_user_model().objects.get(pk=member.pk)  # its permissions are cached on the object
    answer = group_out(group)
    answer.note = host_setup.role_note(group, fresh, body.role.value)
    return answer


@router.delete("/host-groups/{name}/members/{username}", response={200: GroupOut, **WRITE_ERRORS})
def remove_member(request: HttpRequest, name: str = GroupName, username: str = Username) -> GroupOut:
    """Take ``username``'s role in the group away."""
    group = _managed_group(request, name)
    member = get_user_model().objects.filter(username=username).first() if "\x00" not in username else None
    if member is None:
        raise Http404(f"No user {username!r}.")
    try:
        host_setup.do_remove_member(request.user, group, member)
    except host_setup.SetupRefused as error:
        raise _refused(error) from None
    return group_out(group)
