"""What each class of watcher is drawn of a pushed migration: its controls and the VSPs it may name.

A web process renders a push once per class (``controls.ViewClass``) from the facts the worker sent;
these check the classes a user's rights give and what the rendered fragments then hold.
"""

from __future__ import annotations

import pytest

from migrations_app.controls import ViewClass, WatcherRights
from migrations_app.models import Migration
from migrations_app.progress import build_progress_messages, render_message, vm_group
from tests.factories import make_host_group, make_migration, make_vm, make_vsp

VSPS = {"source_id": 1, "target_id": 2, "current_id": 1}


def test_a_viewer_keeps_the_progress_and_loses_every_control():
    viewer = WatcherRights(may_add=False, may_change=False, operator_vsp_ids=frozenset({1, 2}))
    assert viewer.allowed(VSPS) == frozenset()
    assert viewer.view_class(VSPS).controls == frozenset()


def test_an_operator_of_the_source_only_may_cancel_and_migrate_but_not_steer():
    rights = WatcherRights(may_add=True, may_change=True, operator_vsp_ids=frozenset({1}))
    assert rights.allowed(VSPS) == {"cancel", "migrate"}
    assert rights.view_class(VSPS).controls == {"cancel", "migrate"}


def test_a_superuser_keeps_everything():
    everyone = WatcherRights(may_add=True, may_change=True, operator_vsp_ids=None, viewer_vsp_ids=None)
    assert everyone.allowed(VSPS) == {"steer", "cancel", "migrate"}
    assert everyone.view_class(VSPS) == ViewClass(
        seen_vsp_ids=None, controls=frozenset(everyone.allowed(VSPS))
    )


def test_a_watcher_who_sees_neither_end_has_no_control_of_the_migration():
    lab = WatcherRights(
        may_add=True, may_change=True, operator_vsp_ids=frozenset({9}), viewer_vsp_ids=frozenset({9})
    )
    view = lab.view_class({"source_id": 1, "target_id": 2, "current_id": 1})
    assert view.seen_vsp_ids == frozenset() and view.controls == frozenset()


@pytest.mark.django_db
def test_each_class_is_drawn_only_its_controls_and_the_vsps_it_sees():
    prod, lab = make_host_group("Prod"), make_host_group("Lab")
    p1, p2, l1 = make_vsp("vsp-p1", group=prod), make_vsp("vsp-p2", group=prod), make_vsp("vsp-l1", group=lab)
    vm = make_vm("web01", p1)
    migration = make_migration(vm, p1, p2, state=Migration.State.COPY, init_percent=100, copy_percent=42)
    message = build_progress_messages(migration.pk)[vm_group(vm.pk)]
    assert "html" not in message and message["facts"]["version"] == 1  # facts, never HTML

    viewer = WatcherRights(
        may_add=False,
        may_change=False,
        operator_vsp_ids=frozenset(),
        viewer_vsp_ids=frozenset({p1.pk, p2.pk}),
    )
    html = render_message(
        message,
        viewer.view_class(message["facts"] and {"source_id": p1.pk, "target_id": p2.pk, "current_id": p1.pk}),
    )
    assert "42%" in html and "vsp-p2" in html
    assert "Switch over now" not in html and "Cancel migration" not in html and "Migrate…" not in html

    operator = WatcherRights(
        may_add=True,
        may_change=True,
        operator_vsp_ids=frozenset({p1.pk, p2.pk}),
        viewer_vsp_ids=frozenset({p1.pk, p2.pk}),
    )
    html = render_message(
        message, operator.view_class({"source_id": p1.pk, "target_id": p2.pk, "current_id": p1.pk})
    )
    assert "Switch over now" in html and "Cancel migration" in html
    assert "<!--control:" not in html  # nothing left for anyone to cut out

    lab_only = WatcherRights(
        may_add=True, may_change=True, operator_vsp_ids=frozenset({l1.pk}), viewer_vsp_ids=frozenset({l1.pk})
    )
    html = render_message(
        message, lab_only.view_class({"source_id": p1.pk, "target_id": p2.pk, "current_id": p1.pk})
    )
    assert (
        "42%" not in html
        and "vsp-p1" not in html
        and "vsp-p2" not in html
        and "Online Migration Phases" not in html
    )
    assert f"<!--push:{migration.pk}:" not in html  # not even which migration it was
