from django.urls import re_path

from .consumers import UnknownRouteConsumer, VMProgressConsumer, VSPProgressConsumer

websocket_urlpatterns = [
    # At most 18 digits: any such id fits a 64-bit database key (a longer one would overflow SQLite).
    re_path(r"^ws/vms/(?P<vm_id>[0-9]{1,18})/$", VMProgressConsumer.as_asgi()),
    re_path(r"^ws/vsps/(?P<vsp_id>[0-9]{1,18})/$", VSPProgressConsumer.as_asgi()),
    # Last: any other path closes cleanly (code 4404) instead of a routing error and a 500 in the log.
    re_path(r"", UnknownRouteConsumer.as_asgi()),
]
