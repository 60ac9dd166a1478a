from __future__ import annotations

import pytest

from clustermesh.model.clusters import ClusterInfo, validate_cluster_id, validate_cluster_name
from clustermesh.model.errors import InvalidClusterInfo
from clustermesh.model.identities import cluster_id_of, cluster_id_shift, identity_range, is_reserved


@pytest.mark.parametrize("name", ["a", "c1", "cluster-3", "0", "a" * 32, "x-y-z"])
def test_valid_cluster_names(name: str) -> None:
    assert validate_cluster_name(name) == name


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty"),
        ("a" * 33, "at most 32"),
        ("-a", "invalid"),
        ("a-", "invalid"),
        ("Cluster", "invalid"),
        ("a_b", "invalid"),
        ("a.b", "invalid"),
    ],
)
def test_invalid_cluster_names_say_why(name: str, reason: str) -> None:
    with pytest.raises(InvalidClusterInfo, match=reason):
        validate_cluster_name(name)


def test_cluster_id_ranges_for_both_mesh_sizes() -> None:
    assert validate_cluster_id(255) == 255
    with pytest.raises(InvalidClusterInfo, match="between 1 and 255"):
        validate_cluster_id(256)
    with pytest.raises(InvalidClusterInfo, match="between 1 and 255"):
        validate_cluster_id(0)
    assert validate_cluster_id(511, max_connected_clusters=511) == 511
    with pytest.raises(InvalidClusterInfo, match="between 1 and 511"):
        validate_cluster_id(512, max_connected_clusters=511)
    with pytest.raises(InvalidClusterInfo, match="must be one of 255, 511"):
        validate_cluster_id(1, max_connected_clusters=300)
    with pytest.raises(InvalidClusterInfo, match="not an integer"):
        validate_cluster_id(True)  # type: ignore[arg-type]


def test_cluster_info_is_valid_by_construction() -> None:
    assert ClusterInfo("c1", 1).max_connected_clusters == 255
    with pytest.raises(InvalidClusterInfo):
        ClusterInfo("C1", 1)


def test_identity_ranges() -> None:
    assert cluster_id_shift(255) == 16
    assert cluster_id_shift(511) == 15
    r3 = identity_range(3)
    assert (r3.first, r3.last) == (196608, 262143)
    assert 196915 in r3 and 199472 in r3 and 214794 in r3
    assert 262144 not in r3 and 196607 not in r3
    assert r3.allocatable_first == 196608 + 256
    r3_511 = identity_range(3, 511)
    assert (r3_511.first, r3_511.last) == (3 << 15, (4 << 15) - 1)
    assert identity_range(511, 511).last == (1 << 24) - 1
    assert cluster_id_of(199472) == 3
    assert cluster_id_of(3 << 15, 511) == 3
    assert is_reserved(2) and is_reserved(255) and not is_reserved(256) and not is_reserved(0)
