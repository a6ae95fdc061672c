"""CPU-side parts of ``benchmarks/gpu_bench.py``: arguments, pipelines, the table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[3] / "benchmarks" / "gpu_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_args_and_pipelines(bench):
    a = bench.parse_args([])
    assert (a.batches, a.contexts, a.head_dim, a.q_heads, a.kv_heads) == \
        ([8, 64], [10_000, 20_000, 30_000], 128, 32, 8)
    assert set(bench.pipelines(a)) == {"quest_top_k", "quest_twilight"}
    d = bench.parse_args(["--dry-run", "--schedule", '{"attend_splits": 2}'])
    assert d.dry_run and d.contexts == [40, 72] and d.schedule == {"attend_splits": 2}


def test_table(bench, capsys):
    a = bench.parse_args(["--batches", "8", "--contexts", "10000", "20000"])
    pt = {"sdpa_us": 100.0, "quest_top_k_us": 10.0, "quest_twilight_us": 8.0,
          "quest_twilight_stages_us": {"select": 2.0, "attend": 1.0}}
    bench.print_table({"8x10000": pt, "8x20000": pt}, a)
    out = capsys.readouterr().out
    assert "| 8 | 10k / 20k | 10.0 / 10.0 | 12.5 / 12.5 | 100 / 100 |" in out


def test_dry_run_lowers_and_checks(bench, lower):
    a = bench.parse_args(["--dry-run"])
    import torch

    from twilight.compiler.backend import Target
    res = bench.check_correctness(a, Target("interpret"), torch.device("cpu"))
    assert all(r["kept_set_agreement"] == 1.0 for r in res.values())
