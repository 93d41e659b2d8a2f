# The guest's identity on the host agents: a UUID per VM, filled for existing rows, then made unique.

import uuid

from django.db import migrations, models


def fill_guest_ids(apps, schema_editor):
    VirtualMachine = apps.get_model("vms", "VirtualMachine")
    for vm in VirtualMachine.objects.only("pk"):
        VirtualMachine.objects.filter(pk=vm.pk).update(guest_id=uuid.uuid4())


class Migration(migrations.Migration):
    dependencies = [("vms", "0002_registration_state_collected_at")]

    operations = [
        migrations.AddField(
            model_name="virtualmachine",
            name="guest_id",
            field=models.UUIDField(null=True, editable=False),
        ),
        migrations.RunPython(fill_guest_ids, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="virtualmachine",
            name="guest_id",
            field=models.UUIDField(default=uuid.uuid4, unique=True, editable=False),
        ),
    ]
