"""Migration policies end to end: the migrate dialog's overrides, stored on the row, honoured by real agents.

A real Celery worker on real Redis drives real host agents (simulated driver) on loopback; the worker
caps the data plane at 5 MB/s (conftest), and the "hot" guest writes 12 MB/s into all of its 8 MiB, so
it never converges without throttling.
"""

from __future__ import annotations

import re
from html import unescape

import pytest

from migrations_app.models import Migration
from tests.migrations_app.guests import place_vm, runs_on, wait_for_state

pytestmark = pytest.mark.django_db(transaction=True)

HOT = {"memory_mib": 8, "dirty_pages_per_s": 3000, "fill_percent": 100}
HTMX = {"HX-Request": "true"}


def test_the_dialog_offers_the_presets_with_their_words(host_agents, fleet, migration_admin_client):
    vm = place_vm(host_agents, fleet, **HOT)
    html = migration_admin_client.get(f"/migrations/vms/{vm.pk}/migrate/", headers=HTMX).text
    assert text_of(html, "migrate-policy-words").startswith("Default: at most 300 ms frozen")
    assert "Policy for this migration: " in html
    assert "Finishes whatever it takes: throttles the guest" in html
    assert 'name="preset" value="minimal_downtime"' in html


def test_a_hot_guest_completes_under_guaranteed_completion_chosen_in_the_dialog(
    host_agents, fleet, migration_admin_client, migration_worker, wait_for
):
    vm = place_vm(host_agents, fleet, **HOT)
    form = {"target": fleet["hostb"].pk, "preset": "guaranteed_completion", "max_downtime_ms": "1"}
    response = migration_admin_client.post(f"/migrations/vms/{vm.pk}/migrate/", form, headers=HTMX)
    assert response.status_code == 200, response.text
    migration = Migration.objects.get(vm=vm)
    assert migration.policy["preset"] == "guaranteed_completion"
    assert migration.policy["max_downtime_ms"] == 300  # a named preset is taken whole
    assert vm.migration_policy == {}  # the VM's own default is untouched
    wait_for_state(wait_for, migration, "completed", "aborted", "cancelled", timeout=120)
    assert migration.state == "completed", migration.alert
    assert migration.source_digest and migration.source_digest == migration.target_digest
    assert runs_on(host_agents["hostb"], vm.name)


def test_custom_values_in_the_dialog_override_the_vms_policy(
    host_agents, fleet, migration_admin_client, migration_worker, wait_for
):
    vm = place_vm(host_agents, fleet, vm_fields={"migration_policy": {"max_downtime_ms": 900}})
    form = {
        "target": fleet["hostb"].pk,
        "preset": "custom",
        "max_downtime_ms": "450",
        "at_limit": "switchover",
    }
    migration_admin_client.post(f"/migrations/vms/{vm.pk}/migrate/", form, headers=HTMX)
    migration = Migration.objects.get(vm=vm)
    assert (migration.policy["max_downtime_ms"], migration.policy["at_limit"]) == (450, "switchover")
    assert migration.policy["auto_converge"] is False  # unticked
    wait_for_state(wait_for, migration, "completed", "aborted", "cancelled")
    assert migration.state == "completed", migration.alert


@pytest.mark.parametrize(
    ("form", "words"),
    [
        ({"max_downtime_ms": "-1"}, "Maximum downtime: a whole number from 1 to 600000 ms"),
        ({"bandwidth_cap_mb_s": "lots"}, "Bandwidth cap: a number"),
        ({"max_downtime_ms": "99999999"}, "Maximum downtime: a whole number from 1 to 600000 ms"),
    ],
)
def test_bad_policy_values_in_the_dialog_start_nothing(
    host_agents, fleet, migration_admin_client, form, words
):
    vm = place_vm(host_agents, fleet)
    body = {"target": fleet["hostb"].pk, "preset": "custom", **form}
    response = migration_admin_client.post(f"/migrations/vms/{vm.pk}/migrate/", body, headers=HTMX)
    assert response.status_code == 400
    assert words in response.text
    assert not Migration.objects.filter(vm=vm).exists()


def complete_one_migration(host_agents, fleet, admin, wait_for):
    """A finished migration hosta -> hostb, so the console knows that link's rate."""
    from migrations_app.actions import do_request_migration

    vm = place_vm(host_agents, fleet, dirty_pages_per_s=0, fill_percent=100, memory_mib=8)
    migration = wait_for_state(
        wait_for, do_request_migration(vm, fleet["hostb"], admin), "completed", "aborted"
    )
    assert migration.state == "completed", migration.alert
    return migration


def forecast_cells(client, vm) -> dict[str, str]:
    """The dialog's forecast per target VSP name, as the page shows it after fetching it."""
    html = client.get(f"/migrations/vms/{vm.pk}/forecast/", headers=HTMX).text
    cells = re.findall(r'<td id="forecast-(\d+)"[^>]*>(.*?)</td>', html, re.S)
    names = {str(vsp.pk): vsp.name for vsp in Migration._meta.get_field("target").related_model.objects.all()}
    return {names[pk]: " ".join(re.sub(r"<[^>]+>", " ", text).split()) for pk, text in cells}


def test_the_dialog_forecasts_an_idle_and_a_hot_guest_per_target(
    host_agents, fleet, admin, migration_admin_client, migration_worker, wait_for
):
    complete_one_migration(host_agents, fleet, admin, wait_for)
    idle = place_vm(host_agents, fleet, dirty_pages_per_s=0, memory_mib=8)
    hot = place_vm(host_agents, fleet, **HOT)

    dialog = migration_admin_client.get(f"/migrations/vms/{idle.pk}/migrate/", headers=HTMX).text
    assert "Measuring" in dialog and 'id="forecast-loader"' in dialog  # the dialog does not wait for it

    idle_cells = forecast_cells(migration_admin_client, idle)
    # The console's one duration format ("under 1 s", never "about 0.0 s"), and a full stop before the
    # sentences that follow (QA: "frozen about 10 ms web01 writes 2.0 MB/s").
    assert re.match(
        r"Converges · (about \d+ s|about \d+ min \d+ s|under 1 s) ?, frozen about \d+ ms ?\. ",
        idle_cells["hostb"],
    ), idle_cells["hostb"]
    said = re.search(
        r"writes 0.0 MB/s; the link to hostb carried ([\d.]+) MB/s on its last migration, "
        r"(\d+ s ago|just now)",
        idle_cells["hostb"],
    )
    assert said and 4.5 <= float(said.group(1)) <= 5.5, idle_cells["hostb"]  # the worker's 5 MB/s cap
    assert "the link from hosta to hostc is not known yet" in idle_cells["hostc"]
    assert "measuring it with a short probe" in idle_cells["hostc"]
    hot_cells = forecast_cells(migration_admin_client, hot)
    # Not a total (QA: "Will not converge · about 368.6 s"): where and when it would give up.
    assert re.match(
        r"Will not converge under this policy · would stop at the round limit \(30 rounds\) after "
        r"(about \d+ s|about \d+ min \d+ s) ?\. ",
        hot_cells["hostb"],
    ), hot_cells["hostb"]
    assert "the guest writes faster" in hot_cells["hostb"]


def test_with_no_history_a_capped_policy_still_flags_a_guest_that_writes_faster_than_the_cap(
    host_agents, fleet, migration_admin_client
):
    """The demo's reports01 case: no migration between the pair yet, but the VM's policy caps bandwidth
    below what the guest writes, so the dialog can say it will not converge without waiting for history."""
    hot = place_vm(host_agents, fleet, **HOT)
    hot.migration_policy = {"preset": "custom", "bandwidth_cap_mb_s": 5}
    hot.save(update_fields=["migration_policy"])
    idle = place_vm(host_agents, fleet, dirty_pages_per_s=0, memory_mib=8)
    idle.migration_policy = {"preset": "custom", "bandwidth_cap_mb_s": 5}
    idle.save(update_fields=["migration_policy"])

    hot_cell = forecast_cells(migration_admin_client, hot)["hostc"]
    assert hot_cell.startswith("Will not converge under this policy"), hot_cell
    assert "the link to hostc is not measured yet (no migration between them)" in hot_cell
    assert "allows at most 5.0 MB/s" in hot_cell
    idle_cell = forecast_cells(migration_admin_client, idle)["hostc"]
    assert idle_cell.startswith(("Converges · about ", "Converges · under 1 s")), idle_cell


def test_the_dialog_says_a_close_call_may_not_converge_with_what_would_make_it_a_promise(
    host_agents, fleet, migration_admin_client
):
    """Too close to promise: the measured rates converge within the rounds, a guest writing the model's
    margin faster would not. The dialog neither promises it nor says it will not converge: its own words,
    the time if the rates hold, and the changes that would make it a promise; the cell warns."""
    from migrations_app import estimates, forecast

    warm = place_vm(host_agents, fleet, memory_mib=8, dirty_pages_per_s=300, fill_percent=100)
    first = forecast_cells(migration_admin_client, warm)  # measures the guest (cached for the dialog)
    measured = estimates.cached_dirty_rate(warm)
    assert measured is not None and measured.rate_bytes_s > 0, first

    # No migration between the pair: the policy's cap is the link. The model's boundary for this guest:
    # the first cap, coming down in 0.05 MB/s steps, under which it is too close to promise.
    def verdict(cap_mb_s: float) -> forecast.Verdict:
        policy = estimates.forecast_policy({"preset": "custom", "bandwidth_cap_mb_s": cap_mb_s}, warm)
        link = estimates.model_link(warm.current_vsp, cap_mb_s * 1_000_000)
        return forecast.forecast(measured.guest(), link, policy).verdict

    caps = [round(50 - 0.05 * step, 2) for step in range(990)]
    close = next(cap for cap in caps if verdict(cap) is forecast.Verdict.MAY_NOT_CONVERGE)
    warm.migration_policy = {"preset": "custom", "bandwidth_cap_mb_s": close}
    warm.save(update_fields=["migration_policy"])
    html = migration_admin_client.get(f"/migrations/vms/{warm.pk}/forecast/", headers=HTMX).text
    cell = forecast_cells(migration_admin_client, warm)["hostc"]

    assert cell.startswith("May not converge under this policy: too close to promise · if the measured "), (
        cell
    )
    assert "Will not converge" not in cell and "Converges" not in cell
    assert (
        "If the measured rates hold: " in cell
        and "With the guest writing 25% faster it would stop at" in cell
    )
    assert "A promise with any one of: allow " in cell, cell
    assert re.search(rf'<td id="forecast-{fleet["hostc"].pk}" class="target-forecast forecast-warns"', html)


def test_the_dialog_forecasts_with_the_pairs_dirty_rounds_timed_on_its_last_migrations(
    host_agents, fleet, admin, migration_admin_client, migration_worker, wait_for
):
    """The live panel and the bench move the dirty rounds at their own measured rate and fixed cost per
    round; the dialog now does too, from the pair's completed migrations' round samples (two here, each
    with dirty rounds: 16 MiB writing about half the worker's 5 MB/s cap)."""
    from dataclasses import replace

    from migrations_app import estimates, forecast, migration_policy
    from migrations_app.actions import do_request_migration

    warm = {"memory_mib": 16, "dirty_pages_per_s": 600, "fill_percent": 100}
    for _ in range(2):
        vm = place_vm(host_agents, fleet, **warm)
        migration = do_request_migration(vm, fleet["hostb"], admin)
        wait_for_state(wait_for, migration, "completed", "aborted", "cancelled", timeout=120)
        assert migration.state == "completed", migration.alert
    cost = estimates.round_cost(fleet["hosta"], fleet["hostb"])
    assert cost is not None and cost.migrations == 2, cost
    link = estimates.link_rate(fleet["hosta"], fleet["hostb"])
    assert link is not None

    third = place_vm(host_agents, fleet, **warm)
    cell = forecast_cells(migration_admin_client, third)["hostb"]
    measured = estimates.cached_dirty_rate(third)
    assert measured is not None, cell

    said = re.search(
        r"Its dirty rounds moved ([\d.]+) MB/s plus (\d+) ms a round over its last 2 migrations", cell
    )
    assert said, cell
    assert said.group(0) + "." == cost.words()
    fleet["hosta"].refresh_from_db()  # its agent's driver, recorded when the dialog opened
    fitted = replace(
        estimates.model_link(fleet["hosta"], link.rate_bytes_s),
        round_rate_bytes_s=cost.rate_bytes_s,
        round_overhead_s=cost.overhead_s,
    )
    policy = estimates.forecast_policy(migration_policy.effective(third.migration_policy), third)
    expected = forecast.forecast(measured.guest(), fitted, policy)
    took = forecast.duration_words(expected.total_s)
    assert f" · {'about ' if expected.total_s >= 1 else ''}{took} , frozen about" in cell, (cell, expected)
    assert f"Expected: {forecast.rounds_words(expected, policy)}, within the allowed" in cell, cell


def forecast_with(client, vm, form: dict[str, str]) -> tuple[dict[str, str], str]:
    """The forecast cells per target VSP name for the dialog's policy fields ``form``, and the raw html."""
    html = client.get(f"/migrations/vms/{vm.pk}/forecast/", form, headers=HTMX).text
    cells = re.findall(r'<td id="forecast-(\d+)"[^>]*>(.*?)</td>', html, re.S)
    names = {str(vsp.pk): vsp.name for vsp in Migration._meta.get_field("target").related_model.objects.all()}
    return {names[pk]: " ".join(re.sub(r"<[^>]+>", " ", text).split()) for pk, text in cells}, html


def text_of(html: str, element_id: str) -> str:
    found = re.search(rf'<span id="{element_id}"[^>]*>(.*?)</span>', html, re.S)
    assert found, f"no #{element_id} in {html[:500]}"
    return " ".join(unescape(found.group(1)).split())


def test_the_dialog_forecasts_with_the_policy_typed_into_it(host_agents, fleet, migration_admin_client):
    """The QA's reports01 case: the VM's saved policy caps a hot guest below what it writes, so it will
    not converge; ticking Auto-converge in the dialog forecasts every target again with that policy, and
    the summary line follows. The VM's saved policy is untouched."""
    hot = place_vm(host_agents, fleet, **HOT)
    hot.migration_policy = {"preset": "custom", "bandwidth_cap_mb_s": 5}
    hot.save(update_fields=["migration_policy"])
    typed = {"preset": "custom", "max_downtime_ms": "300", "bandwidth_cap_mb_s": "5", "at_limit": "abort"}

    saved, _ = forecast_with(migration_admin_client, hot, typed)  # as the dialog opens: auto-converge off
    assert saved["hostc"].startswith("Will not converge under this policy"), saved

    cells, html = forecast_with(migration_admin_client, hot, {**typed, "auto_converge": "true"})
    assert set(cells) == set(saved)
    assert not cells["hostc"].startswith("Will not converge"), cells["hostc"]
    assert "throttl" in cells["hostc"].lower(), cells["hostc"]
    assert "throttles the guest up to 99%" in text_of(html, "migrate-policy-words")
    seen = re.search(r"converging in round (\d+) of the (\d+) allowed", cells["hostc"])
    assert seen and int(seen.group(1)) <= int(seen.group(2)) == 30, cells["hostc"]  # never past the limit

    _, html = forecast_with(migration_admin_client, hot, {"preset": "guaranteed_completion"})
    assert text_of(html, "migrate-policy-words").startswith("Guaranteed completion: ")
    hot.refresh_from_db()
    assert hot.migration_policy == {"preset": "custom", "bandwidth_cap_mb_s": 5}


@pytest.mark.parametrize(
    ("form", "field", "words"),
    [
        (
            {"max_downtime_ms": "300.5"},
            "max_downtime_ms",
            "Maximum downtime: a whole number from 1 to 600000 ms",
        ),
        ({"bandwidth_cap_mb_s": "lots"}, "bandwidth_cap_mb_s", "Bandwidth cap: a number, not 'lots'"),
        ({"downtime_step_ms": "100"}, "downtime_max_ms", "Downtime escalation needs a ceiling"),
    ],
)
def test_a_bad_value_typed_into_the_dialog_says_why_beside_its_field_and_keeps_the_cells(
    host_agents, fleet, migration_admin_client, form, field, words
):
    vm = place_vm(host_agents, fleet)
    cells, html = forecast_with(migration_admin_client, vm, {"preset": "custom", **form})
    assert cells == {}  # the cells stay as they were (no swap)
    assert words in text_of(html, f"migrate-policy-error-{field}")
    assert 'id="migrate-policy-words"' not in html  # the summary keeps the last good policy
    others = re.findall(r'<span id="migrate-policy-error-(\w+)"[^>]*>(.*?)</span>', html)
    assert {name for name, text in others if text} == {field}  # the other fields' errors are cleared


def test_the_dialog_asks_before_starting_one_that_will_not_converge_and_the_api_starts_it_saying_why(
    host_agents, fleet, migration_admin_client
):
    """The reports01 case in the dialog: Migrate starts nothing; it says why (the guest's writes against
    what the cap lets through, where it would stop) and offers Start it anyway, which starts it. The API
    starts such a migration at once, with the same words in ``forecast_warning``."""
    from django.contrib.auth.models import User

    from api.tokens import do_create_token
    from tests.api.conftest import ApiClient

    capped = {"preset": "custom", "bandwidth_cap_mb_s": 5}
    hot = place_vm(host_agents, fleet, **HOT, vm_fields={"migration_policy": capped})
    target = fleet["hostc"]
    url = f"/migrations/vms/{hot.pk}/migrate/"

    asked = migration_admin_client.post(url, {"target": target.pk}, headers=HTMX)
    assert asked.status_code == 409, asked.text
    found = re.search(
        r'<div class="form-error" role="alert" id="migrate-confirm"><p data-field="why">(.*?)</p>',
        asked.text,
        re.S,
    )
    assert found, asked.text
    why = " ".join(unescape(found.group(1)).split())
    assert why.startswith(f"{hot.name} will not converge to hostc under this policy: {hot.name} writes "), why
    # "the bandwidth cap allows at most 5.0 MB/s" with the link not known yet, "more than the bandwidth cap
    # of 5.0 MB/s lets through" once a probe (an earlier test's) measured it: both name the cap
    assert (
        re.search(r"bandwidth cap (allows at most|of) 5\.0 MB/s", why) and "Because the guest writes" in why
    ), why
    assert f"then stop, and {hot.name} would keep running on {hot.current_vsp.name}." in why, why
    assert not Migration.objects.filter(vm=hot).exists()
    assert f'name="confirm_not_converging" value="{target.pk}">Start it anyway</button>' in asked.text

    started = migration_admin_client.post(
        url, {"target": target.pk, "confirm_not_converging": target.pk}, headers=HTMX
    )
    assert started.status_code == 200, started.text
    assert Migration.objects.get(vm=hot).target == target

    other = place_vm(host_agents, fleet, **HOT, vm_fields={"migration_policy": capped})
    api = ApiClient(do_create_token(User.objects.get(username="admin"), "tests")[1])
    answer = api.post("/migrations", {"vm": other.name, "target": target.name})
    assert answer.status_code == 201, answer.content
    warning = answer.json()["forecast_warning"]
    assert warning.startswith(f"{other.name} will not converge to hostc under this policy: "), warning
    assert Migration.objects.get(vm=other).target == target
