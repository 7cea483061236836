"""Subcommands of ``python -m tinyq``: each module exposes ``add_parser(subparsers)`` and ``run(args) -> int``."""
