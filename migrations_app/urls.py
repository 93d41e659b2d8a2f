from django.urls import path

from . import views

app_name = "migrations_app"
urlpatterns = [
    path("vms/<int:vm_id>/migrate/", views.migrate, name="migrate"),
    path("vms/<int:vm_id>/forecast/", views.forecast_cells, name="forecast"),
    path("<int:migration_id>/cancel/", views.cancel, name="cancel"),
    path("<int:migration_id>/change/", views.change, name="change"),
    path("vsps/<int:vsp_id>/migrate-selected/", views.migrate_selected, name="migrate_selected"),
]
