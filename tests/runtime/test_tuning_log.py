"""Tuning logs: atomic JSON entries, replacement, nearest-bucket lookup, root precedence, and
damaged logs or entries skipped with a warning."""

from __future__ import annotations

import json

import pytest

import twilight as tw
from twilight.runtime.store.tuning_log import (
    ShapeBucket,
    TuningLogError,
    TuningLogWarning,
    find_schedule,
    log_path,
    read_log,
    shape_dict,
    write_entry,
)


def _entry(pipe, shape, buckets, backend="tvm", latency=1.0):
    return {"pipeline_key": pipe.key(), "backend": backend, "target": "llvm",
            "shape": shape_dict(shape), "measured": True, "buckets": [
                {"bucket": b.name, "batch": b.batch, "context": b.context,
                 "schedule": {"tile": b.context}, "latency_ms": latency} for b in buckets]}


def test_write_read_and_nearest_bucket(tmp_path):
    pipe = tw.builtins.quest_twilight()
    shape = tw.Shape(32, 8, 128)
    write_entry(tmp_path, "cpu", pipe.name, _entry(pipe, shape, [ShapeBucket(1, 4096),
                                                                ShapeBucket(4, 32768)]))
    data = json.loads(log_path(tmp_path, "cpu", pipe.name).read_text())
    assert data["format"] == 1 and len(data["entries"]) == 1
    rec, entry = find_schedule(pipe.ir, "cpu", shape, ShapeBucket(2, 5000), roots=[tmp_path])
    assert rec["bucket"] == "b1_t4096" and entry["backend"] == "tvm"
    rec, _ = find_schedule(pipe.ir, "cpu", shape, ShapeBucket(8, 30000), roots=[tmp_path])
    assert rec["bucket"] == "b4_t32768"


def test_other_pipeline_key_or_shape_does_not_match(tmp_path):
    pipe = tw.builtins.quest_twilight()
    shape = tw.Shape(32, 8, 128)
    write_entry(tmp_path, "cpu", pipe.name, _entry(pipe, shape, [ShapeBucket(1, 4096)]))
    other = tw.builtins.quest_twilight(p=0.8)
    assert find_schedule(other.ir, "cpu", shape, ShapeBucket(1, 4096), roots=[tmp_path]) is None
    assert find_schedule(pipe.ir, "cpu", tw.Shape(32, 8, 64), ShapeBucket(1, 4096),
                         roots=[tmp_path]) is None
    assert find_schedule(pipe.ir, "h100", shape, ShapeBucket(1, 4096), roots=[tmp_path]) is None


def test_rewrite_replaces_same_entry_and_user_root_wins(tmp_path):
    pipe = tw.builtins.quest_top_k()
    shape = tw.Shape(32, 8, 128)
    b = [ShapeBucket(1, 4096)]
    write_entry(tmp_path / "a", "cpu", pipe.name, _entry(pipe, shape, b, latency=2.0))
    write_entry(tmp_path / "a", "cpu", pipe.name, _entry(pipe, shape, b, latency=1.5))
    data = json.loads(log_path(tmp_path / "a", "cpu", pipe.name).read_text())
    assert len(data["entries"]) == 1 and data["entries"][0]["buckets"][0]["latency_ms"] == 1.5
    write_entry(tmp_path / "b", "cpu", pipe.name, _entry(pipe, shape, b, latency=9.0))
    rec, _ = find_schedule(pipe.ir, "cpu", shape, b[0], roots=[tmp_path / "b", tmp_path / "a"])
    assert rec["latency_ms"] == 9.0
    assert not list((tmp_path / "a" / "cpu").glob("*.tmp"))


@pytest.mark.parametrize("text, why", [
    ('{"format": 1, "entries": [', "unreadable"),
    ("\xff\xfe", "unreadable"),
    ("[1, 2]", "not a tuning log"),
    ('{"format": 99, "entries": []}', "format 99"),
])
def test_a_damaged_log_is_skipped_with_a_warning(tmp_path, text, why):
    pipe, shape = tw.builtins.quest_twilight(), tw.Shape(32, 8, 128)
    path = log_path(tmp_path, "cpu", pipe.name)
    path.parent.mkdir(parents=True)
    path.write_bytes(text.encode("latin-1"))
    with pytest.warns(TuningLogWarning, match=why):
        assert find_schedule(pipe.ir, "cpu", shape, ShapeBucket(1, 4096), roots=[tmp_path]) \
            is None
    with pytest.raises(TuningLogError, match=why):
        read_log(path)


def test_malformed_entries_are_skipped_and_good_ones_still_found(tmp_path):
    pipe, shape = tw.builtins.quest_twilight(), tw.Shape(32, 8, 128)
    good = _entry(pipe, shape, [ShapeBucket(1, 4096)])
    bad = [dict(good, buckets=[dict(good["buckets"][0], schedule=None)]),
           dict(good, buckets=[dict(good["buckets"][0], batch=0)]),
           {k: v for k, v in good.items() if k != "shape"}, "an entry", None]
    path = log_path(tmp_path, "cpu", pipe.name)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"format": 1, "entries": [*bad, good]}))
    with pytest.warns(TuningLogWarning, match="entry skipped") as seen:
        rec, _ = find_schedule(pipe.ir, "cpu", shape, ShapeBucket(1, 4096), roots=[tmp_path])
    assert rec["schedule"] == {"tile": 4096} and len(seen) == len(bad)


def test_writing_over_a_damaged_log_keeps_it_aside(tmp_path):
    pipe, shape = tw.builtins.quest_twilight(), tw.Shape(32, 8, 128)
    path = log_path(tmp_path, "cpu", pipe.name)
    path.parent.mkdir(parents=True)
    path.write_text("not json")
    with pytest.warns(TuningLogWarning):
        write_entry(tmp_path, "cpu", pipe.name, _entry(pipe, shape, [ShapeBucket(1, 4096)]))
    assert path.with_name(path.name + ".damaged").read_text() == "not json"
    assert len(read_log(path)["entries"]) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".damaged"]


@pytest.mark.parametrize("text", ["0x1k", "1x0", "-1x4k", "4", "x", "4x", "4xk", "1.5x4k", ""])
def test_bad_shape_buckets_are_refused(text):
    with pytest.raises(ValueError, match="BATCHxCONTEXT"):
        ShapeBucket.parse(text)
    with pytest.raises(ValueError, match="≥ 1"):
        ShapeBucket(0, 4096)
