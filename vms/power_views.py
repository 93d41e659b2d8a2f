"""The power buttons: Start, Stop and Force stop on the General tab and the VSP's Virtual Machines tab."""

from __future__ import annotations

from django.contrib import messages
from django.http import Http404, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.urls import reverse
from django.views.decorators.http import require_POST

from vms.access import check_can_power, visible_registrations
from vms.http import HtmxHttpRequest
from vms.models import Registration
from vms.power import PowerAction, PowerRefused, do_power


@require_POST
def vm_power(request: HtmxHttpRequest, pk: int, action: str) -> HttpResponse:
    """POST: do ``action`` on copy ``pk``; back to the General tab (or the VSP page when ``back=vsp``)."""
    try:
        power_action = PowerAction(action)
    except ValueError:
        raise Http404("No such power action.") from None
    registration = get_object_or_404(
        visible_registrations(request.user, Registration.objects.select_related("vm", "vsp")), pk=pk
    )  # another group's copy: not found, like a missing one
    check_can_power(request.user, registration)
    try:
        done = do_power(registration, power_action, request.user)
    except PowerRefused as refusal:
        messages.error(request, " ".join(refusal.messages))
    else:  # a graceful stop that ran out of time is a warning: the guest was cut off
        (messages.warning if done.forced else messages.success)(request, done.notice)
    if request.POST.get("back") == "vsp":
        return redirect("vms:vsp_detail", pk=registration.vsp_id)
    return redirect(f"{reverse('vms:vm_general', args=[registration.vm_id])}?vsp={registration.vsp_id}")
