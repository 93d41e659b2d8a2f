"""The inventory's Celery tasks live with the inventory (``vms.tasks``); the names they were queued under
before they moved still run them, so a deployment's queued tasks and beat schedule of that time work on."""

from __future__ import annotations

import pytest
from django.conf import settings

from matrixoe.celery import app
from tests.factories import make_vsp
from vms.models import VSP

pytestmark = pytest.mark.django_db


def test_beat_collects_the_inventory_with_the_inventory_s_own_task():
    app.loader.import_default_modules()  # what a worker registers: every installed app's tasks module

    assert settings.CELERY_BEAT_SCHEDULE["collect-inventory"]["task"] == "vms.tasks.collect_inventory"
    assert app.tasks["vms.tasks.collect_inventory"].__module__ == "vms.tasks"
    assert "vms.tasks.collect_vsp_inventory" in app.tasks


def test_a_task_queued_under_its_old_name_still_collects_one_vsp():
    app.loader.import_default_modules()
    silent = make_vsp("silent", agent_url="http://127.0.0.1:9")  # the discard port: nothing answers

    answered = app.tasks["migrations_app.tasks.collect_vsp_inventory"](silent.pk)

    assert answered is False
    assert VSP.objects.get(pk=silent.pk).agent_failures == 1  # counted as the new task counts it
