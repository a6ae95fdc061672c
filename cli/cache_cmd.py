"""``twilightc cache``: list, inspect, verify and clear the kernel cache."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import timedelta

from rich.console import Console
from rich.table import Table

from .args import number

HELP = "list, inspect, verify or clear the compiled-kernel cache"

DESCRIPTION = """\
twilight keeps every kernel it compiles in a cache directory ($TWILIGHT_CACHE_DIR, default
$XDG_CACHE_HOME/twilight or ~/.cache/twilight), one entry per key:

  kernels/<key[:2]>/<key>/   the backend's files and a manifest.json: the inputs of the
                             key, each file's size and sha256, when it was built

A KEY is the sha256 of everything that can change the compiled code: the pipeline's IR key,
the schedule, the target, the backend and the versions of twilight and its toolchain (torch,
triton, tvm, nvcc). Commands that take a KEY accept any unique prefix of it.

actions:
  ls                 every entry: key, kernel, backend, target, files, size, age
  info KEY           one entry: its manifest, the inputs of its key, its files, checked
  verify [--fix]     check every entry's files against its manifest; --fix removes bad ones
  clear              remove entries (all, or --older-than DAYS); asks first unless --yes

A damaged entry is harmless: twilight detects it when loading, warns, and rebuilds it.
"""

EPILOG = """\
examples:
  twilightc cache ls
  twilightc cache info 3fa2c1
  twilightc cache verify --fix
  twilightc cache clear --older-than 30 --yes
  TWILIGHT_CACHE_DIR=/opt/kernels twilightc cache ls   # a cache shipped for production

environment:
  TWILIGHT_CACHE_DIR          the cache directory (also: --cache-dir DIR)
  TWILIGHT_DISABLE_COMPILE=1  a cache miss is an error instead of a compile

exit status:
  0 success; 1 verify found damaged entries (without --fix), clear was refused, or a KEY
  matched no entry or several; 2 bad command line
"""


def register(sub) -> None:
    p = sub.add_parser("cache", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", metavar="DIR",
                        help="the cache directory (default: $TWILIGHT_CACHE_DIR)")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = actions.add_parser("ls", parents=[common], help="list the entries")
    a.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    a = actions.add_parser("info", parents=[common], help="show one entry")
    a.add_argument("key", metavar="KEY", help="a key or a unique prefix of one")
    a.add_argument("--json", action="store_true", help="print the manifest as JSON")
    a = actions.add_parser("verify", parents=[common], help="check every entry's checksums")
    a.add_argument("--fix", action="store_true", help="remove the entries that fail")
    a = actions.add_parser("clear", parents=[common], help="remove entries")
    a.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    a.add_argument("--older-than", type=number(0, strict=False, maximum=1e6), metavar="DAYS",
                   help="remove only entries built more than DAYS days ago (DAYS ≥ 0)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..runtime.store.kernel_cache import KernelCache

    cache = KernelCache(args.cache_dir)
    return {"ls": _ls, "info": _info, "verify": _verify, "clear": _clear}[args.action](cache,
                                                                                      args)


def _ls(cache, args) -> int:
    entries = cache.ls()
    if args.json:
        rows = [{"key": e.key, "path": str(e.path), "created": e.created, "size": e.size,
                 "describe": e.describe, "inputs": e.manifest.get("inputs"),
                 "files": sorted(e.files), "problem": e.problem} for e in entries]
        print(json.dumps(rows, indent=1, default=str))
        return 0
    out = Console(soft_wrap=True)
    if not entries:
        out.print(f"kernel cache {cache.root} is empty")
        return 0
    table = Table("key", "kernel", "backend", "target", "files", "size", "age")
    for e in entries:
        inputs = e.manifest.get("inputs") or {}
        if e.problem:
            table.add_row(e.key[:16], f"[red]damaged: {e.problem}[/]", "", "", "", "", "")
            continue
        table.add_row(e.key[:16], _describe(e.describe), str(inputs.get("backend", "?")),
                      str(inputs.get("target", "?")), str(len(e.files)), _size(e.size),
                      _age(e.created))
    out.print(table)
    out.print(f"{len(entries)} entries, {_size(cache.size_bytes())} in {cache.root}")
    return 0


def _info(cache, args) -> int:
    e = cache.info(args.key)
    if args.json:
        print(json.dumps({"path": str(e.path), "problem": e.problem, **e.manifest},
                         indent=1, default=str))
        return 0 if e.problem is None else 1
    out = Console(soft_wrap=True)
    status = "[green]ok[/]" if e.problem is None else f"[red]damaged: {e.problem}[/]"
    out.print(f"[bold]key[/]      {e.key}\n[bold]path[/]     {e.path}\n"
              f"[bold]status[/]   {status}\n"
              f"[bold]built[/]    {e.manifest.get('created_utc', '?')} ({_age(e.created)} ago)"
              f" by twilight {e.manifest.get('twilight_version', '?')}\n"
              f"[bold]kernel[/]   {_describe(e.describe) or '—'}")
    out.print("[bold]inputs of the key[/]")
    out.print_json(json.dumps(e.manifest.get("inputs"), default=str))
    table = Table("file", "size", "sha256")
    for name, meta in sorted(e.manifest.get("files", {}).items()):
        table.add_row(name, _size(int(meta.get("size", 0))), str(meta.get("sha256", "?")))
    out.print(table)
    return 0 if e.problem is None else 1


def _verify(cache, args) -> int:
    from ..runtime.store.kernel_cache import CacheDirError

    checked = len(cache.ls())
    problems = cache.verify()
    out = Console(soft_wrap=True)
    if not problems:
        out.print(f"[green]all {checked} entries ok[/] in {cache.root}")
        return 0
    table = Table("key", "problem", title=f"{len(problems)} of {checked} entries damaged")
    for key, problem in problems:
        table.add_row(key[:16], problem)
    out.print(table)
    if not args.fix:
        out.print("run 'twilightc cache verify --fix' to remove them")
        return 1
    removed, failed = 0, []
    for key, _ in problems:  # say what was done, entry by entry: a read-only cache refuses
        try:
            removed += cache.remove(key)
        except CacheDirError as e:
            failed.append(str(e))
    out.print(f"removed {removed} of {len(problems)} damaged entries"
              + ("; they are rebuilt when next used" if removed else ""))
    if failed:
        Console(stderr=True, soft_wrap=True).print(
            f"could not remove {len(failed)}: {failed[0]}", markup=False)
        return 1
    return 0


def _clear(cache, args) -> int:
    older = timedelta(days=args.older_than) if args.older_than is not None else None
    cutoff = time.time() - older.total_seconds() if older is not None else None
    doomed = [e for e in cache.ls() if cutoff is None or e.created < cutoff]
    what = f"{len(doomed)} entries ({_size(sum(e.size for e in doomed))}) from {cache.root}"
    if not args.yes:
        if not sys.stdin.isatty():
            err = Console(stderr=True, soft_wrap=True)
            err.print(f"would remove {what}; pass --yes to remove them")
            return 1
        if input(f"remove {what}? [y/N] ").strip().lower() not in ("y", "yes"):
            return 1
    removed = cache.clear(older_than=older)
    Console(soft_wrap=True).print(f"removed {removed} entries from {cache.root}")
    return 0


def _describe(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _age(created: float) -> str:
    s = max(0.0, time.time() - created)
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= span:
            return f"{s / span:.0f}{unit}"
    return f"{s:.0f}s"
