"""The core model's errors: one type for a bad value read from the store, one for a bad setting.

`InvalidValue` names the key it came from and the reason, so that a reader can count and log it and go on with the
other keys (DESIGN section 4: a malformed value is an error for that key alone).
"""

from __future__ import annotations

__all__ = ["InvalidClusterInfo", "InvalidValue", "ModelError", "NotOwned"]


class ModelError(ValueError):
    """Base of the core model's errors."""


class InvalidValue(ModelError):
    """A value (or key) that cannot be decoded or does not belong where it was found."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


class NotOwned(InvalidValue):
    """A well-formed value that names addresses its cluster does not own, now. Its reader holds the decoded
    `value` and admits it again when ownership changes (the node that brings its pod CIDR arrives, a conflicting
    claim goes away)."""

    def __init__(self, key: str, reason: str, value: object) -> None:
        super().__init__(key, reason)
        self.value = value


class InvalidClusterInfo(ModelError):
    """A cluster name, ID or `max-connected-clusters` setting that breaks the rules of DESIGN section 4."""
