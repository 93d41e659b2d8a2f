from django.apps import AppConfig


class ApiConfig(AppConfig):
    """The REST API, the events stream and ``/metrics``.

    Its outcome counts follow migration outcome events (``api.tallies.follow_outcome``, registered with
    ``migrations_app.outcomes``); the migration core imports nothing of this app.
    """

    default_auto_field = "django.db.models.BigAutoField"
    name = "api"
    verbose_name = "API and metrics"

    def ready(self) -> None:
        from migrations_app.outcomes import register_follower

        from .tallies import follow_outcome

        register_follower("metrics", follow_outcome)
