"""The `calm` command line: parses arguments and dispatches to library functions."""

from __future__ import annotations

import argparse
import importlib
import sys

from calm.errors import UserError

# Each subcommand lives in calm/commands/<name>.py and defines
#   HELP: str                                   one-line description
#   add_arguments(parser: ArgumentParser) -> None
#   run(args: Namespace) -> int                 exit status
COMMANDS = ("train", "generate", "info", "eval", "pretrain", "reproduce")
# What a user's input causes: one line on stderr and exit status 2. Anything else is a bug in
# calm or below it, and its traceback is shown.
USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError)


def _load(name: str):
    return importlib.import_module(f"calm.commands.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calm", description="Compose frozen causal LMs with learned cross-attention (CALM)."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = _load(name)
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
    except USER_ERRORS as e:
        print(f"calm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"calm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
