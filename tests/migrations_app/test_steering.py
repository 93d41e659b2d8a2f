"""Changing a running migration from its page: real worker, real Redis, real agents (simulated driver).

The worker caps the data plane at 5 MB/s (conftest); the hot guest writes 12 MB/s into all of its 8 MiB,
so under the default policy (300 ms, no throttling, 30 rounds) it would stop at its round limit.
"""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.test import Client

from migrations_app.actions import do_request_migration
from migrations_app.models import Migration, MigrationEvent
from tests.factories import make_user
from tests.migrations_app.guests import place_vm, runs_on, wait_for_state
from vms.models import AuditEvent

pytestmark = pytest.mark.django_db(transaction=True)

HOT = {"memory_mib": 8, "dirty_pages_per_s": 3000, "fill_percent": 100}
HTMX = {"HX-Request": "true"}


def start_hot(host_agents, fleet, admin, wait_for, policy=None):
    vm = place_vm(host_agents, fleet, **HOT)
    migration = do_request_migration(vm, fleet["hostb"], admin, policy=policy)

    def copying_with_rates() -> bool:
        migration.refresh_from_db()
        return migration.state == "copy" and migration.rounds >= 3 and migration.throughput_bytes_s > 0

    assert wait_for(copying_with_rates, timeout=60), (migration.state, migration.alert)
    return vm, migration


def page(client, vm) -> str:
    return client.get(f"/vms/{vm.pk}/general/").text


def change(client, migration, **fields):
    return client.post(f"/migrations/{migration.pk}/change/", fields, headers=HTMX)


def assert_completed_intact(host_agents, migration, wait_for):
    wait_for_state(wait_for, migration, "completed", "aborted", "cancelled", timeout=120)
    assert migration.state == "completed", migration.alert
    assert migration.source_digest and migration.source_digest == migration.target_digest
    assert runs_on(host_agents["hostb"], migration.vm.name)


def test_raising_the_allowed_downtime_while_it_runs_makes_it_complete(
    host_agents, fleet, admin, migration_admin_client, migration_worker, wait_for
):
    _, migration = start_hot(host_agents, fleet, admin, wait_for)
    response = change(migration_admin_client, migration, action="raise_downtime", downtime_ms="5000")
    assert response.status_code == 200, response.text
    assert "Raised the allowed downtime to 5.0 s." in response.text
    assert_completed_intact(host_agents, migration, wait_for)
    assert migration.policy["max_downtime_ms"] == 5000
    event = MigrationEvent.objects.get(migration=migration, message__contains="raised the allowed downtime")
    assert event.actor.username == "admin"
    audit = AuditEvent.objects.get(action=AuditEvent.Action.MIGRATION_CHANGED)
    assert audit.actor_name == "admin" and audit.after["downtime_ms"] == 5000


def test_turning_throttling_on_while_it_runs_makes_it_complete(
    host_agents, fleet, admin, migration_admin_client, migration_worker, wait_for
):
    _, migration = start_hot(host_agents, fleet, admin, wait_for)
    response = change(migration_admin_client, migration, action="auto_converge")
    assert "Turned throttling (auto-converge) on." in response.text
    assert_completed_intact(host_agents, migration, wait_for)


def test_the_offered_throttle_rescue_completes_it(
    host_agents, fleet, admin, migration_admin_client, migration_worker, wait_for
):
    """The browser run that did not rescue: the throttle offered with the warning must complete it."""
    from migrations_app.steering import outlook

    _, migration = start_hot(host_agents, fleet, admin, wait_for)
    offered: list[str] = []

    def warned_with_a_throttle() -> bool:
        migration.refresh_from_db()
        seen = outlook(migration)
        offered[:] = [rescue.words for rescue in seen.rescues] if seen else []
        return seen is not None and seen.warning != "" and any("throttle" in words for words in offered)

    assert wait_for(warned_with_a_throttle, timeout=60), (migration.state, migration.rounds, offered)
    response = change(migration_admin_client, migration, action="auto_converge")
    assert "Turned throttling (auto-converge) on." in response.text
    assert_completed_intact(host_agents, migration, wait_for)


def test_switch_over_now_completes_with_the_longer_downtime_shown(
    host_agents, fleet, admin, migration_admin_client, migration_worker, wait_for
):
    vm, migration = start_hot(host_agents, fleet, admin, wait_for)
    change(migration_admin_client, migration, action="switchover")
    assert_completed_intact(host_agents, migration, wait_for)
    assert migration.downtime_ms > 300
    assert f"{migration.downtime_ms} ms" in page(migration_admin_client, vm)


def test_bad_changes_are_refused_and_change_nothing(
    host_agents, fleet, admin, migration_admin_client, migration_worker, wait_for
):
    # Switch over at the limit: it ends completed however long the refusals below take on a loaded machine.
    _, migration = start_hot(
        host_agents, fleet, admin, wait_for, policy={"preset": "custom", "at_limit": "switchover"}
    )
    for fields, words in [
        (
            {"action": "raise_downtime", "downtime_ms": "-3"},
            "Maximum downtime: a whole number from 1 to 600000",
        ),
        ({"action": "raise_downtime", "downtime_ms": "a lot"}, "Maximum downtime: a number"),
        (
            {"action": "bandwidth", "bandwidth_cap_mb_s": "1e15"},
            "Bandwidth cap: from 0.001 to 100000 MB/s in steps of 0.001 MB/s",
        ),
        ({"action": "explode"}, "Unknown change"),
    ]:
        response = change(migration_admin_client, migration, **fields)
        assert response.status_code == 400 and words in response.text, response.text
    reader = Client()  # its own session: migration_admin_client is pytest-django's ``client`` too
    reader.force_login(make_user("reader", ("vms.view_virtualmachine", "vms.view_vsp")))
    assert change(reader, migration, action="switchover").status_code == 403
    migration.refresh_from_db()
    assert migration.policy["max_downtime_ms"] == 300 and not migration.policy["auto_converge"]
    assert not AuditEvent.objects.filter(action=AuditEvent.Action.MIGRATION_CHANGED).exists()
    change(migration_admin_client, migration, action="switchover")
    assert_completed_intact(host_agents, migration, wait_for)
    response = change(migration_admin_client, migration, action="raise_downtime", downtime_ms="900")
    assert response.status_code == 400
    assert "only a migration in its Init or Copy phase can be changed. Nothing was changed." in response.text
    assert Migration.objects.get(pk=migration.pk).policy["max_downtime_ms"] == 300


def rescue_buttons(html: str) -> dict[str, tuple[str, str | None]]:
    """The warning's one-click rescues: action -> (button text, the downtime_ms it submits or None)."""
    found = {}
    for form in re.findall(r'<form class="rescue-form".*?</form>', html, re.S):
        action = re.search(r'name="action" value="(\w+)"', form)
        value = re.search(r'name="downtime_ms" value="(\d+)"', form)
        label = re.search(r'data-field="rescue_button">([^<]*)<', form)
        assert action and label, form
        found[action.group(1)] = (label.group(1), value.group(1) if value else None)
    return found


def hot_copy_panel(fleet, driver: str, **fields) -> str:
    """The panel as rendered from the numbers an agent reported (rates stored on the row, no agent here),
    the source's agent driver being ``driver``."""
    from django.utils import timezone

    from migrations_app.progress import get_migration_display, render_vm_fragments
    from tests.factories import make_vm

    source = fleet["hosta"]
    source.agent_driver = driver
    source.save(update_fields=["agent_driver"])
    vm = make_vm("hot", vsp=source, memory_mib=8)
    numbers = {
        "rounds": 4, "bytes_remaining": 8_000_000, "dirty_rate_bytes_s": 10_000_000,
        "throughput_bytes_s": 5_000_000, "bytes_sent": 12_000_000, **fields,
    }  # fmt: skip
    # Copy began 2 s ago: the live panel says a time only once the rate means something (MIN_RATE_S).
    began = timezone.now() - timedelta(seconds=2)
    Migration.objects.create(
        vm=vm, source=source, target=fleet["hostb"], state="copy", copy_started_at=began, **numbers
    )
    return render_vm_fragments(get_migration_display(vm), oob=False)


def test_the_phases_panel_warns_before_the_round_limit_with_the_rescues_and_their_cost(fleet):
    html = hot_copy_panel(fleet, "simulated")
    assert (
        "This migration will stop at the round limit (30 rounds) and the guest will stay on its source"
        in html
    )
    # 8 MB left of 8 MiB after a 0.8 s round (10 MB/s distinct): the guest writes about 32 MB/s.
    assert "Slow because the guest writes faster (32 MB/s) than the link carries (5.0 MB/s)." in html
    # Each rescue is one click carrying the exact value its label shows, its cost beside it.
    buttons = rescue_buttons(html)
    assert buttons["raise_downtime"] == ("Raise the allowed downtime to 1.7 s", "1700")
    assert buttons["auto_converge"] == ("Throttle the guest", None)
    assert buttons["switchover"] == ("Switch over now", None)
    assert re.search(r'data-field="rescue_cost">frozen about 1\.\d s, about [\d.]+ s more<', html), html
    assert 'data-field="rescue_cost">up to 90% of its vCPU time, about ' in html
    # The simulated source sends the round under way (8 MB, 1.6 s) first; the guest dirties all of it again.
    assert ">about 1.7 s frozen, once the round under way is sent (about 1.6 s more)<" in html
    # The manual form shows the values in force, never empty, so a click on its button sends them.
    assert 'name="downtime_ms" min="1" max="600000" step="1" value="300"' in html
    assert 'value="switchover"' in html and 'value="auto_converge"' in html


@pytest.mark.parametrize("cap", [10.0, 8.5, 10, None])
def test_every_id_in_the_panel_is_a_selector_htmx_can_find(fleet, cap):
    """QA: a migration capped at 10 MB/s drew its form as id="migration-steer-1-free-300-10.0": not a
    valid selector, so htmx could not keep it across pushes (a loose copy of the controls piled up below
    the footer each push, and a click posted the plain form). Every id the panel draws is a plain name."""
    html = hot_copy_panel(fleet, "simulated", policy={"preset": "custom", "bandwidth_cap_mb_s": cap})

    ids = re.findall(r'\bid="([^"]*)"', html)

    assert any(name.startswith("migration-steer-") for name in ids), ids
    assert [name for name in ids if not re.fullmatch(r"[A-Za-z][\w-]*", name)] == []


@pytest.mark.parametrize("driver", ["qemu", ""])
def test_the_panel_offers_no_throttle_a_qemu_source_cannot_turn_on(fleet, driver):
    """QEMU cannot enable auto-converge mid-migration (its agent answers 409): neither the rescue list nor
    the buttons offer it; nor while the source's driver is not known yet."""
    html = hot_copy_panel(fleet, driver)

    assert "This migration will stop at the round limit (30 rounds)" in html
    # QEMU pauses at once, with all that is left (8 MB at 5 MB/s).
    assert rescue_buttons(html)["raise_downtime"] == ("Raise the allowed downtime to 1.7 s", "1700")
    assert 'data-field="rescue_cost">about 1.6 s frozen<' in html
    assert "Throttle the guest" not in html
    assert 'value="auto_converge"' not in html
    assert 'value="switchover"' in html and 'value="raise_downtime"' in html


def test_the_outlook_continues_from_the_throttle_in_force(fleet):
    """Auto-converge at 80% at round 21 of 30: the dirty rate the agent measures is the throttled guest's, and
    the next stalled round takes the throttle to 90%, not back to 20% (which would need more rounds than
    are left): the panel expects it to finish, and shows the throttle."""
    policy = {"preset": "custom", "auto_converge": True}
    numbers = {"policy": policy, "rounds": 21, "dirty_rate_bytes_s": 1_500_000}
    throttled = hot_copy_panel(fleet, "simulated", throttle_pct=80, **numbers)

    assert '<dd data-field="throttle"' in throttled and "80%</dd>" in throttled
    assert "This migration will stop" not in throttled
    assert "left; expected downtime" in throttled


def test_the_throttle_auto_converge_applies_is_kept_on_the_migration_as_it_rises(
    host_agents, fleet, admin, migration_admin_client, migration_worker, wait_for
):
    """Under auto-converge the source throttles the hot guest stepwise; the row keeps the throttle in force
    (the live forecast continues from it) and learns the source's driver when the migration starts."""
    vm = place_vm(host_agents, fleet, **HOT)
    policy = {"preset": "custom", "auto_converge": True}
    migration = do_request_migration(vm, fleet["hostb"], admin, policy=policy)
    seen: set[int] = set()

    def throttled() -> bool:
        migration.refresh_from_db()
        seen.add(migration.throttle_pct)
        return migration.throttle_pct >= 20 or migration.state not in ("queued", "init", "copy")

    assert wait_for(throttled, timeout=90), (migration.state, seen)
    assert migration.throttle_pct >= 20, (migration.state, seen, migration.alert)
    fleet["hosta"].refresh_from_db()
    assert fleet["hosta"].agent_driver == "simulated"
    assert_completed_intact(host_agents, migration, wait_for)


def test_a_forced_switchover_at_the_time_limit_charts_what_the_freeze_moved(
    host_agents, fleet, admin, migration_admin_client, migration_worker, wait_for
):
    """QA: after a switch-over at the Copy time limit the chart's last round showed 0 MiB left, the value
    the agent reports once the guest is on the target. It keeps what was left when Copy ended."""
    from migrations_app.reports import chart_data, phase_timings

    vm = place_vm(host_agents, fleet, vm_fields={"copy_limit_s": 8}, **HOT)
    policy = {"preset": "custom", "at_limit": "switchover"}
    migration = do_request_migration(vm, fleet["hostb"], admin, policy=policy)
    assert_completed_intact(host_agents, migration, wait_for)

    assert migration.downtime_ms > 300  # it did not converge: what was left moved while frozen
    series = chart_data(migration)["series"]
    assert series["round"] and series["bytes_remaining"][-1] > 0, series
    frozen = next(timing for timing in phase_timings(migration) if timing.label == "Frozen")
    assert frozen.seconds is not None and frozen.seconds * 1000 >= migration.downtime_ms
    report = migration_admin_client.get(f"/migrations/history/{migration.pk}/report/").text
    assert f"{migration.downtime_ms} ms" in report and "(allowed 300 ms)" in report


def test_the_panel_says_a_close_call_may_stop_at_its_limit_not_that_it_will(fleet):
    """Too close to promise (the measured rates finish within the rounds left, a guest writing the model's
    margin faster would not): the panel warns that it *may* stop, shows the time if the rates hold, and
    offers the rescues; a guest comfortably below gets no warning."""
    from migrations_app.progress import get_migration_display, render_vm_fragments
    from migrations_app.steering import outlook

    hot_copy_panel(fleet, "qemu", rounds=26, bytes_remaining=4_000_000, dirty_rate_bytes_s=100_000)
    migration = Migration.objects.get(vm__name="hot")
    easy = outlook(migration)
    assert easy is not None and easy.warning == "" and easy.time_left_s is not None
    # The model's boundary: the first dirty rate, in 50 kB/s steps, that is too close to promise.
    for rate in range(150_000, 5_000_000, 50_000):
        Migration.objects.filter(pk=migration.pk).update(dirty_rate_bytes_s=rate)
        look = outlook(Migration.objects.get(pk=migration.pk))
        assert look is not None
        if look.warning:
            break
    assert look.warning.startswith("This migration may stop at the round limit (30 rounds)"), look.warning
    assert "too close to promise" in look.warning
    html = render_vm_fragments(get_migration_display(migration.vm), oob=False)
    assert "This migration may stop at the round limit (30 rounds)" in html
    assert "will stop" not in html
    assert 'data-field="time_left"' in html  # the time if the measured rates hold
    assert "Raise the allowed downtime to " in html


def test_the_panel_says_each_number_once_and_a_climbing_throttle_may_not_stop(fleet):
    """QA on reports01: the stat read "Expected downtime 9030 ms" (the agent's figure, all that is left at
    full speed) under the sentence "expected downtime 125 ms of 300 ms allowed"; the dirty-rate stat sat
    unlabelled beside a larger "the guest writes"; and with throttling on from the start, the early
    rounds said the guest *will* stay on its source, and it then completed."""
    policy = {"preset": "custom", "auto_converge": True}
    html = hot_copy_panel(
        fleet, "simulated", policy=policy, rounds=26, bytes_remaining=4_000_000,
        dirty_rate_bytes_s=100_000, throttle_pct=0, expected_downtime_ms=9030,
    )  # fmt: skip
    sentence = re.search(r'data-field="outlook_downtime">(\d+) ms<', html)
    stat = re.search(r'data-field="expected_downtime">(\d+) ms<', html)
    assert sentence and stat and stat.group(1) == sentence.group(1), html
    assert "9030 ms" not in html
    assert ">Dirtied last round</dt>" in html

    # Round 24 of 30, throttling on and at 30%: the careful run would stop at the round limit, but the
    # throttle has steps left to take, and how the guest answers them is learnt round by round.
    from migrations_app.progress import get_migration_display, render_vm_fragments

    migration = Migration.objects.get(vm__name="hot")
    Migration.objects.filter(pk=migration.pk).update(
        rounds=24, bytes_remaining=8_000_000, dirty_rate_bytes_s=10_000_000, throttle_pct=30
    )
    climbing = render_vm_fragments(get_migration_display(migration.vm), oob=False)
    assert "This migration will stop" not in climbing
    assert "This migration may stop at the round limit (30 rounds)" in climbing, climbing
    assert "throttling is at 30% and still climbing (up to 99%)" in climbing
    assert 'data-field="time_left"' not in climbing  # no time promised for it


def test_a_refused_change_is_said_beside_the_buttons_and_a_good_one_clears_it(fleet, admin, client):
    """QA: "Maximum downtime: give a whole number…" showed at the top of the page, far from the form."""
    hot_copy_panel(fleet, "simulated")
    migration = Migration.objects.get(vm__name="hot")
    client.force_login(admin)
    response = change(client, migration, action="raise_downtime", downtime_ms="")
    assert response.status_code == 400
    assert f'<div id="migration-steer-error-text-{migration.pk}" hx-swap-oob="true">' in response.text
    assert 'data-field="steer_error">Maximum downtime' in response.text
    assert 'id="migration-notice"' not in response.text  # not at the top
    panel = client.get(f"/vms/{migration.vm_id}/general/").text
    assert f'<div id="migration-steer-error-{migration.pk}" class="steer-error" hx-preserve="true"' in panel
    assert f'id="migration-steer-error-text-{migration.pk}"' in panel  # the slot the answer goes to


@pytest.mark.parametrize("over", ["asked", "converged"])
def test_once_copy_takes_no_change_the_page_and_the_push_show_the_buttons_disabled_with_why(
    fleet, admin, client, over
):
    """QA: "Switch over now" stayed enabled after the switch-over was asked (a second click answered 409):
    once asked, or once Copy converged, the page and every pushed update draw the steering buttons
    disabled with why, in a form under a new id (a page keeps a form of the same id across pushes)."""
    from django.utils import timezone

    from migrations_app.controls import watcher_rights
    from migrations_app.progress import build_progress_messages, message_vsps, render_message

    before = hot_copy_panel(fleet, "simulated")
    migration = Migration.objects.get(vm__name="hot")
    form_id = re.compile(r'<form class="migration-steer"[^>]*\bid="([^"]+)"')
    assert 'id="steer-switchover">Switch over now</button>' in before  # offered while Copy takes changes
    asked_at = timezone.now()
    if over == "asked":
        Migration.objects.filter(pk=migration.pk).update(switchover_requested_at=asked_at)
        note = f"Switch-over asked at {timezone.localtime(asked_at):%H:%M:%S}"
        label = "Switch-over asked"
    else:
        Migration.objects.filter(pk=migration.pk).update(copy_percent=100)
        note, label = "Copy converged", "Switching over"
    client.force_login(admin)

    page = client.get(f"/vms/{migration.vm_id}/general/").text
    message = build_progress_messages(migration.pk)[f"vm-{migration.vm_id}"]
    pushed = render_message(message, watcher_rights(admin).view_class(message_vsps(message)))

    for html in (page, pushed):
        assert re.search(rf'id="steer-switchover" disabled [^>]*>{label}</button>', html), html
        assert (
            f'data-field="steer_closed">{note}: it is switching over now; no change applies any more.' in html
        )
        for button in ("steer-throttle", "steer-downtime", "steer-bandwidth"):
            assert re.search(rf'id="{button}" disabled>', html), button
        assert "Switch over now" not in html  # neither the button nor a rescue offers it any more
        assert "This migration will stop" not in html
        assert form_id.search(html).group(1) != form_id.search(before).group(1)
