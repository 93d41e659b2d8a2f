from django.urls import path

from .consumers import VMProgressConsumer, VSPProgressConsumer

websocket_urlpatterns = [
    path("ws/vms/<int:vm_id>/", VMProgressConsumer.as_asgi()),
    path("ws/vsps/<int:vsp_id>/", VSPProgressConsumer.as_asgi()),
]
