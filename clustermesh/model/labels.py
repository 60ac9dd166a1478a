"""Labels and the label strings that are the values of `cilium/state/identities/v1/id/<id>`.

A label is `source:key=value` (source `k8s`, `reserved`, `cidr`, ...). An identity's value in etcd is all its
labels as `source:key=value;`, sorted bytewise by key (the source is not part of the order), each with its `=`
even when the value is empty, and a trailing `;` (Cilium's `Labels.SortedList`):

    k8s:app=web;k8s:io.cilium.k8s.policy.cluster=c1;k8s:io.kubernetes.pod.namespace=default;

Labels are keyed by key: two labels with the same key and different sources collapse into one, as in Cilium.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

__all__ = [
    "CLUSTER_LABEL",
    "NAMESPACE_LABEL",
    "Label",
    "format_label_string",
    "labels_from_security_map",
    "parse_label",
    "parse_label_string",
]

CLUSTER_LABEL = "io.cilium.k8s.policy.cluster"
NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
SERVICE_ACCOUNT_LABEL = "io.cilium.k8s.policy.serviceaccount"
SOURCE_K8S = "k8s"
SOURCE_RESERVED = "reserved"
SOURCE_UNSPEC = "unspec"


class Label(NamedTuple):
    source: str
    key: str
    value: str

    def __str__(self) -> str:
        return f"{self.source}:{self.key}={self.value}"


def parse_label(text: str) -> Label:
    """`source:key=value` (Cilium's ParseLabel): no `:` means source `unspec`; a leading `$` means `reserved`."""
    source = SOURCE_UNSPEC
    rest = text
    if rest.startswith("$"):
        source, rest = SOURCE_RESERVED, rest[1:]
    elif ":" in rest:
        head, _, tail = rest.partition(":")
        if "=" not in head:  # a ':' inside the value (e.g. an IPv6 CIDR) is not a source separator
            source, rest = head, tail
    key, _, value = rest.partition("=")
    if key.startswith("reserved."):
        source, key = SOURCE_RESERVED, key[len("reserved.") :]
    return Label(source, key, value)


def labels_from_security_map(security_labels: Mapping[str, str]) -> list[Label]:
    """The labels of a CiliumIdentity's `security-labels` map (`{"k8s:app": "web"}`), one per key."""
    by_key: dict[str, Label] = {}
    for source_key, value in security_labels.items():
        label = parse_label(f"{source_key}={value}")
        by_key[label.key] = label
    return list(by_key.values())


def format_label_string(labels: Iterable[Label]) -> str:
    """The kvstore form: `source:key=value;` per label, sorted by key, last one wins for a repeated key."""
    by_key = {label.key: label for label in labels}
    return "".join(f"{label.source}:{label.key}={label.value};" for label in (by_key[k] for k in sorted(by_key)))


def parse_label_string(text: str) -> list[Label]:
    """Labels of a kvstore label string; empty parts (the trailing one) are skipped."""
    return [label for label in (parse_label(part) for part in text.split(";") if part) if label.key]
