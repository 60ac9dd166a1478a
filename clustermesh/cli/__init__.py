"""The `clustermesh` command: thin click commands that validate, call the async core once, and render.

One module per command group; `root` holds the group itself and what the commands share. Importing this package
registers every command.
"""

from clustermesh.cli import (
    certs,
    connect,
    contexts,
    demo,
    enable,
    etcd,
    lab,
    policy,
    resources,
    services,
    status,
    troubleshoot,
    ui,
)
from clustermesh.cli.root import Controls, cli, main

__all__ = ["Controls", "cli", "main"]

_COMMANDS = (
    certs,
    connect,
    contexts,
    demo,
    enable,
    etcd,
    lab,
    policy,
    resources,
    services,
    status,
    troubleshoot,
    ui,
)  # imported for their registrations
