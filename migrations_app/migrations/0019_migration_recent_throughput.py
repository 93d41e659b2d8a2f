from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("migrations_app", "0018_local_disk_mirror"),
    ]

    operations = [
        migrations.AddField(
            model_name="migration",
            name="recent_throughput_bytes_s",
            field=models.BigIntegerField(default=0),
        ),
    ]
