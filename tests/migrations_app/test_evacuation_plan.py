"""Evacuation plans, refusals and maintenance, without running migrations (no worker is asked).

In these tests the database transaction is rolled back, so the migrations an evacuation requests are never
handed to a worker (``transaction.on_commit`` does not fire): they stay QUEUED, as they would while
waiting their turn.
"""

from __future__ import annotations

import pytest
from django.core.exceptions import PermissionDenied

from evacuations.actions import (
    EvacuationRefused,
    do_cancel_evacuation,
    do_leave_maintenance,
    do_start_evacuation,
)
from evacuations.models import Evacuation
from evacuations.plan import build_plan
from migrations_app.actions import MigrationRefused, do_request_migration
from migrations_app.models import Migration
from tests.factories import (
    MIGRATION_ADMIN_PERMISSIONS,
    make_migration,
    make_not_runnable_copy,
    make_user,
    make_vm,
    make_vsp,
)
from vms.models import VSP, AuditEvent

pytestmark = pytest.mark.django_db


@pytest.fixture
def measured():
    """Cache a guest's dirty rate as the migrate dialog (or the plan page) measured it moments ago:
    ``measured(vm, bytes_per_s)`` returns the ``estimates.DirtyRate``; the cache is cleared after."""
    from django.core.cache import cache
    from django.utils import timezone

    from migrations_app import estimates

    keys = []

    def measure(vm, rate: float, written: int | None = None) -> estimates.DirtyRate:
        memory = vm.memory_mib * 1024 * 1024
        found = estimates.DirtyRate(
            float(rate), memory, memory if written is None else written, None, timezone.now()
        )
        cache.set(estimates._cache_key(vm), found, 60)
        keys.append(estimates._cache_key(vm))
        return found

    yield measure
    cache.delete_many(keys)


@pytest.fixture
def admin():
    return make_user("admin", MIGRATION_ADMIN_PERMISSIONS)


@pytest.fixture
def cramped():
    """src holds four movable guests (800, 500, 400, 300 MiB) and four that cannot leave; the other
    VSPs have 1000 and 600 MiB free, so not everything fits; a fourth VSP is in maintenance."""
    src = make_vsp("src", memory_mib=8192)
    big = make_vsp("big", memory_mib=1000)
    small = make_vsp("small", memory_mib=600)
    make_vsp("resting", memory_mib=65536, maintenance=True)
    make_vsp("off-duty", memory_mib=65536, migration_enabled=False)
    guests = {name: make_vm(name, vsp=src, memory_mib=mib) for name, mib in (("g800", 800), ("g500", 500))}
    guests |= {name: make_vm(name, vsp=src, memory_mib=mib) for name, mib in (("g400", 400), ("g300", 300))}
    make_vm("vpar1", vsp=src, kind="vpar", memory_mib=64)
    make_vm("sleeper", vsp=src, hardware_status="off", memory_mib=64)
    make_vm("pinned", vsp=src, online_migration_enabled=False, memory_mib=64)
    elsewhere = make_vm("moved-away", vsp=big, memory_mib=64, hardware_status="off")
    make_not_runnable_copy(elsewhere, src, reason="guest migrated to VSP big")
    return {"src": src, "big": big, "small": small, **guests}


def test_it_plans_what_fits_and_says_why_the_rest_stays(cramped):
    plan = build_plan(cramped["src"])

    placed = {step.vm.name: step.target.name for step in plan.steps}
    assert placed == {"g800": "big", "g500": "small"}
    reasons = {stay.vm_name: stay.reason for stay in plan.staying}
    assert reasons["vpar1"] == "vPars do not migrate"
    assert reasons["sleeper"].startswith("powered off")
    assert reasons["pinned"] == "online migration is disabled for this VM"
    assert reasons["moved-away"].startswith("Not Runnable copy here: guest migrated to VSP big")
    assert reasons["g400"] == (
        "no target with room: needs 400 MiB, the most left is 200 MiB on big "
        "once the earlier steps are counted"
    )
    assert reasons["g300"].startswith("no target with room: needs 300 MiB")
    # No target is overcommitted; VSPs in maintenance or disabled take nothing.
    assert all(free >= 0 for free in plan.planned_free.values())
    refusals = {vsp.name: refusal for vsp, refusal, _ in plan.targets}
    assert refusals == {"big": "", "small": "", "resting": "host in maintenance", "off-duty": "host disabled"}


def test_it_counts_in_flight_migrations_against_a_target(cramped, admin):
    other = make_vm("arriving", vsp=make_vsp("far", memory_mib=700), memory_mib=700)
    make_migration(other, other.current_vsp, cramped["big"])  # queued: 700 MiB reserved on big

    placed = {step.vm.name: step.target.name for step in build_plan(cramped["src"]).steps}

    assert placed == {"g500": "small", "g300": "big"}  # big: 1000 - 700 reserved = 300 MiB left


def test_it_flags_an_admin_target_that_does_not_fit(cramped):
    g800, g500 = cramped["g800"], cramped["g500"]
    plan = build_plan(cramped["src"], {g800.pk: cramped["small"].pk, g500.pk: cramped["big"].pk})

    assert not plan.ok
    assert plan.problems == [
        "g800 cannot go to small: not enough free memory once the earlier steps are counted "
        "(needs 800 MiB, 600 MiB free)"
    ]


def test_it_orders_by_forecast_largest_last_and_follows_the_admins_order(cramped, measured):
    # Past throughput src -> big: known; src -> small: never migrated, so not known yet (last).
    past = {"state": "completed", "throughput_bytes_s": 50_000_000}
    make_migration(cramped["g300"], cramped["src"], cramped["big"], **past)
    measured(cramped["g800"], 0)
    measured(cramped["g500"], 0)
    plan = build_plan(cramped["src"])
    assert [(step.vm.name, step.predicted_s is not None) for step in plan.steps] == [
        ("g800", True),
        ("g500", False),
    ]
    assert plan.steps[0].predicted_s == pytest.approx(800 * 1024 * 1024 / 50_000_000, rel=0.1)

    reordered = build_plan(cramped["src"], order=[cramped["g500"].pk, cramped["g800"].pk])
    assert [step.vm.name for step in reordered.steps] == ["g500", "g800"]


def test_the_plan_forecasts_each_guest_under_its_own_policy_and_measured_dirty_rate(cramped, measured):
    """QA: evacuating vsp1 planned the busy reports01 (12 MB/s under its 10 MB/s policy cap) at 3 s, like an
    idle guest; its migration then ran to its round limit. The plan now uses the VM's policy and the
    dirty rate the migrate dialog measured (from the cache, never an agent call)."""
    from django.core.cache import cache
    from django.utils import timezone

    from migrations_app import estimates

    past = {"state": "completed", "throughput_bytes_s": 50_000_000}
    make_migration(cramped["g300"], cramped["src"], cramped["big"], **past)
    measured(cramped["g800"], 0)
    idle_s = build_plan(cramped["src"]).steps[0].predicted_s
    busy = cramped["g800"]
    busy.migration_policy = {"preset": "custom", "bandwidth_cap_mb_s": 10}
    busy.save(update_fields=["migration_policy"])
    memory = busy.memory_mib * 1024 * 1024
    measured = estimates.DirtyRate(12_000_000.0, memory, memory // 8, memory // 8, timezone.now())
    cache.set(estimates._cache_key(busy), measured, 60)
    try:
        step = next(step for step in build_plan(cramped["src"]).steps if step.vm.pk == busy.pk)
    finally:
        cache.delete(estimates._cache_key(busy))
    assert idle_s is not None and step.predicted_s is not None
    assert step.predicted_s > 5 * idle_s, (step.predicted_s, idle_s)


def reviewed(plan):
    return {step.vm.pk: step.target.pk for step in plan.steps}, [step.vm.pk for step in plan.steps]


def test_it_starts_an_evacuation_queues_the_guests_in_order_and_enters_maintenance(cramped, admin):
    targets, order = reviewed(build_plan(cramped["src"]))

    evacuation = do_start_evacuation(cramped["src"], targets, order, admin)

    migrations = list(Migration.objects.filter(source=cramped["src"]).order_by("pk"))
    # No forecast yet for either: the smaller guest first, the larger last.
    assert [(m.vm.name, m.target.name, m.state) for m in migrations] == [
        ("g500", "small", "queued"),
        ("g800", "big", "queued"),
    ]
    assert list(evacuation.steps.values_list("vm_name", flat=True)) == ["g500", "g800"]
    assert VSP.objects.get(pk=cramped["src"].pk).maintenance
    actions = list(AuditEvent.objects.order_by("pk").values_list("action", "actor_name"))
    assert actions == [
        ("maintenance_entered", "admin"),
        ("migration_requested", "admin"),
        ("migration_requested", "admin"),
        ("evacuation_started", "admin"),
    ]
    staying = {stay["vm"] for stay in evacuation.staying}
    assert staying == {"g400", "g300", "vpar1", "sleeper", "pinned", "moved-away"}


def test_it_refuses_a_second_evacuation_of_the_same_vsp(cramped, admin):
    targets, order = reviewed(build_plan(cramped["src"]))
    do_start_evacuation(cramped["src"], targets, order, admin)
    before = AuditEvent.objects.count()

    with pytest.raises(EvacuationRefused, match="src is already being evacuated"):
        do_start_evacuation(cramped["src"], targets, order, admin)

    assert Evacuation.objects.count() == 1 and AuditEvent.objects.count() == before


def test_it_refuses_a_plan_that_no_longer_fits_and_changes_nothing(cramped, admin):
    targets, order = reviewed(build_plan(cramped["src"]))
    # Meanwhile another guest takes most of "small".
    newcomer = make_vm("newcomer", vsp=make_vsp("far", memory_mib=300), memory_mib=300)
    do_request_migration(newcomer, cramped["small"], admin)

    with pytest.raises(EvacuationRefused, match="The plan no longer fits: g500 cannot go to small"):
        do_start_evacuation(cramped["src"], targets, order, admin)

    assert not Evacuation.objects.exists()
    assert not VSP.objects.get(pk=cramped["src"].pk).maintenance
    assert not Migration.objects.filter(source=cramped["src"]).exists()


def test_it_refuses_a_plan_when_the_guests_changed(cramped, admin):
    targets, order = reviewed(build_plan(cramped["src"]))
    make_vm("late", vsp=cramped["src"], memory_mib=50)

    with pytest.raises(EvacuationRefused, match=r"changed since the plan was shown \(late not in it\)"):
        do_start_evacuation(cramped["src"], targets, order, admin)


def test_it_refuses_a_migration_to_a_vsp_in_maintenance_with_the_reason(cramped, admin):
    resting = VSP.objects.get(name="resting")
    vm = make_vm("mover", vsp=make_vsp("far", memory_mib=64), memory_mib=64)

    with pytest.raises(MigrationRefused, match="mover cannot migrate to resting: host in maintenance"):
        do_request_migration(vm, resting, admin)


def test_a_read_only_user_sees_the_plan_but_cannot_start_it(client, cramped):
    client.force_login(make_user("reader", ("vms.view_vsp", "vms.view_virtualmachine")))
    url = f"/migrations/vsps/{cramped['src'].pk}/evacuate/"

    page = client.get(url)
    assert page.status_code == 200
    html = page.content.decode()
    assert "g800" in html and "no target with room" in html
    assert "Your account may view this plan but not start it." in html

    refused = client.post(url, {f"target_{cramped['g800'].pk}": cramped["big"].pk})
    assert refused.status_code == 403
    assert not Evacuation.objects.exists() and not Migration.objects.exists()
    with pytest.raises(PermissionDenied):
        do_start_evacuation(cramped["src"], {}, None, make_user("reader2", ("vms.view_vsp",)))


def test_the_plan_page_takes_the_admins_changes_and_rejects_bad_input(client, cramped, admin):
    client.force_login(admin)
    url = f"/migrations/vsps/{cramped['src'].pk}/evacuate/"
    g800, g500 = cramped["g800"], cramped["g500"]

    bad = client.get(url, {f"target_{g800.pk}": "big"})
    assert bad.status_code == 400 and "Target for g800: &#x27;big&#x27; is not a VSP." in bad.content.decode()

    started = client.post(
        url,
        {
            f"target_{g800.pk}": cramped["big"].pk,
            f"target_{g500.pk}": cramped["small"].pk,
            f"position_{g800.pk}": 2,
            f"position_{g500.pk}": 1,
        },
    )
    assert started.status_code == 302
    assert list(Migration.objects.order_by("pk").values_list("vm__name", flat=True)) == ["g500", "g800"]
    vsp_page = client.get(f"/vsps/{cramped['src'].pk}/").content.decode()
    assert "In maintenance" in vsp_page and 'id="evacuation-progress"' in vsp_page
    # Every page that lists the VSP says so: the VSP list, the VM list, the General tab.
    for url in ("/vsps/", "/?q=g800", f"/vms/{g800.pk}/general/"):
        assert 'data-value="maintenance">In maintenance' in client.get(url).content.decode(), url


def test_it_cancels_a_waiting_evacuation_and_the_admin_leaves_maintenance(cramped, admin):
    targets, order = reviewed(build_plan(cramped["src"]))
    evacuation = do_start_evacuation(cramped["src"], targets, order, admin)

    with pytest.raises(EvacuationRefused, match="already being evacuated"):
        do_leave_maintenance(cramped["src"], admin)
    do_cancel_evacuation(evacuation, admin)

    evacuation.refresh_from_db()
    assert evacuation.state == "cancelled"
    assert set(Migration.objects.values_list("state", flat=True)) == {"cancelled"}
    assert VSP.objects.get(pk=cramped["src"].pk).maintenance  # leaving it is the admin's own action
    do_leave_maintenance(cramped["src"], admin)
    assert not VSP.objects.get(pk=cramped["src"].pk).maintenance
    actions = list(AuditEvent.objects.order_by("pk").values_list("action", flat=True))
    assert actions[-5:] == [
        "evacuation_cancelled",
        "migration_cancelled",
        "migration_cancelled",
        "evacuation_finished",
        "maintenance_left",
    ]


def test_a_pair_never_migrated_is_planned_with_its_link_probe_and_probed_when_it_has_none(cramped, measured):
    """No history to big or small: the plan queues a link probe per eligible target (not to VSPs in
    maintenance or disabled) and says "not known yet"; with a probe's rate and the guest's measured
    dirty rate it forecasts (without the dirty rate a probe alone is not enough: it moves no guest)."""
    from django.utils import timezone

    from migrations_app.models import LinkProbe

    src = cramped["src"]
    assert all(step.predicted_s is None for step in build_plan(src).steps)
    queued = LinkProbe.objects.filter(source=src, requested_at__isnull=False)
    assert sorted(queued.values_list("target__name", flat=True)) == ["big", "small"]

    queued.update(rate_bytes_s=50_000_000, measured_at=timezone.now())
    assert all(step.predicted_s is None for step in build_plan(src).steps)  # dirty rates not measured
    g800 = cramped["g800"]
    measured(g800, 0)
    step = next(step for step in build_plan(src).steps if step.vm.pk == g800.pk)
    assert step.predicted_s == pytest.approx(g800.memory_mib * 1024 * 1024 / 50_000_000, rel=0.1)


def test_a_guest_never_measured_is_not_known_yet_not_another_guests_rate(cramped, measured):
    """QA: db01 (idle) was planned at 48 s and moved in 3 s: with no measurement of its own, the plan used
    the mean dirty rate of the pair's earlier migrations (other, busy guests). Now its time is "not known
    yet" until its own rate is measured; measured idle, it is the idle guest's time."""
    src, big = cramped["src"], cramped["big"]
    busy_past = {"state": "completed", "throughput_bytes_s": 50_000_000, "dirty_rate_bytes_s": 30_000_000}
    make_migration(cramped["g300"], src, big, **busy_past)
    g800 = cramped["g800"]
    assert next(step for step in build_plan(src).steps if step.vm.pk == g800.pk).predicted_s is None
    measured(g800, 0)
    step = next(step for step in build_plan(src).steps if step.vm.pk == g800.pk)
    assert step.predicted_s == pytest.approx(g800.memory_mib * 1024 * 1024 / 50_000_000, rel=0.1)


def close_and_hopeless_rates(vm, target, measured):
    """Dirty rates (bytes/s) at which ``vm`` may not, and will not, converge to ``target`` (the dialog's
    own forecast, ``estimates.forecast_to``)."""
    from migrations_app import estimates

    def verdict(rate: int) -> str:
        found = estimates.forecast_to(vm, target, vm.migration_policy, measured(vm, rate))
        assert found.verdict is not None
        return found.verdict.value

    close = next(rate for rate in range(100_000, 50_000_000, 100_000) if verdict(rate) == "may_not_converge")
    hopeless = next(
        rate for rate in range(close, 200_000_000, 1_000_000) if verdict(rate) == "will_not_converge"
    )
    return close, hopeless


def test_the_plan_page_says_which_guests_may_or_will_not_converge(client, cramped, admin, measured):
    """Beside a step's time, the page says when the forecast warns: "may not converge" for a close call
    (the time is then the measured rates'), "will not converge" when the measured rates do not; the
    reason is spelled out and the admin is told how to go on."""
    import re

    from migrations_app import forecast

    src, big, small = cramped["src"], cramped["big"], cramped["small"]
    past = {"state": "completed", "throughput_bytes_s": 50_000_000}
    make_migration(cramped["g400"], src, big, **past)
    make_migration(cramped["g300"], src, small, **past)
    g800, g500 = cramped["g800"], cramped["g500"]
    close, _ = close_and_hopeless_rates(g800, big, measured)
    _, hopeless = close_and_hopeless_rates(g500, small, measured)
    measured(g800, close)
    measured(g500, hopeless)
    client.force_login(admin)
    plan = build_plan(src)
    chosen = {step.vm.name: (step.target.name, step.verdict) for step in plan.steps}
    assert chosen == {
        "g800": ("big", forecast.Verdict.MAY_NOT_CONVERGE),
        "g500": ("small", forecast.Verdict.WILL_NOT_CONVERGE),
    }

    html = client.get(f"/migrations/vsps/{src.pk}/evacuate/").content.decode()

    def cell(name: str, attribute: str = "data-vm") -> str:
        row = re.search(rf'<tr {attribute}="{name}".*?</tr>', html, re.S)
        assert row, name
        return " ".join(re.sub(r"<[^>]+>", " ", row.group(0)).split())

    assert "May not converge under this policy: too close to promise" in cell("g800")
    assert "Will not converge under this policy" in cell("g500")
    assert "is not started unless you choose" in cell("g500", "data-warning-for")
    assert "exclude it" in cell("g500", "data-warning-for")
    assert 'id="start-evacuation" disabled' in html


def test_a_step_that_will_not_converge_is_never_started_silently(cramped, admin, measured):
    """Start refuses (nothing changes) while a warning step is neither excluded nor confirmed; excluded it
    stays on the source with the reason; confirmed it starts, and the audit says it was confirmed."""
    src, big, small = cramped["src"], cramped["big"], cramped["small"]
    past = {"state": "completed", "throughput_bytes_s": 50_000_000}
    make_migration(cramped["g400"], src, big, **past)
    make_migration(cramped["g300"], src, small, **past)
    g800, g500 = cramped["g800"], cramped["g500"]
    measured(g800, 0)
    _, hopeless = close_and_hopeless_rates(g500, small, measured)
    measured(g500, hopeless)
    targets, order = reviewed(build_plan(src))

    with pytest.raises(EvacuationRefused, match="g500 will not converge under this policy: change its"):
        do_start_evacuation(src, targets, order, admin)
    assert not Evacuation.objects.exists()
    src.refresh_from_db()
    assert not src.maintenance

    kept = build_plan(src, excluded={g500.pk})  # (its room on small now takes g400)
    assert kept.ok and "g500" not in [step.vm.name for step in kept.steps]
    assert ("g500", "excluded from this evacuation by the admin") in [
        (stay.vm_name, stay.reason) for stay in kept.staying
    ]

    evacuation = do_start_evacuation(src, targets, order, admin, confirmed={g500.pk})
    assert sorted(evacuation.steps.values_list("vm_name", flat=True)) == ["g500", "g800"]
    started = AuditEvent.objects.filter(action=AuditEvent.Action.EVACUATION_STARTED).get()
    assert started.after["confirmed"] == ["g500: will_not_converge"]


def test_the_plans_time_is_the_migrate_dialogs_forecast(cramped, measured):
    """The plan calls the dialog's own forecast with the same inputs: the VM's policy, its measured dirty
    rate, the pair's newest-weighted link rate and its fitted dirty rounds (round samples: a slow 40 MB/s
    with 0.2 s a round, against a 50 MB/s link), so both say the same time and verdict."""
    from migrations_app import estimates

    src, big = cramped["src"], cramped["big"]
    # [t_s, round, bytes_sent, bytes_remaining, dirty_rate_bytes_s, throughput_bytes_s] at each round's end
    samples = [
        [2.0, 1, 100_000_000, 40_000_000, 0, 50_000_000],
        [3.2, 2, 140_000_000, 20_000_000, 0, 50_000_000],  # 40 MB in 1.2 s
        [3.9, 3, 160_000_000, 10_000_000, 0, 50_000_000],  # 20 MB in 0.7 s
        [4.35, 4, 170_000_000, 5_000_000, 0, 50_000_000],  # 10 MB in 0.45 s
    ]
    past = {"state": "completed", "throughput_bytes_s": 50_000_000, "dirty_rate_bytes_s": 20_000_000}
    make_migration(cramped["g300"], src, big, round_samples=samples, **past)
    make_migration(cramped["g400"], src, big, state="completed", throughput_bytes_s=20_000_000)
    cost = estimates.round_cost(src, big)
    assert cost is not None and round(cost.rate_bytes_s) == 40_000_000 and round(cost.overhead_s, 3) == 0.2
    g800 = cramped["g800"]
    g800.migration_policy = {"preset": "custom", "bandwidth_cap_mb_s": 30}
    g800.save(update_fields=["migration_policy"])
    rate = measured(g800, 5_000_000)

    step = next(step for step in build_plan(src).steps if step.vm.pk == g800.pk)

    dialog = estimates.forecast_to(g800, big, g800.migration_policy, rate)
    assert step.target == big and step.predicted_s is not None
    assert (step.predicted_s, step.verdict) == (dialog.total_s, dialog.verdict)
