"""``twilightc``: the command line of twilight.

Each sub-command lives in its own module with ``register(subparsers)``; adding a command is
one new file and one line in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from .. import knobs
from ..errors import TwilightError
from . import cache_cmd, calibrate_cmd, compile_cmd, eval_cmd, logs_cmd, tune_cmd
from .args import UsageError

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
  ./selectors.py:pipelines[name]        one entry of a dict of pipelines
Built-ins: dense, quest_top_k, quest_twilight, oracle_top_k, streaming, double_sparsity,
ds_twilight, sparq, loki.
"""

EPILOG = """\
environment:
  TWILIGHT_DEBUG=1   show full Python tracebacks instead of one-line errors

exit status:
  0 success, 1 a twilight error (bad pipeline, bad input, a failed tune, a file that cannot
  be read or written), 2 bad command line (or an environment knob that holds nonsense)

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
    """Run one command. Errors are one line on stderr — exit 1 for a twilight error or a file
    system one, 2 for a bad command line or environment knob — and a full traceback with
    ``TWILIGHT_DEBUG=1``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        debug = knobs.debug()
        for knob in knobs.KNOBS.values():
            knob.get()  # a knob that holds nonsense is a usage error, said up front
    except knobs.KnobError as e:
        parser.exit(2, f"twilightc: error: {e}\n")
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            return args.run(args) or 0
    except UsageError as e:
        if debug:
            raise
        parser.exit(2, f"twilightc {args.command}: error: {e}\n")
    except TwilightError as e:
        if debug:
            raise
        print(f"twilightc {args.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a file or folder that cannot be read or written: no traceback
        if debug:
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"twilightc {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"twilightc {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as ``twilightc: warning: ...`` (not the file:line of twilight's code)."""
    print(f"twilightc: warning: {message}", file=file or sys.stderr)
