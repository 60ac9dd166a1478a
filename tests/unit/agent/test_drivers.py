"""The pure parts of the routing drivers: VXLAN MACs and VTEPs, and the WireGuard MTU."""

from __future__ import annotations

import ipaddress

from agent.datapath.drivers import UNDERLAY_MTU, vtep_ip, vxlan_mac, wireguard_mtu


def test_a_vxlan_mac_is_stable_for_an_ip() -> None:
    """Every node computes a peer's MAC on its own: they must all get the same one, across restarts too."""
    assert vxlan_mac("192.168.2.11") == vxlan_mac("192.168.2.11") == "0e:cd:c0:a8:02:0b"


def test_a_vxlan_mac_is_unicast_and_locally_administered() -> None:
    """A multicast source MAC is invalid; a globally administered one could clash with a real NIC's."""
    for ip in ("192.168.1.11", "10.0.0.1", "255.255.255.255", "0.0.0.0"):
        mac = vxlan_mac(ip)
        octets = [int(part, 16) for part in mac.split(":")]
        assert len(octets) == 6
        assert octets[0] & 0x01 == 0, f"{mac} is a multicast address"
        assert octets[0] & 0x02 == 0x02, f"{mac} is not locally administered"


def test_vxlan_macs_differ_for_different_ips() -> None:
    """Two nodes with one MAC would get each other's frames: the MAC carries the whole underlay address."""
    ips = [str(ip) for ip in ipaddress.ip_network("192.168.0.0/22")]
    macs = {vxlan_mac(ip) for ip in ips}
    assert len(macs) == len(ips)
    assert vxlan_mac("10.1.2.3") != vxlan_mac("10.3.2.1")


def test_the_vtep_is_the_network_address_of_the_pod_cidr() -> None:
    assert vtep_ip("10.2.1.0/24") == "10.2.1.0"
    assert vtep_ip("10.2.1.77/24") == "10.2.1.0"
    assert vtep_ip("10.2.0.0/16") == "10.2.0.0"


def test_the_wireguard_mtu_leaves_room_for_a_1400_byte_packet() -> None:
    """A pod's 1400-byte packet fits the tunnel, and the tunnel's packet fits the underlay even over IPv6."""
    outer_ipv6, udp, wireguard = 40, 8, 32
    assert wireguard_mtu() >= 1400
    assert wireguard_mtu() + outer_ipv6 + udp + wireguard <= UNDERLAY_MTU == 1500
