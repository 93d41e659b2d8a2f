from django.apps import AppConfig


class MigrationsAppConfig(AppConfig):
    name = "migrations_app"
    verbose_name = "Online migrations"

    def ready(self) -> None:
        from django.db.models.signals import post_save

        from vms.models import VSP

        from . import inventory_hooks
        from .scheduling import on_vsp_saved

        post_save.connect(on_vsp_saved, sender=VSP, dispatch_uid="migrations_app.scheduling.on_vsp_saved")
        inventory_hooks.register()  # what the inventory's pages and rules show and count of migrations
