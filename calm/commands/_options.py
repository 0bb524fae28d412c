"""Command-line options that each set one config field, typed and defaulted from that field."""

from __future__ import annotations

import argparse

# An option table: {flag: (config field, help)}, in the order the flags appear in --help.
Options = dict[str, tuple[str, str]]


def add_config_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    defaults: object,
    options: Options,
    choices: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """Add each flag of `options` with `defaults.<field>` as its default, parsed to that value's
    type (a string stays as given; a bool field becomes a `store_true` switch); `choices` names
    the allowed values of some fields."""
    for flag, (name, help) in options.items():
        default = getattr(defaults, name)
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=default, help=help)
            continue
        kwargs = {"choices": choices[name]} if choices and name in choices else {}
        if not isinstance(default, str):
            kwargs["type"] = type(default)
        parser.add_argument(flag, default=default, help=help, **kwargs)


def config_values(args: argparse.Namespace, options: Options) -> dict:
    """{config field: parsed value} for the flags of `options`."""
    return {name: getattr(args, flag[2:].replace("-", "_")) for flag, (name, _) in options.items()}
