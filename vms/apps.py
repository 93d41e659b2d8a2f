from django.apps import AppConfig


class VmsConfig(AppConfig):
    name = "vms"
    verbose_name = "VSPs, VMs and vPars"
