"""Storage in the API: pools and networks on the VSP list (a fixed number of queries), pools in /metrics."""

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


def test_the_vsp_list_shows_pools_and_networks_in_a_fixed_number_of_queries(django_assert_max_num_queries):
    from api.tokens import do_create_token
    from tests.api.conftest import READ_ONLY, ApiClient
    from tests.factories import make_network, make_user

    api = ApiClient(do_create_token(make_user("olga", permissions=READ_ONLY), "t")[1])
    for number in range(6):
        vsp = make_vsp(f"vsp{number}")
        make_pool(vsp, "san-a", identity="lun7")
        make_network(vsp, "prod-net")

    with django_assert_max_num_queries(12):
        items = api.get("/vsps").json()["items"]

    assert [(vsp["pools"][0]["identity"], vsp["networks"][0]["name"]) for vsp in items] == [
        ("lun7", "prod-net")
    ] * 6
