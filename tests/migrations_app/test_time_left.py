"""The live panel's time left comes from what is left and the rate measured now (issue 21.1).

QA: "74.4 MB left · 19.5 MB/s" beside "About 3 min 59 s left", then done in 13 s: round 1 was forecast
from the guest's whole memory. These read ``steering.outlook`` on rows built in memory (no agent: the
numbers are the ones an agent reported); ``bench/bench_time_left.py`` scores it against real migrations.
"""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from evacuations.models import Evacuation, EvacuationStep
from evacuations.summary import summarize
from migrations_app.models import Migration
from migrations_app.steering import outlook
from tests.factories import make_migration, make_vm, make_vsp
from vms.models import VSP, VirtualMachine

MB = 1_000_000


def copying(memory_mib: int, **numbers) -> Migration:
    now = timezone.now()
    vm = VirtualMachine(name="db01", memory_mib=memory_mib)
    source = VSP(name="vsp1", agent_driver="simulated")
    fields = {"rounds": 1, "dirty_rate_bytes_s": 0, "bytes_sent": 10 * MB, **numbers}
    return Migration(
        vm=vm, source=source, state="copy", copy_started_at=now - timedelta(seconds=10), **fields
    )


def test_it_reads_round_1_from_the_bytes_left_not_from_the_whole_memory():
    migration = copying(4096, bytes_remaining=round(74.4 * MB), throughput_bytes_s=round(19.5 * MB))
    look = outlook(migration)
    assert look is not None and look.time_left_s is not None
    assert 3.0 < look.time_left_s < 5.0, look.time_left_s  # 74.4 MB at 19.5 MB/s is 3.8 s, not 3 min 59 s


def test_a_big_sparse_guest_at_1_mb_s_says_minutes_of_what_is_written_not_hours():
    """The 16 GiB guest at 1 MB/s that said "312 min" for about 8 minutes of copying."""
    migration = copying(16384, bytes_remaining=480 * MB, throughput_bytes_s=MB)
    look = outlook(migration)
    assert look is not None and look.time_left_s is not None
    assert 7 * 60 < look.time_left_s < 9 * 60, look.time_left_s


def test_what_the_guest_dirtied_since_round_1_began_is_left_for_round_2():
    """A guest writing during round 1: what it dirtied is sent again after round 1, so it adds time."""
    quiet = outlook(copying(1024, bytes_remaining=50 * MB, throughput_bytes_s=10 * MB))
    busy = outlook(copying(1024, bytes_remaining=50 * MB, throughput_bytes_s=10 * MB, dirty_rate_bytes_s=MB))
    assert quiet is not None and busy is not None
    assert quiet.time_left_s is not None and busy.time_left_s is not None
    assert 4.5 < quiet.time_left_s < 5.5, quiet.time_left_s
    # 10 MB of the 50 MB left were dirtied in the 10 s so far: 40 MB of round 1, then what was dirtied.
    assert busy.time_left_s > quiet.time_left_s + 0.5, (quiet.time_left_s, busy.time_left_s)


def test_no_time_is_said_before_the_rate_means_something():
    """The browser test's first reading was "About 28 min left" for an 8 s copy: the agent's figures of
    the Copy's first instant (nothing sent yet, the whole memory left)."""
    fresh = copying(256, bytes_remaining=256 * 2**20, throughput_bytes_s=160_000, bytes_sent=0)
    assert outlook(fresh) is None
    just_started = copying(256, bytes_remaining=8 * MB, throughput_bytes_s=MB)
    just_started.copy_started_at = timezone.now()
    assert outlook(just_started) is None


def test_a_big_guests_started_copy_shows_tenths_not_0_percent():
    """Issue 21.2: a 16 GiB guest showed "Copy 0 %" for about 7 s after Init."""
    from migrations_app.templatetags.migration_tags import shown_percent

    migration = copying(16384, bytes_sent=35 * MB, bytes_remaining=9000 * MB, throughput_bytes_s=5 * MB)
    assert shown_percent(migration, "running", 0) == "0.4"
    assert shown_percent(migration, "running", 37) == "37"
    assert shown_percent(migration, "done", 100) == "100"
    assert shown_percent(copying(256, bytes_sent=242, bytes_remaining=8 * MB), "running", 0) == "<0.1"


@pytest.mark.django_db
def test_an_evacuation_never_says_0_s_left_while_a_guest_still_moves(admin_client):
    """QA: "Time left: 0 s" while a guest past its forecast still copied. Past its forecast a running
    step counts its migration's live estimate, or the time left is unknown; under a second it is about
    to finish (the page and the API say the same words)."""
    home, away = make_vsp("home"), make_vsp("away")
    evacuation = Evacuation.objects.create(vsp=home, requested_by_name="ann")
    vm = make_vm("slow01", vsp=home)
    migration = make_migration(
        vm, home, away, state="copy", init_started_at=timezone.now() - timedelta(seconds=60)
    )
    EvacuationStep.objects.create(
        evacuation=evacuation,
        position=1,
        vm=vm,
        vm_name=vm.name,
        target=away,
        migration=migration,
        predicted_s=30,
    )
    panel = reverse("evacuations:evacuation_progress", args=[evacuation.pk])

    assert '<span id="evacuation-time-left">unknown</span>' in admin_client.get(panel).text
    assert summarize(evacuation).time_left_words == "unknown"  # past its forecast, no live rate yet

    Migration.objects.filter(pk=migration.pk).update(
        copy_started_at=timezone.now() - timedelta(seconds=20),
        bytes_sent=100 * MB,
        bytes_remaining=50 * MB,
        throughput_bytes_s=10 * MB,
        rounds=2,
    )
    live = summarize(evacuation)
    assert live.time_left_s is not None and 3 < live.time_left_s < 10, live.time_left_s  # 50 MB at 10 MB/s
    assert live.time_left_words.endswith(" s")

    Migration.objects.filter(pk=migration.pk).update(init_started_at=timezone.now() - timedelta(seconds=29.5))
    assert summarize(evacuation).time_left_words == "about to finish"
    answer = admin_client.get(f"/api/v1/evacuations/{evacuation.pk}").json()
    assert answer["time_left"] == "about to finish", answer


@pytest.mark.django_db
def test_the_live_rate_is_the_last_seconds_and_the_average_since_copy_is_labelled_so(
    admin_client, monkeypatch
):
    """QA: the panel's rate was the agent's average since the start, so a link that slowed from 10 to
    1 MiB/s still read about 7 MiB/s. The live rate is the last 5 s of bytes sent; the average is shown
    apart, labelled as one."""
    from agentprotocol import ProgressSnapshot
    from migrations_app import records

    source, target = make_vsp("vsp1"), make_vsp("vsp2")
    vm = make_vm("db01", source)
    started = timezone.now() - timedelta(seconds=15)
    migration = make_migration(
        vm, source, target, state="copy", init_started_at=started, copy_started_at=started
    )
    record = records.ProgressRecord(migration, lease=None)
    clock = [1000.0]
    monkeypatch.setattr(records.time, "monotonic", lambda: clock[0])
    sent = 0
    for second in range(15):  # 10 s at 10 MiB/s, then 5 s at 1 MiB/s
        sent += (10 if second < 10 else 1) << 20
        clock[0] += 1.0
        average = sent / (second + 1)  # what an agent reporting its average since the start says
        snapshot = ProgressSnapshot(
            seq=second + 1,
            migration_id="m-1",
            role="source",
            guest=str(vm.guest_id),
            state="copy",
            bytes_sent=sent,
            bytes_remaining=64 << 20,
            round=1,
            throughput_bytes_s=round(average),
        )
        record.take(snapshot)
    copy_began = timezone.now() - timedelta(seconds=15)  # the readings' 15 s, ending now
    Migration.objects.filter(pk=migration.pk).update(
        **records.progress_fields(migration), copy_started_at=copy_began
    )

    page = admin_client.get(reverse("vms:vm_general", args=[vm.pk])).text
    assert 'Throughput, last 5 s</dt><dd data-field="throughput">1.0\xa0MB/s</dd>' in page, page
    average = re.search(
        r'Average since Copy began</dt><dd data-field="average_throughput">([\d.]+)\xa0MB/s<', page
    )
    assert average and 6.5 <= float(average.group(1)) <= 7.0, page  # 105 MiB over the 15 s since Copy began
