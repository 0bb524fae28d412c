"""Subcommands of the `calm` command line, one module each."""
