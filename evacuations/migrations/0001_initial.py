"""Evacuations as an app of their own, over the tables ``migrations_app`` made (0004_evacuation) and still
holding every evacuation: the models are taken over in Django's state only (``db_table`` keeps the
names), and the content types move with them, so permissions granted on them stay granted."""

import django.db.models.deletion
import django.utils.timezone
from django.conf import settings
from django.db import migrations, models

MODELS = ("evacuation", "evacuationstep")


def move_content_types(apps, schema_editor, old="migrations_app", new="evacuations"):
    """The content types (and with them permissions and admin log entries) follow the models."""
    content_type = apps.get_model("contenttypes", "ContentType")
    for model in MODELS:
        if not content_type.objects.filter(app_label=new, model=model).exists():
            content_type.objects.filter(app_label=old, model=model).update(app_label=new)


def move_content_types_back(apps, schema_editor):
    move_content_types(apps, schema_editor, old="evacuations", new="migrations_app")


class Migration(migrations.Migration):

    initial = True

    dependencies = [
        ('contenttypes', '0002_remove_content_type_name'),
        ('migrations_app', '0012_evacuations_moved_to_their_app'),
        ('vms', '0016_vsp_agent_driver'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name='Evacuation',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('requested_by_name', models.CharField(blank=True, max_length=150)),
                        ('started_at', models.DateTimeField(default=django.utils.timezone.now)),
                        ('ended_at', models.DateTimeField(blank=True, null=True)),
                        ('state', models.CharField(choices=[('running', 'Running'), ('finished', 'Finished'), ('cancelled', 'Cancelled')], default='running', max_length=16)),
                        ('cancel_requested', models.BooleanField(default=False)),
                        ('staying', models.JSONField(blank=True, default=list)),
                        ('cancel_requested_by', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to=settings.AUTH_USER_MODEL)),
                        ('requested_by', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to=settings.AUTH_USER_MODEL)),
                        ('vsp', models.ForeignKey(on_delete=django.db.models.deletion.PROTECT, related_name='evacuations', to='vms.vsp')),
                    ],
                    options={
                        'db_table': 'migrations_app_evacuation',
                        'ordering': ['-started_at', '-pk'],
                        'constraints': [models.UniqueConstraint(condition=models.Q(('state', 'running')), fields=('vsp',), name='one_running_evacuation_per_vsp')],
                    },
                ),
                migrations.CreateModel(
                    name='EvacuationStep',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('position', models.PositiveSmallIntegerField()),
                        ('vm_name', models.CharField(max_length=64)),
                        ('predicted_s', models.FloatField(blank=True, help_text='Forecast total time (s); empty: not known.', null=True)),
                        ('evacuation', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='steps', to='evacuations.evacuation')),
                        ('migration', models.OneToOneField(null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='evacuation_step', to='migrations_app.migration')),
                        ('target', models.ForeignKey(on_delete=django.db.models.deletion.PROTECT, related_name='+', to='vms.vsp')),
                        ('vm', models.ForeignKey(null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to='vms.virtualmachine')),
                    ],
                    options={
                        'db_table': 'migrations_app_evacuationstep',
                        'ordering': ['evacuation', 'position'],
                        'constraints': [models.UniqueConstraint(fields=('evacuation', 'position'), name='one_step_per_position')],
                    },
                ),
            ],
            database_operations=[],
        ),
        migrations.RunPython(move_content_types, move_content_types_back),
    ]
