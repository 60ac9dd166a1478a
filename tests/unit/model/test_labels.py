from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from clustermesh.model.labels import (
    Label,
    format_label_string,
    labels_from_security_map,
    parse_label,
    parse_label_string,
)


def test_security_labels_format_as_cilium_sorted_list() -> None:
    labels = labels_from_security_map(
        {
            "k8s:io.kubernetes.pod.namespace": "bar",
            "k8s:app": "baz",
            "k8s:io.cilium.k8s.policy.cluster": "cluster3",
        }
    )
    assert (
        format_label_string(labels)
        == "k8s:app=baz;k8s:io.cilium.k8s.policy.cluster=cluster3;k8s:io.kubernetes.pod.namespace=bar;"
    )


def test_order_is_by_key_not_by_source_and_empty_values_keep_their_equals_sign() -> None:
    labels = [Label("reserved", "host", ""), Label("k8s", "app", "x"), Label("cidr", "10.0.0.0/8", "")]
    assert format_label_string(labels) == "cidr:10.0.0.0/8=;k8s:app=x;reserved:host=;"


def test_parse_label_forms() -> None:
    assert parse_label("k8s:app=web") == Label("k8s", "app", "web")
    assert parse_label("app=web") == Label("unspec", "app", "web")
    assert parse_label("$host") == Label("reserved", "host", "")
    assert parse_label("reserved:world=") == Label("reserved", "world", "")
    assert parse_label("cidr:fd00::/8=") == Label("cidr", "fd00::/8", "")


_text = st.text(alphabet=st.characters(blacklist_characters=";=:$", blacklist_categories=("Cs",)), min_size=1)


@given(
    st.dictionaries(_text.filter(lambda k: not k.startswith("reserved.")), st.text(alphabet="abc-._/019", max_size=8))
)
def test_label_strings_round_trip(pairs: dict[str, str]) -> None:
    labels = [Label("k8s", key, value) for key, value in pairs.items()]
    text = format_label_string(labels)
    assert sorted(parse_label_string(text)) == sorted(labels)
    assert format_label_string(parse_label_string(text)) == text
