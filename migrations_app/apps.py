from django.apps import AppConfig


class MigrationsAppConfig(AppConfig):
    name = "migrations_app"
    verbose_name = "Online migrations"

    def ready(self) -> None:
        from vms.general_tab import register_context_provider

        from . import history
        from .progress import general_tab_context

        register_context_provider(general_tab_context)
        register_context_provider(history.general_tab_context)
