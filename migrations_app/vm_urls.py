"""Migration settings of a VM, at the inventory's addresses (``/vms/<id>/...``) they always had."""

from django.urls import path

from . import views

app_name = "vm_migration"
urlpatterns = [
    path("vms/<int:pk>/migration-policy/", views.vm_set_migration_policy, name="set_policy"),
]
