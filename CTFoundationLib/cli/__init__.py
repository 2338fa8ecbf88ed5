"""The `ctfoundation` command line: a thin shell over the library. Each module of this package adds one group of
sub-commands through `register(subparsers)`: it parses arguments, calls the library and prints."""

from __future__ import annotations

import argparse
import sys

from CTFoundationLib import __version__
from CTFoundationLib.errors import report_errors
from CTFoundationLib.host.allocator import reuse_freed_memory

# The modules of this package, each one group of sub-commands.
COMMAND_GROUPS = ("ct", "ctclip", "retrieval", "weights", "ground", "report", "labels", "chat")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctfoundation", description="Chest-CT foundation models, headless.")
    parser.add_argument("--version", action="version", version=f"ctfoundation {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from importlib import import_module

    for name in COMMAND_GROUPS:
        import_module(f".{name}", __package__).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    reuse_freed_memory()
    return report_errors(lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
