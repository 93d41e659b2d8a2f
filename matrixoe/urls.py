from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_not_required
from django.templatetags.static import static
from django.urls import include, path
from django.views.generic import RedirectView

from api.api import api, public_urls
from api.metrics import metrics_view
from api.progress import migration_events

urlpatterns = [
    path("login/", login_not_required(auth_views.LoginView.as_view()), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    # Browsers ask for /favicon.ico whatever the page's <link rel="icon"> says.
    path("favicon.ico", login_not_required(RedirectView.as_view(url=static("favicon.svg"), permanent=True))),
    path("migrations/", include("migrations_app.urls")),
    path("migrations/", include("evacuations.urls")),
    path("migrations/history/", include("migrations_app.history_urls")),
    path("account/tokens/", include("api.urls")),
    path("api/v1/migrations/<int:migration_id>/events", migration_events, name="api_migration_events"),
    path("api/v1/", include((public_urls(api.urls[0]), "api-v1"), namespace="api-v1")),
    # The API's docs by the address people guess (the navigation links here): the current version's.
    path("api/docs", login_not_required(RedirectView.as_view(url="/api/v1/docs")), name="api_docs"),
    path("api/docs/", login_not_required(RedirectView.as_view(url="/api/v1/docs"))),
    path("api/", login_not_required(RedirectView.as_view(url="/api/v1/docs"))),
    path("metrics", metrics_view, name="metrics"),
    path("", include("migrations_app.vm_urls")),
    path("", include("vms.urls")),
]

handler400 = "matrixoe.error_views.bad_request"
handler403 = "matrixoe.error_views.permission_denied"
handler404 = "matrixoe.error_views.page_not_found"
