from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("vms", "0017_migration_policy_help_text")]

    operations = [
        migrations.AddField(
            model_name="vsp",
            name="retired_at",
            field=models.DateTimeField(
                blank=True, help_text="When the VSP was retired (empty: in service).", null=True
            ),
        ),
    ]
