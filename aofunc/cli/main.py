"""python -m aofunc COMMAND: the demo, and quantizing and evaluating Hugging Face checkpoints."""
from __future__ import annotations

import argparse
import sys

from aofunc.cli import demo, evaluate, quantize
from aofunc.cli.errors import UsageError

COMMANDS = {"demo": demo, "quantize": quantize, "eval": evaluate}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aofunc", description=__doc__.splitlines()[0])
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        module.add_arguments(commands.add_parser(name, help=module.__doc__.splitlines()[0],
                                                 description=module.__doc__))
    return p


def main(argv=None) -> int:
    """Runs one command; returns the exit status (0 ok, 1 a method failed, 2 bad input)."""
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except UsageError as e:
        print(f"python -m aofunc {args.command}: error: {e}", file=sys.stderr)
        return 2
