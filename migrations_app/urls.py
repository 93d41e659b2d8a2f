from django.urls import path

from . import evacuation_views as evacuation
from . import views

app_name = "migrations_app"
urlpatterns = [
    path("vms/<int:vm_id>/migrate/", views.migrate, name="migrate"),
    path("vms/<int:vm_id>/forecast/", views.forecast_cells, name="forecast"),
    path("<int:migration_id>/cancel/", views.cancel, name="cancel"),
    path("<int:migration_id>/change/", views.change, name="change"),
    path("vsps/<int:vsp_id>/migrate-selected/", views.migrate_selected, name="migrate_selected"),
    path("vsps/<int:vsp_id>/evacuate/", evacuation.evacuate, name="evacuate"),
    path("vsps/<int:vsp_id>/leave-maintenance/", evacuation.leave_maintenance, name="leave_maintenance"),
    path("evacuations/<int:evacuation_id>/", evacuation.evacuation_progress, name="evacuation_progress"),
    path(
        "evacuations/<int:evacuation_id>/cancel/",
        evacuation.cancel_evacuation,
        name="cancel_evacuation",
    ),
]
