"""What each stop rule of top-p's bisection keeps beyond the minimal set, by context.

The TVM prune kernel (llvm) decides top-p on rows of exact attention weights; the torch
reference gives the minimal set. Per stop rule and row kind, the table prints the minimal and
kept token counts (median over rows) and the worst row's extra tokens and extra mass (a share of
the row's mass). Rows: synthetic (log-normal weights with σ 1.5 and 8 heavy tokens, 4 heads) at
each ``--contexts``, and with ``--snapshot`` the last query of every q-head of the chosen layers
of a real attention snapshot.

    python benchmarks/top_p_stops.py --contexts 8192 32768 --snapshot smollm2_8k.npz
"""

from __future__ import annotations

import argparse
import functools
import warnings

import torch
from rich.console import Console
from rich.table import Table

import twilight as tw
from twilight.compiler import ir
from twilight.compiler.backend import Target, get_backend
from twilight.compiler.stages import lists_to_mask
from twilight.runtime.evaluation.reference import top_p_mask
from twilight.runtime.evaluation.snapshot import load_snapshot
from twilight.schedules.common import TOP_P

STOPS = [{"top_p_strategy": "bisect", "bisect_stop": stop, f"bisect_{stop}": v}
         for stop in ("mass", "eps", "iters") for v in TOP_P.param(f"bisect_{stop}").choices]


def synthetic(n: int, heads: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    logits = torch.randn(heads, n, generator=g) * 1.5
    logits[:, :8] += 6.0
    return logits.softmax(-1)


def snapshot_rows(path: str, layers: list[int] | None) -> list[tuple[str, torch.Tensor]]:
    """Each chosen layer's exact weights of its last query, one row per q-head."""
    s = load_snapshot(path)
    out = []
    for li in layers if layers is not None else range(s.num_layers):
        q, k = s.q[li, -1].float(), s.k[li].float()  # [hq, d], [hkv, t, d]
        n = int(s.q_pos[-1]) + 1  # the tokens it attends to (causal)
        g = q.shape[0] // k.shape[0]
        logits = torch.einsum("hd,htd->ht", q, k.repeat_interleave(g, 0)[:, :n])
        out.append((f"snapshot L{s.layers[li] if s.layers else li}",
                    (logits * float(s.scale[li])).softmax(-1)))
    return out


@functools.cache
def prune_kernel(stop: tuple, heads: int, p: float):
    """The TVM kernels of a top-p-only pipeline with the bisection schedule ``dict(stop)``."""
    pipe = tw.Pipeline(prune=tw.top_p(p, estimate=tw.exact_keys(), group="none"))
    return get_backend("tvm").lower(pipe.ir, ir.Shape(heads, heads, 64, 16, "float32"),
                                    dict(stop), Target.parse("llvm"))


def decide(sched: dict, w: torch.Tensor, p: float) -> torch.Tensor:
    heads, n = w.shape
    k = prune_kernel(tuple(sorted(sched.items())), heads, p)

    class X:  # what prune() reads of the stage inputs
        q = torch.zeros(1, heads, 64)
        lengths = torch.full((1,), n, dtype=torch.int32)
        max_len = n
    idx = torch.arange(n, dtype=torch.int32).expand(1, heads, n).contiguous()
    cnt = torch.full((1, heads), n, dtype=torch.int32)
    kidx, kcnt = k.prune(0, X(), w[None].contiguous(), idx, cnt)
    return lists_to_mask(kidx, kcnt, n)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="*", default=[8192, 32768])
    ap.add_argument("--p", type=float, default=0.9)
    ap.add_argument("--snapshot", help="also the rows of this attention snapshot")
    ap.add_argument("--layers", help="snapshot layer slots, I,J,... (default: all)")
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    rows = [(f"synth {n}", synthetic(n)) for n in a.contexts]
    if a.snapshot:
        rows += snapshot_rows(a.snapshot, [int(x) for x in a.layers.split(",")]
                              if a.layers else None)
    t = Table(title=f"top-p {a.p}: bisection's stops against the minimal set")
    for c in ("rows", "stop", "minimal (median)", "kept (median)", "extra tokens (worst)",
              "extra mass (worst)"):
        t.add_column(c, justify="left" if c in ("rows", "stop") else "right")
    for name, w in rows:
        ref = top_p_mask(w, a.p)
        for sched in STOPS:
            kept = decide(sched, w, a.p)
            extra = (w.double() * (kept & ~ref)).sum(-1) / w.double().sum(-1)
            more = (kept.sum(-1) - ref.sum(-1)).float() / ref.sum(-1).clamp(min=1).float()
            stop = sched["bisect_stop"]
            t.add_row(name, f"{stop} {sched[f'bisect_{stop}']:g}",
                      f"{int(ref.sum(-1).median())}", f"{int(kept.sum(-1).median())}",
                      f"{100 * float(more.max()):.1f}%", f"{float(extra.max()):.2e}")
        t.add_section()
    Console().print(t)


if __name__ == "__main__":
    main()
