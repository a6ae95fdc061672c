"""The IR: content keys (stable, sensitive to every attribute, blind to source lines), the JSON
round trip, and the verifier."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

import twilight as tw
from twilight.compiler import ir
from twilight.frontend.builtins import PIPELINES

TABLE = ((0, 3, 5), (1, 2, 7))  # a per-KV-head channel table for Double Sparsity
PROJ = tuple(tuple(tuple(((h + 2 * i + 3 * j) % 5 - 2) / 4 for j in range(2)) for i in range(16))
             for h in range(2))  # a per-KV-head projection [2, 16, 2] for Loki


def _make(name: str, make):
    """A built-in, the calibrated ones given their calibration (a channel table, a projection)."""
    if name in ("double_sparsity", "ds_twilight"):
        return make(channels=TABLE)
    return make(projection=PROJ) if name == "loki" else make()


def _builtins() -> dict[str, ir.PipelineIR]:
    """Every built-in pipeline's IR."""
    return {name: _make(name, make).ir for name, make in PIPELINES.items()}


@tw.score(per="token")
def scaled(q, k):
    return tw.dot(q, k) * 2.0 - tw.max(tw.abs(k)) / 3.0


def _user_pipeline() -> tw.Pipeline:
    """Every optional attribute set, so each can be mutated."""
    return tw.Pipeline(select=tw.threshold(scaled, 0.5, group="kv"),
                       prune=[tw.top_k(budget=tw.fraction(0.5), estimate=tw.exact_keys()),
                              tw.top_p(0.9, estimate=tw.quantized_keys(2, "page"))],
                       attend=tw.attention(scale=0.125, softcap=30.0),
                       keep=tw.sink(4) | tw.window(8), page_size=8, name="user")


# ---- stability -----------------------------------------------------------------------------
SUBPROCESS = """
import json, twilight as tw
from twilight.frontend.builtins import PIPELINES
t, proj = {table!r}, {proj!r}
def make(n, m):
    if n in ("double_sparsity", "ds_twilight"):
        return m(channels=t)
    return m(projection=proj) if n == "loki" else m()
print(json.dumps({{n: make(n, m).key() for n, m in PIPELINES.items()}}))
"""


def test_key_is_stable_across_processes() -> None:
    here = {n: p.key() for n, p in _builtins().items()}
    env = dict(os.environ, PYTHONHASHSEED="12345")  # str hashing must not leak into the key
    res = subprocess.run([sys.executable, "-c", SUBPROCESS.format(table=TABLE, proj=PROJ)],
                         capture_output=True, text=True, env=env, timeout=60, check=True)
    assert json.loads(res.stdout) == here


def test_key_is_sha256_hex() -> None:
    key = tw.builtins.quest_twilight().key()
    assert len(key) == 64 and int(key, 16) >= 0
    assert key == tw.builtins.quest_twilight().ir.key()


# ---- sensitivity -------------------------------------------------------------------------------
def _mutations(x):
    """Copies of ``x`` with exactly one attribute changed (recursively; ``loc`` is no content)."""
    if dataclasses.is_dataclass(x):
        for f in dataclasses.fields(x):
            if f.name != "loc":
                for v in _mutations(getattr(x, f.name)):
                    yield dataclasses.replace(x, **{f.name: v})
    elif isinstance(x, tuple):
        for i, item in enumerate(x):
            for v in _mutations(item):
                yield x[:i] + (v,) + x[i + 1 :]
    elif isinstance(x, bool):
        yield not x
    elif isinstance(x, int | float):
        yield x + 1
        if isinstance(x, float):
            yield int(x) if x == int(x) else x / 2  # 1.0 and 1 must not share a key
    elif isinstance(x, str):
        yield x + "_"


@pytest.mark.parametrize("name", [*PIPELINES, "user"])
def test_every_attribute_changes_the_key(name: str) -> None:
    base = _user_pipeline().ir if name == "user" else _builtins()[name]
    keys = [m.key() for m in _mutations(base)]
    assert len(keys) >= 4  # dense: name, page_size, keep.sink, keep.window
    assert base.key() not in keys
    assert len(set(keys)) == len(keys)


def _quest_twilight(**kw) -> str:
    args = dict(budget=64, p=0.9, bits=4, granularity="token", page_size=16) | kw
    return tw.builtins.quest_twilight(**args).key()


def _custom(const: float = 2.0, op=tw.maximum, group=None, keep=None, attend=None) -> str:
    @tw.page_summary
    def mm(k):
        return dict(lo=tw.min(k, axis=0), hi=tw.max(k, axis=0))

    @tw.score(per="page", summary=mm)
    def s(q, page):
        return tw.sum(op(q * page.lo, q * page.hi)) * const

    return tw.Pipeline(select=tw.top_k(s, tw.tokens(64), group=group), keep=keep,
                       attend=attend, name="custom").key()


def test_named_attributes_change_the_key() -> None:
    """The attributes a user turns, each through the DSL."""
    keys = {
        "base": _quest_twilight(),
        "budget": _quest_twilight(budget=128),
        "p": _quest_twilight(p=0.8),
        "bits": _quest_twilight(bits=8),
        "granularity": _quest_twilight(granularity="page"),
        "page_size": _quest_twilight(page_size=32),
        "custom": _custom(),
        "constant": _custom(const=3.0),
        "expression": _custom(op=tw.minimum),
        "group": _custom(group="mean"),
        "sink": _custom(keep=tw.sink(4)),
        "window": _custom(keep=tw.window(4)),
        "scale": _custom(attend=tw.attention(scale=0.1)),
        "softcap": _custom(attend=tw.attention(softcap=50.0)),
        "ds": tw.builtins.double_sparsity(channels=TABLE).key(),
        "ds_channels": tw.builtins.double_sparsity(channels=((0, 3, 5), (1, 2, 6))).key(),
        "ds_shared": tw.builtins.double_sparsity(channels=(0, 3, 5)).key(),
        "prune_group": tw.Pipeline(prune=tw.top_p(0.9, group="max")).key(),
        "prune_default": tw.Pipeline(prune=tw.top_p(0.9)).key(),
    }
    assert len(set(keys.values())) == len(keys)


def _make_twice():
    first = tw.Pipeline(select=tw.top_k(scaled, tw.tokens(32)), keep=tw.sink(2))
    second = tw.Pipeline(
        select=tw.top_k(scaled, tw.tokens(32)),
        keep=tw.sink(2),
    )
    return first, second


def test_key_ignores_source_lines() -> None:
    a, b = _make_twice()
    assert a.ir.loc.line != b.ir.loc.line and a.ir.keep.loc.line != b.ir.keep.loc.line
    assert a.key() == b.key() and a.ir == b.ir


# ---- JSON round trip ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", [*PIPELINES, "user"])
def test_round_trip(name: str) -> None:
    x = _user_pipeline().ir if name == "user" else _builtins()[name]
    data = ir.to_data(x)
    assert ir.from_data(data) == x
    again = ir.from_data(json.loads(json.dumps(data)))
    assert again == x and again.key() == x.key()
    assert '"loc"' not in ir.canonical_json(x)


def test_round_trip_keeps_float_and_int_apart() -> None:
    for v in (1.0, 1, 0.5, -3.0):
        back = ir.from_data(json.loads(json.dumps(ir.to_data(v))))
        assert back == v and type(back) is type(v)


def test_shape_round_trip_and_group_size() -> None:
    s = ir.Shape(32, 8, 128, 16, "bfloat16")
    assert ir.from_data(ir.to_data(s)) == s and s.group_size == 4


# ---- verifier ----------------------------------------------------------------------------------
def test_builtins_verify() -> None:
    for p in _builtins().values():
        tw.verify(p)
        tw.verify(p, tw.Shape(8, 2, 16, p.page_size))


@pytest.mark.parametrize("change, error", [
    (lambda p: dataclasses.replace(p, page_size=12), "StructureError"),
    (lambda p: dataclasses.replace(p, select=dataclasses.replace(p.select, group="all")),
     "StructureError"),
    (lambda p: dataclasses.replace(p, select=dataclasses.replace(
        p.select, budget=ir.Budget("tokens", 0.0))), "BudgetError"),
    (lambda p: dataclasses.replace(p, select=dataclasses.replace(
        p.select, budget=ir.Budget("fraction", 1.5))), "BudgetError"),
    (lambda p: dataclasses.replace(p, prune=(dataclasses.replace(p.prune[0], p=0.0),)),
     "BudgetError"),
    (lambda p: dataclasses.replace(p, prune=(dataclasses.replace(
        p.prune[0], estimator=ir.Estimator("quantized", 3)),)), "StructureError"),
])
def test_verifier_rejects_and_names_the_stage(change, error: str) -> None:
    bad = change(tw.builtins.quest_twilight().ir)
    with pytest.raises(tw.PipelineError) as err:
        tw.verify(bad, stage="lower_triton")
    assert type(err.value).__name__ == error
    assert "after stage 'lower_triton'" in str(err.value)


def test_verifier_checks_the_shape() -> None:
    p = tw.builtins.quest_top_k(page_size=16).ir
    with pytest.raises(tw.InputError, match="multiple"):  # a Shape is checked when made
        tw.verify(p, tw.Shape(6, 4, 64, 16))
    with pytest.raises(tw.PipelineError, match="page_size=8"):
        tw.verify(p, tw.Shape(8, 4, 64, 8))
