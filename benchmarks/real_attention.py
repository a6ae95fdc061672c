"""Every layer of a real attention snapshot through ``twilight.load``, against the one dense
baseline: what ``cpu_bench.py --snapshot F`` prints beside its synthetic sweep.

Per layer (each query one request of its own causal context, as ``twilightc eval`` builds it):
tokens kept, the pipeline's step (``plan`` once, ``run`` per step, the tuned schedule, never
falling back), what ``load(..., layer=L)`` serves (the pipeline, or dense attention where the
tuning log measured dense faster for this layer), and the fastest torch SDPA over the same K/V
(dtype and GQA layout said). Ratios are dense / twilight: above 1 twilight is faster.

    python benchmarks/real_attention.py smollm2_8k.npz --layers 0,15,28 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import warnings

import twilight as tw
from twilight.compiler import ir
from twilight.runtime.evaluation.evaluate import with_model_scale
from twilight.runtime.evaluation.measure import dense_baseline, served_ms, snapshot_problem
from twilight.runtime.evaluation.snapshot import load_snapshot
from twilight.runtime.serving.load import DefaultScheduleWarning, load


def bench_layer(pipe, snap, i: int, repeats: int) -> dict:
    p = with_model_scale(ir.as_ir(pipe), float(snap.scale[i]), snap.q.shape[-1])
    prob = snapshot_problem(p, snap, i)
    shape = ir.Shape(snap.q.shape[2], snap.k.shape[1], snap.q.shape[3], p.page_size,
                     str(snap.q.dtype).removeprefix("torch."))
    kw = dict(shape=shape, backend="tvm", batch=prob.batch, context=prob.max_context)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DefaultScheduleWarning)
        sparse = load(p, **kw, dense_below=0)
        served = load(p, **kw, layer=prob.layer)
    _, (_, cnt) = sparse.plan(prob.batch, prob.max_context).run(
        prob.q, prob.cache, prob.ids, return_lists=True)
    row = {"layer": prob.layer, "context": prob.max_context,
           "kept_mean": round(float(cnt.float().mean()), 1),
           "schedule": sparse.schedule_source,
           "pipeline_ms": served_ms(sparse, prob, repeats)}
    runs_dense = served.runs_dense(prob.max_context)
    row["served"] = f"dense ({served.dense!r})" if runs_dense else "pipeline"
    row["served_ms"] = served_ms(served, prob, repeats) if runs_dense else row["pipeline_ms"]
    base = dense_baseline(prob, repeats)
    row |= {"sdpa_ms": base.ms, "sdpa": str(base)}
    row["x_pipeline"] = base.ms / row["pipeline_ms"]
    row["x_served"] = base.ms / row["served_ms"]
    return row


def bench_snapshot(path: str, pipe=None, layers: list[int] | None = None,
                   repeats: int = 5, on_row=None) -> dict:
    """Rows per layer slot of ``path`` (all, or ``layers``) and totals over them."""
    snap = load_snapshot(path)
    pipe = pipe or tw.builtins.quest_twilight()
    rows = []
    for i in layers if layers is not None else range(snap.num_layers):
        rows.append(bench_layer(pipe, snap, i, repeats))
        if on_row:
            on_row(rows[-1])
    total = {k: sum(r[k] for r in rows) for k in ("pipeline_ms", "served_ms", "sdpa_ms")}
    total |= {"x_pipeline": total["sdpa_ms"] / total["pipeline_ms"],
              "x_served": total["sdpa_ms"] / total["served_ms"],
              "layers_below_1x_served": [r["layer"] for r in rows if r["x_served"] < 1.0]}
    return {"snapshot": snap.describe(), "rows": rows, "total": total}


def print_snapshot(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"real attention: {result['snapshot']}")
    cols = ("layer", "context", "kept_mean", "pipeline_ms", "served", "served_ms", "sdpa_ms",
            "x_pipeline", "x_served", "sdpa")
    for c in cols:
        t.add_column(c)
    for r in result["rows"]:
        t.add_row(*[f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols])
    tot = result["total"]
    t.add_row("all", "", "", f"{tot['pipeline_ms']:.2f}", "", f"{tot['served_ms']:.2f}",
              f"{tot['sdpa_ms']:.2f}", f"{tot['x_pipeline']:.2f}", f"{tot['x_served']:.2f}", "")
    Console(width=200).print(t)
    print("x = fastest torch SDPA ms / twilight ms (above 1: twilight faster); pipeline: the "
          "sparse stages always; served: what load(..., layer=L) runs (dense where the tuning "
          "log measured it faster)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("snapshot")
    ap.add_argument("--layers", default=None, help="layer slots, e.g. 0,15,28 (default: all)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args(argv)
    layers = [int(x) for x in a.layers.split(",")] if a.layers else None
    res = bench_snapshot(a.snapshot, layers=layers, repeats=a.repeats,
                         on_row=lambda r: print(json.dumps(r), flush=True))
    print_snapshot(res)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
