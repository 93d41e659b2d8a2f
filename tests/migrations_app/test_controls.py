"""The markers a pushed fragment carries around its controls, and what each watcher keeps."""

from __future__ import annotations

from migrations_app.controls import WatcherRights, strip_controls

HTML = (
    '<section id="migration-phases"><p>42%</p>'
    "<!--control:steer--><form id=steer>Switch over now</form><!--/control:steer-->"
    "<!--control:cancel--><form class=migration-cancel>Cancel</form><!--/control:cancel--></section>"
    '<div id="migrate-control"><!--control:migrate--><button>Migrate…</button><!--/control:migrate--></div>'
)
VSPS = {"source_id": 1, "target_id": 2, "current_id": 1}


def test_a_viewer_keeps_the_progress_and_loses_every_control():
    viewer = WatcherRights(may_add=False, may_change=False, operator_vsp_ids=frozenset({1, 2}))
    html = strip_controls(HTML, viewer.allowed(VSPS))
    assert html == '<section id="migration-phases"><p>42%</p></section><div id="migrate-control"></div>'


def test_an_operator_of_the_source_only_may_cancel_and_migrate_but_not_steer():
    rights = WatcherRights(may_add=True, may_change=True, operator_vsp_ids=frozenset({1}))
    assert rights.allowed(VSPS) == {"cancel", "migrate"}
    html = strip_controls(HTML, rights.allowed(VSPS))
    assert "Switch over now" not in html and "Cancel" in html and "Migrate…" in html


def test_a_superuser_keeps_everything_and_a_marker_without_its_end_hides_the_rest():
    everyone = WatcherRights(may_add=True, may_change=True, operator_vsp_ids=None)
    assert strip_controls(HTML, everyone.allowed(VSPS)) == HTML
    assert strip_controls("<p>a</p><!--control:steer--><form>", frozenset()) == "<p>a</p>"
