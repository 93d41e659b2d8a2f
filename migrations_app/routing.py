from django.urls import path, re_path

from .consumers import UnknownRouteConsumer, VMProgressConsumer, VSPProgressConsumer

websocket_urlpatterns = [
    path("ws/vms/<int:vm_id>/", VMProgressConsumer.as_asgi()),
    path("ws/vsps/<int:vsp_id>/", VSPProgressConsumer.as_asgi()),
    # Last: any other path closes cleanly (code 4404) instead of a routing error and a 500 in the log.
    re_path(r"", UnknownRouteConsumer.as_asgi()),
]
