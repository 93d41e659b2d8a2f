"""/metrics counts each storage pool's free bytes, per VSP, from the inventory."""

from __future__ import annotations

import pytest

from tests.api.test_metrics import scrape
from tests.factories import GIB, make_pool, make_vsp

pytestmark = pytest.mark.django_db


def test_it_reports_each_pools_free_and_total_bytes(settings):
    settings.METRICS_ALLOWED_IPS = ["10.0.0.0/8"]
    make_pool(make_vsp("vsp1"), "san-a", identity="lun7", free_bytes=3 * GIB, capacity_bytes=8 * GIB)
    make_pool(make_vsp("vsp2"), "scratch", kind="local", identity="local-vsp2-1", free_bytes=GIB)

    text = scrape("10.1.2.3").content.decode()

    assert (
        'matrixoe_storage_pool_free_bytes{identity="lun7",kind="shared",pool="san-a",vsp="vsp1"} '
        "3.221225472e+09" in text
    )
    assert (
        'matrixoe_storage_pool_capacity_bytes{identity="lun7",kind="shared",pool="san-a",vsp="vsp1"} '
        "8.589934592e+09" in text
    )
    assert (
        'matrixoe_storage_pool_free_bytes{identity="local-vsp2-1",kind="local",pool="scratch",vsp="vsp2"}'
        in text
    )
