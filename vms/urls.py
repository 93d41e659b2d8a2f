from django.urls import path

from vms import audit_views, power_views, setup_views, views

app_name = "vms"
urlpatterns = [
    path("", views.vm_list, name="vm_list"),
    path("vsps/", views.vsp_list, name="vsp_list"),
    path("audit/", audit_views.audit_list, name="audit_list"),
    path("vsps/<int:pk>/", views.vsp_detail, name="vsp_detail"),
    path("vms/<int:pk>/general/", views.vm_general, name="vm_general"),
    path("vms/<int:pk>/general/refresh/", views.vm_refresh, name="vm_refresh"),
    path("vms/<int:pk>/storage/", views.vm_storage, name="vm_storage"),
    path("vms/<int:pk>/network/", views.vm_network, name="vm_network"),
    path("vms/define/", views.vm_define, name="vm_define"),
    path("vms/<int:pk>/online-migration/", views.vm_set_online_migration, name="vm_set_online_migration"),
    path("registrations/<int:pk>/power/<str:action>/", power_views.vm_power, name="vm_power"),
    path(
        "registrations/<int:pk>/not-runnable/",
        views.registration_mark_not_runnable,
        name="registration_mark_not_runnable",
    ),
    path(
        "registrations/<int:pk>/runnable/",
        views.registration_mark_runnable,
        name="registration_mark_runnable",
    ),
]

urlpatterns += [
    path("setup/", setup_views.setup_home, name="setup"),
    path("setup/vsps/add/", setup_views.add_vsp, name="setup_add_vsp"),
    path("setup/vsps/<int:pk>/", setup_views.edit_vsp, name="setup_vsp"),
    path("setup/vsps/<int:pk>/agent/", setup_views.change_agent, name="setup_vsp_agent"),
    path("setup/vsps/<int:pk>/retire/", setup_views.retire_vsp, name="setup_retire_vsp"),
    path("setup/groups/", setup_views.create_group, name="setup_create_group"),
    path("setup/groups/<int:pk>/", setup_views.edit_group, name="setup_group"),
]
