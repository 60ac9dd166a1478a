"""Label selectors, as Kubernetes and Cilium write them: `matchLabels` and `matchExpressions` (In, NotIn, Exists,
DoesNotExist), all of which must hold; the empty selector selects everything.

Cilium's selectors may name a label with its source (`k8s:app`, `any:app`): the source is dropped here, since every
label a selector is matched against is a Kubernetes one. A selector that cannot be read raises `PolicyError`,
naming the field (`spec.podSelector.matchExpressions[0].operator`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from clustermesh.model.errors import ModelError

__all__ = ["LabelSelector", "PolicyError", "Requirement", "strip_source"]

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_SOURCES = ("k8s:", "any:")


class PolicyError(ModelError):
    """A policy (or a selector in it) that cannot be read; `field` is the path to the culprit."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


def strip_source(key: str) -> str:
    """`k8s:app` and `any:app` are `app` (the labels matched here are all Kubernetes ones)."""
    for source in _SOURCES:
        if key.startswith(source):
            return key[len(source) :]
    return key


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return labels.get(self.key) in self.values
        if self.operator == "NotIn":
            return labels.get(self.key) not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels


def _check_key(key: Any, field: str) -> str:
    if not isinstance(key, str) or not key:
        raise PolicyError(field, "a label key must be a non-empty string")
    plain = strip_source(key)
    if plain.startswith("reserved:") or key.startswith("reserved:"):
        raise PolicyError(field, f"{key!r}: reserved labels are selected with entities (fromEntities, toEntities)")
    if len(plain) > 317 or not _KEY.match(plain):
        raise PolicyError(field, f"{key!r} is not a valid label key")
    return plain


def _check_value(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise PolicyError(field, f"a label value must be a string, not {type(value).__name__}")
    if len(value) > 63 or not _VALUE.match(value):
        raise PolicyError(field, f"{value!r} is not a valid label value")
    return value


@dataclass(frozen=True)
class LabelSelector:
    """Requirements that must all hold; none: everything."""

    requirements: tuple[Requirement, ...] = ()

    @classmethod
    def parse(cls, document: Any, field: str) -> LabelSelector:
        if document is None:
            return cls()
        if not isinstance(document, dict):
            raise PolicyError(field, f"a label selector must be a mapping, not {type(document).__name__}")
        unknown = set(document) - {"matchLabels", "matchExpressions"}
        if unknown:
            raise PolicyError(f"{field}.{sorted(unknown)[0]}", "unknown field (a selector has matchLabels and "
                              "matchExpressions)")  # fmt: skip
        requirements: list[Requirement] = []
        labels = document.get("matchLabels") or {}
        if not isinstance(labels, dict):
            raise PolicyError(f"{field}.matchLabels", "must be a mapping of label keys to values")
        for key, value in labels.items():
            plain = _check_key(key, f"{field}.matchLabels[{key}]")
            requirements.append(
                Requirement(plain, "In", frozenset({_check_value(value, f"{field}.matchLabels[{key}]")}))
            )
        expressions = document.get("matchExpressions") or []
        if not isinstance(expressions, list):
            raise PolicyError(f"{field}.matchExpressions", "must be a list")
        for index, expression in enumerate(expressions):
            path = f"{field}.matchExpressions[{index}]"
            if not isinstance(expression, dict):
                raise PolicyError(path, "must be a mapping with key, operator and values")
            unknown = set(expression) - {"key", "operator", "values"}
            if unknown:
                raise PolicyError(f"{path}.{sorted(unknown)[0]}", "unknown field")
            plain = _check_key(expression.get("key"), f"{path}.key")
            operator = expression.get("operator")
            if operator not in OPERATORS:
                raise PolicyError(f"{path}.operator", f"{operator!r} must be one of {', '.join(OPERATORS)}")
            values = expression.get("values") or []
            if not isinstance(values, list):
                raise PolicyError(f"{path}.values", "must be a list of strings")
            checked = frozenset(_check_value(v, f"{path}.values[{i}]") for i, v in enumerate(values))
            if operator in ("In", "NotIn") and not checked:
                raise PolicyError(f"{path}.values", f"{operator} needs at least one value")
            if operator in ("Exists", "DoesNotExist") and checked:
                raise PolicyError(f"{path}.values", f"{operator} takes no values")
            requirements.append(Requirement(plain, operator, checked))
        return cls(tuple(requirements))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(requirement.matches(labels) for requirement in self.requirements)

    def mentions(self, key: str) -> bool:
        """Whether some requirement is about `key` (a selector that names the cluster or the namespace)."""
        return any(requirement.key == key for requirement in self.requirements)

    def and_(self, *requirements: Requirement) -> LabelSelector:
        return LabelSelector(self.requirements + requirements)

    def __str__(self) -> str:
        if not self.requirements:
            return "{}"
        parts = []
        for r in self.requirements:
            if r.operator == "In" and len(r.values) == 1:
                parts.append(f"{r.key}={next(iter(r.values))}")
            elif r.operator in ("In", "NotIn"):
                parts.append(f"{r.key} {r.operator.lower()} ({','.join(sorted(r.values))})")
            else:
                parts.append(("" if r.operator == "Exists" else "!") + r.key)
        return ",".join(parts)
