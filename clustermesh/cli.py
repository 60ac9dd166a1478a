"""The `clustermesh` command."""

import click


@click.group()
def cli() -> None:
    """clustermesh."""


def main() -> None:
    cli()
