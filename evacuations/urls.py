from django.urls import path

from . import views

app_name = "evacuations"
urlpatterns = [
    path("vsps/<int:vsp_id>/evacuate/", views.evacuate, name="evacuate"),
    path("vsps/<int:vsp_id>/return/", views.return_guests, name="return_guests"),
    path("vsps/<int:vsp_id>/leave-maintenance/", views.leave_maintenance, name="leave_maintenance"),
    path("evacuations/<int:evacuation_id>/", views.evacuation_progress, name="evacuation_progress"),
    path("evacuations/<int:evacuation_id>/cancel/", views.cancel_evacuation, name="cancel_evacuation"),
]
