"""Snapshot loading: every malformed file is one ``InputError`` line naming the file and the
field; every file that loads is a valid snapshot that ``eval`` runs on. Explicit cases (the
ones users met), then a property test over garbled and randomly altered files."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import twilight as tw
from twilight.runtime.evaluation.evaluate import evaluate_snapshot
from twilight.runtime.evaluation.snapshot import Snapshot, load_snapshot

RNG = np.random.default_rng(0)
GOOD = dict(q=RNG.standard_normal((2, 3, 4, 8)).astype(np.float16),
            k=RNG.standard_normal((2, 2, 20, 8)).astype(np.float16),
            v=RNG.standard_normal((2, 2, 20, 8)).astype(np.float16),
            q_pos=np.array([3, 10, 19]), scale=np.array([0.35, 0.35], np.float32))


def _write(path: Path, compress: bool = False, **change) -> Path:
    arrays = {k: v for k, v in (GOOD | change).items() if v is not None}
    (np.savez_compressed if compress else np.savez)(path, **arrays)
    return path


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated(path: Path) -> Path:
    data = _write(path).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _nan_at(name: str, value: float):
    a = GOOD[name].copy()
    a[1, 1, 2, 3] = value
    return {name: a}


CASES = {  # name: (how to write the file, what the one line must say)
    "empty file": (lambda p: _raw(p, b""), "is empty"),
    "text renamed .npz": (lambda p: _raw(p, b"q,k,v\n1,2,3\n"), "not a .npz"),
    "truncated .npz": (_truncated, "not a readable .npz"),
    ".npy content": (lambda p: _raw(p, _npy_bytes(GOOD["q"])), "single array"),
    "object array": (lambda p: _write(p, q=np.array([None] * 4, dtype=object)), "'q' cannot"),
    "complex k": (lambda p: _write(p, k=GOOD["k"].astype(np.complex64)), "'k' must be float"),
    "float64 v": (lambda p: _write(p, v=GOOD["v"].astype(np.float64)), "'v' must be float"),
    "NaN q_pos": (lambda p: _write(p, q_pos=np.array([1.0, np.nan, 3.0])), "'q_pos' must be int"),
    "float q_pos": (lambda p: _write(p, q_pos=np.array([1.0, 2.0, 3.0])), "'q_pos' must be int"),
    "q_pos past T": (lambda p: _write(p, q_pos=np.array([1, 2, 20])), "'q_pos' must lie in"),
    "zero layers": (lambda p: _write(p, q=GOOD["q"][:0], k=GOOD["k"][:0], v=GOOD["v"][:0],
                                     scale=GOOD["scale"][:0]), "empty snapshot"),
    "zero queries": (lambda p: _write(p, q=GOOD["q"][:, :0], q_pos=GOOD["q_pos"][:0]),
                     "empty snapshot"),
    "zero tokens": (lambda p: _write(p, k=GOOD["k"][:, :, :0], v=GOOD["v"][:, :, :0]),
                    "empty snapshot"),
    "scale 0": (lambda p: _write(p, scale=np.array([0.0, 0.3], np.float32)), "'scale' must hold"),
    "scale NaN": (lambda p: _write(p, scale=np.array([np.nan, 0.3], np.float32)),
                  "'scale' must hold"),
    "scale negative": (lambda p: _write(p, scale=np.array([-0.1, 0.3], np.float32)),
                       "'scale' must hold"),
    "layers length": (lambda p: _write(p, layers=np.array([0, 1, 2])), "'layers' must be 2"),
    "layers float": (lambda p: _write(p, layers=np.array([0.0, 1.0])), "'layers' must be 2"),
    "NaN in k": (lambda p: _write(p, **_nan_at("k", np.nan)), "'k' holds NaN or inf"),
    "inf in v": (lambda p: _write(p, **_nan_at("v", np.inf)), "'v' holds NaN or inf"),
    "inf in q": (lambda p: _write(p, **_nan_at("q", -np.inf)), "'q' holds NaN or inf"),
    "missing scale": (lambda p: _write(p, scale=None), "missing 'scale'"),
    "heads not a multiple": (lambda p: _write(p, q=GOOD["q"][:, :, :3]), "a multiple of"),
    "head_dim past the limit": (lambda p: _write(p, q=np.zeros((1, 1, 1, 2048), np.float16),
                                                 k=np.zeros((1, 1, 4, 2048), np.float16),
                                                 v=np.zeros((1, 1, 4, 2048), np.float16),
                                                 q_pos=np.array([0]), scale=np.ones(1)),
                                "head_dim=2048"),
    "model not a string": (lambda p: _write(p, model=np.array([1, 2])), "'model' must be one"),
    "a member that is not .npy": (
        lambda p: zipfile.ZipFile(p, "w").writestr("q.npy", b"garbage") or p, "'q' is not"),
}


@pytest.mark.parametrize("case", CASES)
def test_each_malformed_snapshot_is_one_line(tmp_path, case) -> None:
    write, says = CASES[case]
    path = write(tmp_path / "s.npz")
    with pytest.raises(tw.InputError) as info:
        load_snapshot(path)
    msg = str(info.value)
    assert msg.startswith(f"snapshot {path}: ") and says in msg and "\n" not in msg, msg


def test_a_directory_or_a_missing_file_is_one_line(tmp_path) -> None:
    with pytest.raises(tw.InputError, match="is a directory"):
        load_snapshot(tmp_path)
    with pytest.raises(tw.InputError, match="no such file"):
        load_snapshot(tmp_path / "nope.npz")


def test_a_valid_snapshot_loads_as_written(tmp_path) -> None:
    snap = load_snapshot(_write(tmp_path / "s.npz", compress=True, model=np.array("m"),
                                layers=np.array([4, 9])))
    assert snap.layers == (4, 9) and snap.model == "m" and snap.q.shape == (2, 3, 4, 8)
    assert snap.scale.tolist() == pytest.approx([0.35, 0.35])


# ---- property: garbled files -------------------------------------------------------------------
def _valid(snap: Snapshot) -> None:
    """What every loaded snapshot guarantees, and that eval runs on it."""
    L, nq, hq, d = snap.q.shape
    assert min(snap.q.shape) > 0 and min(snap.k.shape) > 0 and hq % snap.k.shape[1] == 0
    assert snap.k.shape == snap.v.shape == (L, snap.k.shape[1], snap.context, d)
    assert all(x.isfinite().all() for x in (snap.q, snap.k, snap.v, snap.scale))
    assert (snap.scale > 0).all() and len(snap.layers) == L
    assert 0 <= int(snap.q_pos.min()) and int(snap.q_pos.max()) < snap.context
    figures = evaluate_snapshot(tw.builtins.dense(), snap, [0]).to_json()["overall"]
    assert all(np.isfinite(v) for v in figures.values() if isinstance(v, float)), figures


ARRAYS = st.sampled_from(["q", "k", "v", "q_pos", "scale", "layers", "model"])
DTYPES = st.sampled_from([np.float16, np.float32, np.float64, np.int64, np.int8, np.uint8,
                          np.bool_, np.complex64, "U3", object])


@st.composite
def _altered(draw) -> dict:
    """GOOD with one field replaced by an array of a random dtype, shape and values."""
    name = draw(ARRAYS)
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=ndim, max_size=ndim)))
    dtype = draw(DTYPES)
    values = draw(st.sampled_from([0.0, 1.0, -3.0, 25.0, np.nan, np.inf]))
    if dtype is object:
        a = np.full(shape, None, dtype=object)
    elif dtype == "U3":
        a = np.full(shape, "abc")
    else:
        with np.errstate(invalid="ignore"):
            a = np.full(shape, values).astype(dtype)
    return {name: a}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(how=st.sampled_from(["truncate", "flip", "alter", "drop", "random"]), data=st.data())
def test_garbled_snapshots_load_or_fail_with_one_line(tmp_path, how, data) -> None:
    path = tmp_path / "g.npz"
    compress = data.draw(st.booleans(), "compress")
    if how == "alter":
        _write(path, compress, **data.draw(_altered(), "field"))
    elif how == "drop":
        _write(path, compress, **{data.draw(ARRAYS, "dropped"): None})
    elif how == "random":
        path.write_bytes(data.draw(st.binary(max_size=200), "bytes"))
    else:
        raw = bytearray(_write(path, compress).read_bytes())
        if how == "truncate":
            raw = raw[: data.draw(st.integers(0, len(raw) - 1), "cut")]
        else:
            for at in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=4),
                                "flips"):
                raw[at] ^= data.draw(st.integers(1, 255), "bits")
        path.write_bytes(bytes(raw))
    try:
        snap = load_snapshot(path)
    except tw.TwilightError as e:
        assert str(e).startswith(f"snapshot {path}: ") and "\n" not in str(e), str(e)
        event(f"{how}: refused")
        return
    event(f"{how}: loaded")
    _valid(snap)
