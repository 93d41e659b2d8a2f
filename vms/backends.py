"""An authentication backend that only answers permissions: those the user's host-group roles carry.

Listed in ``AUTHENTICATION_BACKENDS`` after ``ModelBackend`` (it authenticates nobody). Without it a
role given on the Hosts and rights pages did nothing until someone also put the account into a Django
group with the matching model permissions; with it a role is enough, as a role is in vSphere or Proxmox.
Where the rights apply is still decided by the role's groups (``vms.access``): a permission carried by
a viewer role in Lab lets its holder see Lab's VSPs, never Production's.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.backends import BaseBackend

from vms.access import permissions_of_roles
from vms.models import HostGroupMembership

_CACHE = "_host_group_role_permissions"


class HostGroupRoleBackend(BaseBackend):
    """``user.has_perm(p)`` is true when one of the user's roles carries ``p`` (``vms.access.
    ROLE_PERMISSIONS``). One query per user object, kept on it as ``ModelBackend`` keeps its own (a role
    changed meanwhile counts from the next request)."""

    def get_all_permissions(self, user_obj: Any, obj: Any = None) -> set[str]:
        if obj is not None or not getattr(user_obj, "is_active", False) or user_obj.is_anonymous:
            return set()
        if not hasattr(user_obj, _CACHE):
            roles = HostGroupMembership.objects.filter(user_id=user_obj.pk).values_list("role", flat=True)
            setattr(user_obj, _CACHE, set(permissions_of_roles(roles)))
        return set(getattr(user_obj, _CACHE))

    def has_perm(self, user_obj: Any, perm: str, obj: Any = None) -> bool:
        return perm in self.get_all_permissions(user_obj, obj)
