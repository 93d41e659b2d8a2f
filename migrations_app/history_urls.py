from django.urls import path

from . import history_views

app_name = "migration_history"
urlpatterns = [
    path("", history_views.history, name="list"),
    path("export.csv", history_views.history_csv, name="csv"),
    path("<int:migration_id>/report/", history_views.report, name="report"),
    path("<int:migration_id>/report/data/", history_views.report_data, name="report_data"),
    path("<int:migration_id>/forget-release/", history_views.forget_release, name="forget_release"),
]
