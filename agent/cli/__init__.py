"""The technician's command line: thin; it parses arguments and calls the library.

Each module registers its commands on the one typer app; importing them here builds the whole tree,
and the order of the imports is the order of `etims-agent --help`.
"""

from agent.cli import daemon, doctor, audit, outbox, catalogue, receipt, settings, serial, simulate  # noqa: F401, I001
from agent.cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    app()
