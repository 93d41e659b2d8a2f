from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("evacuations", "0001_initial")]

    operations = [
        migrations.AddField(
            model_name="evacuation",
            name="kind",
            field=models.CharField(
                choices=[("evacuation", "Evacuation"), ("return", "Return of guests")],
                default="evacuation",
                max_length=16,
            ),
        ),
    ]
