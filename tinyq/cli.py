"""Command-line entry point: ``python -m tinyq <command> ...`` (or the ``tinyq`` script).

Subcommands live in ``tinyq.commands.<name>`` modules, each exposing ``add_parser(subparsers)`` and
``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

COMMANDS = ("chat", "quantize", "eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinyq", description="4-bit LLMs on any GPU Triton supports.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"tinyq.commands.{name}")
        module.add_parser(sub)
        if name in sub.choices:  # dispatch on the module's run(), whatever add_parser named its parser
            sub.choices[name].set_defaults(run=module.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
