"""The `calm` command line: parses arguments and dispatches to library functions."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each subcommand lives in calm/commands/<module>.py and defines
#   HELP: str                                   one-line description
#   add_arguments(parser: ArgumentParser) -> None
#   run(args: Namespace) -> int                 exit status
COMMANDS = {
    "train": "train",
    "generate": "generate",
    "info": "info",
    "eval": "eval",
    "pretrain": "pretrain",
    "reproduce": "reproduce",
}


class CLIError(Exception):
    """A user-facing error: printed as one line on stderr, exit status 2."""


def _load(name: str):
    try:
        return importlib.import_module(f"calm.commands.{COMMANDS[name]}")
    except ModuleNotFoundError as e:
        if e.name == f"calm.commands.{COMMANDS[name]}":
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calm", description="Compose frozen causal LMs with learned cross-attention (CALM)."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = _load(name)
        if module is None:
            continue
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (CLIError, ValueError, TypeError, FileNotFoundError, NotADirectoryError) as e:
        print(f"calm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"calm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
