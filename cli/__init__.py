"""``twilightc``: the command line of twilight.

Each sub-command lives in its own module with ``register(subparsers)``; adding a command is
one new file and one line in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import sys

from .. import knobs
from ..errors import TwilightError
from . import cache_cmd, calibrate_cmd, compile_cmd, eval_cmd, logs_cmd, tune_cmd

COMMANDS = (eval_cmd, calibrate_cmd, tune_cmd, compile_cmd, cache_cmd, logs_cmd)

DESCRIPTION = """\
twilightc compiles, tunes and evaluates sparse-attention decode pipelines: a token selector
(Quest, Double Sparsity, oracle top-k, StreamingLLM, or your own, written in the twilight
DSL), pruners (Twilight's top-p over low-bit key estimates), and sparse attention over a
paged KV cache.

A PIPELINE is named as:
  quest_twilight                        a built-in with its defaults
  'quest_twilight(p=0.85, budget=2048)' a built-in with arguments
  my_pkg.selectors:pipe                 an attribute of an importable module
  ./selectors.py:pipe                   an attribute of a Python file
Built-ins: dense, quest_top_k, quest_twilight, oracle_top_k, streaming, double_sparsity,
ds_twilight.
"""

EPILOG = """\
environment:
  TWILIGHT_DEBUG=1   show full Python tracebacks instead of one-line errors

exit status:
  0 success, 1 a twilight error (bad pipeline, bad input), 2 bad command line

See 'twilightc COMMAND --help' for each command.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twilightc", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="twilightc 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        cmd.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except TwilightError as e:
        if knobs.debug():
            raise
        print(f"twilightc {args.command}: error: {e}", file=sys.stderr)
        return 1
