"""The `ctfoundation` command line: a thin shell over the library. Each module of this package adds one group of
sub-commands through `register(subparsers)`: it parses arguments, calls the library and prints."""

from __future__ import annotations

import argparse
import sys

from CTFoundationLib import __version__
from CTFoundationLib.errors import report_errors
from CTFoundationLib.host.allocator import reuse_freed_memory

# The modules of this package, each one group of sub-commands, and the sub-commands each registers. A command line
# builds the parser of its own group only, so that a command imports what it needs and no more (`detect` never
# imports transformers); `--help` and unknown commands build them all.
COMMAND_GROUPS: dict[str, tuple[str, ...]] = {
    "ct": ("info", "preprocess"),
    "ctclip": ("detect", "embed", "embed-text"),
    "retrieval": ("index", "search", "retrieval-metrics"),
    "weights": ("weights",),
    "ground": ("ground",),
    "report": ("report",),
    "labels": ("label-reports",),
    "chat": ("chat",),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `ctfoundation` parser: with `command`, only the group that registers it (all when none does)."""
    parser = argparse.ArgumentParser(prog="ctfoundation", description="Chest-CT foundation models, headless.")
    parser.add_argument("--version", action="version", version=f"ctfoundation {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from importlib import import_module

    groups = [group for group, commands in COMMAND_GROUPS.items() if command in commands] or COMMAND_GROUPS
    for name in groups:
        import_module(f".{name}", __package__).register(subparsers)
    return parser


def command_of(argv: list[str]) -> str | None:
    """The sub-command a command line names: its first word that is not an option."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(command_of(argv)).parse_args(argv)
    reuse_freed_memory()
    return report_errors(lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
