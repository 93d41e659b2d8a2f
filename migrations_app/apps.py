from django.apps import AppConfig


class MigrationsAppConfig(AppConfig):
    name = "migrations_app"
    verbose_name = "Online migrations"

    def ready(self) -> None:
        from django.db.models.signals import post_save

        from vms.general_tab import register_context_provider
        from vms.models import VSP

        from . import history
        from .progress import general_tab_context
        from .scheduling import on_vsp_saved

        post_save.connect(on_vsp_saved, sender=VSP, dispatch_uid="migrations_app.scheduling.on_vsp_saved")
        register_context_provider(general_tab_context)
        register_context_provider(history.general_tab_context)
