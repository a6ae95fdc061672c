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
from dataclasses import asdict, dataclass
from pathlib import Path

from ... import knobs
from ...compiler import ir

FORMAT = 1
SHIPPED = Path(__file__).resolve().parents[2] / "tuning_logs"


@dataclass(frozen=True)
class ShapeBucket:
    """A (batch, context) point the tuner measures; the head layout comes from ``Shape``."""

    batch: int
    context: int

    @property
    def name(self) -> str:
        return f"b{self.batch}_t{self.context}"

    @classmethod
    def parse(cls, text: str) -> ShapeBucket:
        """``b4_t16384``, ``4x16384`` or ``4x16k``."""
        t = text.strip().lower().lstrip("b").replace("_t", "x")
        b, _, c = t.partition("x")
        mult = 1024 if c.endswith("k") else 1
        try:
            return cls(int(b), int(c.rstrip("k")) * mult)
        except ValueError:
            raise ValueError(f"shape bucket {text!r}: write BATCHxCONTEXT, e.g. 4x16k") from None

    def distance(self, other: ShapeBucket) -> float:
        return abs(math.log2(self.batch / other.batch)) + abs(math.log2(self.context /
                                                                          other.context))



def user_root() -> Path:
    return Path(knobs.tuning_logs_dir())


def log_path(root: Path, device: str, pipeline: str) -> Path:
    return Path(root) / device / f"{pipeline}.json"


def read_log(path: Path) -> dict:
    with open(path) as f:
        data = json.load(f)
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: tuning log format {data.get('format')!r}, expected {FORMAT}")
    return data


def write_entry(root: Path, device: str, pipeline: str, entry: dict) -> Path:
    """Add or replace (same pipeline key, backend, target, shape) an entry; atomic write."""
    path = log_path(root, device, pipeline)
    data = read_log(path) if path.exists() else {"format": FORMAT, "device": device,
                                                  "pipeline": pipeline, "entries": []}
    same = ("pipeline_key", "backend", "target", "shape", "measured")
    data["entries"] = [e for e in data["entries"]
                       if any(e.get(k) != entry.get(k) for k in same)] + [entry]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
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
        best = None
        for entry in read_log(path)["entries"]:
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
