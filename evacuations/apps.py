from django.apps import AppConfig


class EvacuationsConfig(AppConfig):
    """Evacuations: emptying a VSP through the migrations app's own requests and queue.

    It follows migration outcomes (``migrations_app.outcomes``) and adds its panel to the VSP page
    (``vms.hooks``); neither app imports this one.
    """

    name = "evacuations"
    verbose_name = "Evacuations"

    def ready(self) -> None:
        from migrations_app.outcomes import register_follower
        from vms.hooks import register_slot, register_vsp_busy_check

        from .actions import evacuations_on_vsp, follow_outcome

        register_follower("evacuations", follow_outcome)
        register_vsp_busy_check(evacuations_on_vsp)
        register_slot("vsp_detail.overview", "evacuations/vsp_overview.html")
