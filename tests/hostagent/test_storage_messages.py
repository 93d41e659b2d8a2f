"""The protocol's storage and network messages refuse what an agent must never act on, in plain words."""

import pytest
from pydantic import ValidationError

from agentprotocol import DiskSpec, GuestSpec, NicSpec, plain_words

GUEST_ID = "6f1c3c1e-9a40-4b9e-9a53-5f0d2e0f0a11"


def disk(**fields):
    return {"device": "vda", "pool": "san-a", "volume": "db01.qcow2", "virtual_size_bytes": 1 << 30, **fields}


def refusal(model, **fields) -> str:
    with pytest.raises(ValidationError) as raised:
        model(**fields)
    return plain_words(raised.value)


@pytest.mark.parametrize(
    "volume", ["../etc/passwd", "/var/lib/x.qcow2", "a/b", "..", ".hidden", "", "x" * 65]
)
def test_it_refuses_a_volume_that_is_not_a_plain_name_inside_its_pool(volume):
    assert "volume must be 1-64 letters" in refusal(DiskSpec, **disk(volume=volume))


@pytest.mark.parametrize(
    "mac", ["01:00:5e:00:00:01", "00:00:00:00:00:00", "52:54:00:12:34", "zz:54:00:12:34:56"]
)
def test_it_refuses_a_mac_that_is_not_one_card_s_unicast_address(mac):
    assert "unicast MAC" in refusal(NicSpec, network="prod-net", mac=mac)


def test_it_takes_an_upper_case_mac_as_the_same_address():
    assert NicSpec(network="prod-net", mac="52:54:00:AB:CD:EF").mac == "52:54:00:ab:cd:ef"


@pytest.mark.parametrize(
    ("disks", "nics", "words"),
    [
        ([disk(), disk(volume="other.qcow2")], [], "two disks use the same device"),
        ([disk(), disk(device="vdb")], [], "two disks use the same volume"),
        (
            [],
            [{"network": "a", "mac": "52:54:00:00:00:01"}, {"network": "b", "mac": "52:54:00:00:00:01"}],
            "MAC",
        ),
    ],
)
def test_a_guest_cannot_have_two_disks_on_one_device_or_volume_nor_two_cards_with_one_mac(disks, nics, words):
    assert words in refusal(GuestSpec, guest_id=GUEST_ID, name="db01", memory_mib=64, disks=disks, nics=nics)


def test_a_guest_spec_carries_its_disks_and_cards_on_the_wire_and_back():
    spec = GuestSpec(
        guest_id=GUEST_ID,
        name="db01",
        memory_mib=64,
        disks=[disk(create=True)],
        nics=[{"network": "prod-net", "mac": "52:54:00:00:00:01"}],
    )
    again = GuestSpec.model_validate_json(spec.model_dump_json())
    assert again == spec
    assert again.disks[0].create and again.nics[0].model == "virtio"
