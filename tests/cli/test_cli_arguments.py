"""Hostile command lines: every value a clear one-line error (exit 2 for a bad command line,
1 for a bad input) or a correct result — never a traceback, never a silent change.

The property tests draw values for one argument at a time from what a hurried user types
(negative, zero, huge, non-numbers, NaN, stray separators, unicode) and run ``twilightc``
in-process. Valid command lines are stopped before any real work: the tuning-log directory
is unwritable (``tune`` checks it just before tuning), ``cache clear`` has no ``--yes`` and no
terminal to ask on.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import twilight as tw
from twilight import knobs
from twilight.cli import args, main
from twilight.runtime.store.tuning_log import ShapeBucket
from twilight.schedules.common import TOP_P

NUMBERS = st.one_of(st.integers(-10**12, 10**12).map(str),
                    st.floats(allow_nan=True, allow_infinity=True).map(repr),
                    st.sampled_from(["", " ", "1e3", "0x10", "1_000", "١٢", "nan", "-0", "4k",
                                     "3.0", "--", "1,2"]))
WORDS = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _outcome(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    return code, err


def _one_clear_line(code: int, err: str) -> None:
    assert code in (1, 2), (code, err)
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("twilightc") and "error:" in last, err


@pytest.fixture()
def unwritable(tmp_path):
    """Knobs where every command stops before real work: logs go to a path under a file."""
    (tmp_path / "file").write_text("x")
    with knobs.scope(data_dir=tmp_path / "data", tuning_logs=tmp_path / "file" / "logs",
                     cache_dir=tmp_path / "cache"):
        yield tmp_path


TUNE = ["tune", "--gpu", "cpu", "--pipeline", "quest_top_k(budget=64)", "--head-shape",
        "q_heads=4,kv_heads=2,head_dim=32,dtype=float32", "--shapes", "1x256"]


@FAST
@given(flag=st.sampled_from(["--trials", "--repeats", "--timeout", "--seed", "--workers",
                             "--shapes", "--head-shape", "--gpu", "--pipeline", "--sampler",
                             "--backend"]),
       value=st.one_of(NUMBERS, WORDS))
@example(flag="--shapes", value="0x1k")
@example(flag="--head-shape", value="q_heads=3,kv_heads=2")
@example(flag="--pipeline", value="builtins:exit")
@example(flag="--pipeline", value="quest_top_k(budget=-1)")
@example(flag="--shapes", value="1x999999999k")
@example(flag="--trials", value="3")  # valid: it gets to the end, the unwritable log dir
def test_tune_arguments_are_a_clear_error_or_accepted(unwritable, capsys, flag, value):
    code, err = _outcome([*TUNE, flag, value], capsys)
    _one_clear_line(code, err)
    if (flag, value) == ("--trials", "3"):
        assert code == 1 and "TWILIGHT_TUNING_LOGS" in err and "cannot write there" in err


@FAST
@given(value=NUMBERS)
@example(value="-5")
def test_cache_clear_age_is_checked_and_nothing_is_removed_unasked(tmp_path, capsys,
                                                                      monkeypatch, value):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, err = _outcome(["cache", "clear", "--cache-dir", str(tmp_path / "c"),
                          "--older-than", value], capsys)
    try:
        ok = math.isfinite(float(value)) and 0 <= float(value) <= 1e6
    except ValueError:
        ok = False
    assert code == (1 if ok else 2), err
    assert ("would remove 0 entries" in err) if ok else ("--older-than" in err)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.one_of(WORDS, st.sampled_from(["1", "yes", "banana", "0", "2", "on "])))
def test_an_environment_knob_holding_nonsense_is_a_usage_error(tmp_path, capsys, monkeypatch,
                                                               value):
    monkeypatch.setenv("TWILIGHT_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("TWILIGHT_DEBUG", value.replace("\x00", ""))
    value = value.replace("\x00", "")
    code, err = _outcome(["cache", "ls"], capsys)
    if value.strip().lower() in ("", "1", "true", "yes", "on", "0", "false", "no", "off"):
        assert code == 0
    else:
        assert code == 2 and err.startswith("twilightc: error: TWILIGHT_DEBUG=")


# ---- the argparse types, on many more values ----------------------------------------------------
def _type_result(parse, text):
    try:
        return parse(text), None
    except argparse.ArgumentTypeError as e:
        assert str(e) and "\n" not in str(e)
        return None, str(e)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(list(args.SHAPE_FIELDS) + ["heads", ""]),
                          st.one_of(NUMBERS, st.sampled_from(list(args.SHAPE_DTYPES)), WORDS)),
                max_size=5))
def test_head_shape_is_exact_or_refused(items):
    text = ",".join(f"{k}={v}" for k, v in items)
    fields, err = _type_result(args.head_shape, text)
    if err is not None:
        return
    shape = args.make_shape(fields, 16)
    given_ = {k: v.strip() if k == "dtype" else int(v, 10) for k, v in items if k}
    assert {k: getattr(shape, k) for k in given_} == given_  # nothing changed silently
    assert shape.q_heads % shape.kv_heads == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(NUMBERS, NUMBERS), min_size=1, max_size=3))
def test_buckets_are_exact_or_refused(pairs):
    text = ",".join(f"{b}x{c}" for b, c in pairs)
    buckets, err = _type_result(args.buckets, text)
    if err is None:  # each item exactly as written (duplicates once)
        each = [ShapeBucket.parse(f"{b}x{c}") for b, c in pairs]
        assert buckets == list(dict.fromkeys(each))
        assert all(x.batch == int(b, 10) >= 1 and x.context >= 1
                   for x, (b, _) in zip(each, pairs, strict=True))


@settings(max_examples=200, deadline=None)
@given(st.one_of(WORDS, st.dictionaries(st.sampled_from([p.name for p in TOP_P.params] + ["x"]),
                                        st.one_of(st.integers(-2, 40), st.sampled_from(
                                            ["sort", "bisect", "radix", "eps", "iters"]),
                                            st.floats(allow_nan=False))).map(json.dumps)))
def test_schedules_are_complete_and_checked_or_refused(text):
    value, err = _type_result(args.schedule_json, text)
    if err is not None:
        return
    try:
        schedule = args.check_schedule(value, TOP_P)
    except args.UsageError as e:
        assert str(e).startswith("--schedule: ")
        assert any(w in str(e) for w in ("expected one of", "known:", "no effect here"))
        return
    assert TOP_P.complete(schedule) == schedule
    assert all(schedule[k] == v for k, v in value.items())  # nothing given was dropped


@settings(max_examples=200, deadline=None)
@given(NUMBERS)
def test_counts_and_numbers(text):
    n, err = _type_result(args.count(1), text)
    assert err is not None or (isinstance(n, int) and n >= 1 and n == int(text, 10))
    x, err = _type_result(args.number(0), text)
    assert err is not None or (math.isfinite(x) and x > 0 and x == float(text))


def test_target_type():
    assert str(args.target("cuda:sm_90")) == "cuda:sm_90" and str(args.target("cpu")) == "llvm"
    for bad in ("cuda", "cuda:sm_x", "llvm:foo", "rocm", ""):
        assert _type_result(args.target, bad)[1]


def test_pipeline_spec_accepts_pipelines_and_factories_only(tmp_path, capsys):
    mod = tmp_path / "pipes.py"
    mod.write_text("import twilight as tw\n"
                   "pipe = tw.builtins.quest_top_k(budget=64)\n"
                   "def factory():\n    return tw.builtins.quest_top_k(budget=32)\n"
                   "def needs_args(x):\n    return x\n"
                   "def returns_int():\n    return 3\n"
                   "class Thing:\n    pass\n")
    from twilight.frontend.resolve import resolve_pipeline
    assert resolve_pipeline(f"{mod}:pipe").ir == tw.builtins.quest_top_k(budget=64).ir
    assert resolve_pipeline(f"{mod}:factory").ir == tw.builtins.quest_top_k(budget=32).ir
    for attr, why in [("needs_args", "is a function, not a tw.Pipeline"),
                      ("returns_int", "returned a int"), ("Thing", "is a type"),
                      ("missing", "has no attribute")]:
        with pytest.raises(tw.PipelineError, match=why):
            resolve_pipeline(f"{mod}:{attr}")
    for spec in ("builtins:exit", "os:getcwd", "subprocess:Popen"):
        with pytest.raises(tw.PipelineError, match="not a tw.Pipeline"):
            resolve_pipeline(spec)
