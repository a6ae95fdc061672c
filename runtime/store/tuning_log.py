"""Tuning logs: the tuner's winners as readable, diffable JSON, and their lookup at run time.

One file per device and pipeline name: ``<root>/<device>/<pipeline>.json``::

    {"format": 1, "device": "cpu", "pipeline": "quest_twilight",
     "entries": [{"pipeline_key": "...", "backend": "tvm", "target": "llvm",
                  "shape": {"q_heads": 32, "kv_heads": 8, "head_dim": 128, ...},
                  "measured": true, "date": "...", "versions": {...},
                  "buckets": [{"bucket": "b1_t4096", "batch": 1, "context": 4096,
                               "schedule": {...}, "latency_ms": ..., "default_latency_ms": ...,
                               "dense_latency_ms": ..., "trials": ..., "study": "..."}]}]}

Roots, searched in order: the user's (``TWILIGHT_TUNING_LOGS``, written by ``twilightc tune``)
then the ones shipped in the package (``twilight/tuning_logs``). An entry matches a pipeline by
its IR key and head layout; the nearest shape bucket wins.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from ... import knobs
from ...compiler import ir
from ...errors import TwilightError
from .filelock import FileLock

FORMAT = 1
SHIPPED = Path(__file__).resolve().parents[2] / "tuning_logs"


@dataclass(frozen=True)
class ShapeBucket:
    """A (batch, context) point the tuner measures; the head layout comes from ``Shape``."""

    batch: int
    context: int

    def __post_init__(self) -> None:
        for name in ("batch", "context"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"shape bucket: {name}={value!r}; expected a whole number ≥ 1")

    @property
    def name(self) -> str:
        return f"b{self.batch}_t{self.context}"

    @classmethod
    def parse(cls, text: str) -> ShapeBucket:
        """``b4_t16384``, ``4x16384`` or ``4x16k``."""
        t = text.strip().lower().removeprefix("b").replace("_t", "x")
        b, sep, c = t.partition("x")
        mult = 1024 if c.endswith("k") else 1
        try:
            batch, context = int(b, 10), int(c.removesuffix("k"), 10) * mult
        except ValueError:
            batch = context = 0
        if not sep or batch < 1 or context < 1:
            raise ValueError(f"shape bucket {text!r}: write BATCHxCONTEXT with both ≥ 1, "
                             "e.g. 4x16k") from None
        return cls(batch, context)

    def distance(self, other: ShapeBucket) -> float:
        return abs(math.log2(self.batch / other.batch)) + abs(math.log2(self.context /
                                                                          other.context))



def user_root() -> Path:
    return Path(knobs.tuning_logs_dir())


def log_path(root: Path, device: str, pipeline: str) -> Path:
    return Path(root) / device / f"{pipeline}.json"


class TuningLogError(TwilightError):
    """A tuning log file that cannot be read (not JSON, not a tuning log, another format)."""


class TuningLogWarning(UserWarning):
    """A damaged tuning log (or entry) was skipped; defaults or other logs are used instead."""


def read_log(path: Path) -> dict:
    """The parsed log at ``path``; ``TuningLogError`` if it is not a readable tuning log.
    Entries are not checked here: ``entries(data, path)`` skips malformed ones."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise TuningLogError(f"tuning log {path}: unreadable ({type(e).__name__}: {e})") \
            from None
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise TuningLogError(f"tuning log {path}: not a tuning log (no list of entries)")
    if data.get("format") != FORMAT:
        raise TuningLogError(f"tuning log {path}: format {data.get('format')!r}, expected "
                             f"{FORMAT}")
    return data


def read_log_or_warn(path: Path) -> dict | None:
    """``read_log``, or ``None`` with a ``TuningLogWarning`` (readers go on without it)."""
    try:
        return read_log(path)
    except TuningLogError as e:
        warnings.warn(f"{e}; skipped", TuningLogWarning, stacklevel=3)
        return None


def _problem(entry) -> str | None:
    """What is wrong with an entry's structure, or None (what lookups and listings rely on)."""
    if not isinstance(entry, dict):
        return f"an entry is a {type(entry).__name__}, not an object"
    for key, kind in (("pipeline_key", str), ("backend", str), ("shape", dict),
                      ("buckets", list)):
        if not isinstance(entry.get(key), kind):
            return f"an entry's {key!r} is missing or not a {kind.__name__}"
    for rec in entry["buckets"]:
        if not isinstance(rec, dict) or not isinstance(rec.get("schedule"), dict):
            return "a bucket record has no schedule object"
        try:
            ShapeBucket(rec.get("batch"), rec.get("context"))
        except ValueError as e:
            return f"a bucket record's {e}"
    return None


def entries(data: dict, path: Path) -> list[dict]:
    """The well-formed entries of a log; each malformed one is skipped with a warning."""
    good = []
    for entry in data["entries"]:
        problem = _problem(entry)
        if problem is None:
            good.append(entry)
        else:
            warnings.warn(f"tuning log {path}: {problem}; entry skipped", TuningLogWarning,
                          stacklevel=3)
    return good


def write_entry(root: Path, device: str, pipeline: str, entry: dict) -> Path:
    """Add or replace (same pipeline key, backend, target, shape) an entry; atomic write under
    a file lock (processes tuning one study write the same file). An unreadable log is moved
    aside to ``<name>.json.damaged`` with a warning, not lost and not fatal."""
    path = log_path(root, device, pipeline)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path.with_name(path.name + ".lock"))
    lock.acquire()
    try:
        data = read_log_or_warn(path) if path.exists() else None
        if data is None and path.exists():
            os.replace(path, path.with_name(path.name + ".damaged"))
        if data is None:
            data = {"format": FORMAT, "device": device, "pipeline": pipeline, "entries": []}
        same = ("pipeline_key", "backend", "target", "shape", "measured")
        data["entries"] = [e for e in data["entries"] if not isinstance(e, dict)
                           or any(e.get(k) != entry.get(k) for k in same)] + [entry]
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        lock.unlink_and_release()  # leaves no lock file beside a log shipped in the repo
    return path


def shape_dict(shape: ir.Shape) -> dict:
    return asdict(shape)


def find_schedule(p: ir.PipelineIR, device: str, shape: ir.Shape, bucket: ShapeBucket,
                  backend: str | None = None, roots: list[Path] | None = None) \
        -> tuple[dict, dict] | None:
    """``(bucket record, entry)`` of the nearest measured bucket for this pipeline, device and
    head layout, from the first root that has one; ``None`` if no log matches."""
    roots = roots if roots is not None else [user_root(), SHIPPED]
    for root in roots:
        path = log_path(root, device, p.name)
        if not path.exists():
            continue
        data = read_log_or_warn(path)
        if data is None:
            continue
        best = None
        for entry in entries(data, path):
            if entry["pipeline_key"] != p.key() or entry["shape"] != shape_dict(shape) \
                    or not entry.get("measured", True) or \
                    (backend and entry["backend"] != backend):
                continue
            for rec in entry["buckets"]:
                dist = bucket.distance(ShapeBucket(rec["batch"], rec["context"]))
                if best is None or dist < best[0]:
                    best = (dist, rec, entry)
        if best:
            return best[1], best[2]
    return None
