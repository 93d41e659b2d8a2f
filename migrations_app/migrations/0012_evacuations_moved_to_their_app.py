"""Evacuations became an app of their own (``evacuations``): this app forgets the two models, the
database keeps their tables and rows (``evacuations.0001_initial`` takes them over by name)."""

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ('migrations_app', '0011_migration_outcome'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.DeleteModel(name='EvacuationStep'),
                migrations.DeleteModel(name='Evacuation'),
            ],
            database_operations=[],
        ),
    ]
