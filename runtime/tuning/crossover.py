"""Where dense attention wins: the context below which a loaded pipeline should run dense.

A sparse pipeline pays fixed costs (select, estimate, top-p over the candidates) that dense
attention does not; at short contexts, or in a layer whose attention is flat (top-p keeps a
quarter of the tokens), dense attention is faster. :func:`measure_crossover` times, on a ladder
of contexts (powers of two from 128 up to the bucket's), the tuned pipeline through the served
path and each dense implementation a loaded pipeline can fall back to
(:mod:`twilight.runtime.serving.dense`), all reading the same paged cache, each timed as
the trials and ``eval`` time a served pipeline (``served_ms``). The result:

* ``impl`` — the faster dense implementation over the ladder (measured, not assumed);
* ``dense_below`` — the context from which the pipeline beats ``impl`` at every larger ladder
  context (interpolated between the two ladder points around the last crossing; 0 when it wins
  everywhere, the bucket's context + 1 when it loses at the bucket's context): ``load()`` runs
  dense below it;
* ``layers`` — the same per model layer on a snapshot (real keys; below a snapshot's own
  context each request keeps its attention sink and its last tokens, ``c`` in all:
  ``problems.window``).

Example::

    cross = measure_crossover(cfg, bucket, schedule, problems_at, baseline_dtype="float32")
    cross.dense_below, cross.impl, cross.table()
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..evaluation.measure import Problem, served_ms
from ..serving.load import DecodePipeline, dense_fallback, load
from ..store.tuning_log import ShapeBucket
from .tuner import TuneConfig

__all__ = ["Crossover", "crossover_point", "ladder", "measure_crossover"]

SMALLEST = 128


def ladder(context: int, smallest: int = SMALLEST) -> list[int]:
    """Powers of two from ``smallest`` below ``context``, then ``context`` itself."""
    out, c = [], smallest
    while c < context:
        out.append(c)
        c *= 2
    return [*out, context]


def crossover_point(contexts: list[int], sparse: list[float], dense: list[float],
                    align: int = 16) -> int:
    """The context from which ``sparse`` is faster than ``dense`` at every larger ladder point:
    between the last ladder point where dense wins and the next, where the two (about linear in
    the context) cross, rounded up to ``align`` tokens; 0 when sparse is faster everywhere,
    ``contexts[-1] + 1`` when it is not faster at the largest."""
    last = max((i for i, (s, d) in enumerate(zip(sparse, dense, strict=True)) if s >= d),
               default=None)
    if last is None:
        return 0
    if last == len(contexts) - 1:
        return contexts[-1] + 1
    (c1, c2), f1, f2 = contexts[last:last + 2], sparse[last] - dense[last], \
        sparse[last + 1] - dense[last + 1]
    cross = c1 + (c2 - c1) * f1 / (f1 - f2)
    return min(c2, max(c1 + 1, -(-int(cross) // align) * align))


@dataclass
class Crossover:
    dense_below: int
    impl: str
    contexts: list[int]
    sparse_ms: list[float]
    dense_ms: dict[str, list[float]]
    layers: dict[int, dict] = field(default_factory=dict)  # layer → dense_below, series

    def served_ms(self) -> float:
        """ms per step of what ``load()`` serves at the largest context: per layer (where
        measured) the dense fallback below its threshold, else the pipeline."""
        c = self.contexts[-1]
        if not self.layers:
            return self.dense_ms[self.impl][-1] if c < self.dense_below else self.sparse_ms[-1]
        return sum(v["dense_ms"][-1] if c < v["dense_below"] else v["sparse_ms"][-1]
                   for v in self.layers.values())

    def record(self) -> dict:
        """The tuning-log fields: what ``load()`` reads and what was measured."""
        rnd = lambda xs: [round(x, 4) for x in xs]  # noqa: E731
        out = {"served_latency_ms": round(self.served_ms(), 4),
               "dense_below": self.dense_below, "dense_impl": self.impl,
               "crossover": {"contexts": self.contexts, "sparse_ms": rnd(self.sparse_ms),
                             **{f"dense_ms[{k}]": rnd(v) for k, v in self.dense_ms.items()}}}
        if self.layers:
            out["dense_below_layers"] = {str(k): v["dense_below"] for k, v in self.layers.items()}
            out["crossover"]["layers"] = {
                str(k): {"sparse_ms": rnd(v["sparse_ms"]), "dense_ms": rnd(v["dense_ms"])}
                for k, v in self.layers.items()}
        return out


def measure_crossover(cfg: TuneConfig, schedule: dict, contexts: list[int],
                      problems_at: Callable[[int], list[Problem]], baseline_dtype: str,
                      repeats: int = 10,
                      on_point: Callable[[int], None] | None = None,
                      dense_schedule: dict | None = None,
                      bucket: ShapeBucket | None = None) -> Crossover:
    """Time ``schedule``'s pipeline (served path) against each dense fallback (the backend's
    dense kernels with ``dense_schedule``, default its logged one for ``bucket``; torch SDPA in
    ``baseline_dtype`` over the gathered pages) at every context of ``contexts`` on
    ``problems_at(c)`` (summed over them; per layer as well)."""
    sparse = load(cfg.pipeline, cfg.device.name, cfg.shape, cfg.backend, schedule=schedule,
                  target=cfg.target, dense_below=0)
    kinds = ["kernels"] + ([f"sdpa:{baseline_dtype}"] if cfg.pipeline.attend.softcap is None
                           else [])
    fallbacks = {k: dense_fallback(cfg.pipeline, cfg.shape, cfg.backend, cfg.target, k,
                                   device=cfg.device, bucket=bucket, schedule=dense_schedule)
                 for k in kinds}
    dense = {k: DecodePipeline(cfg.pipeline, cfg.shape, cfg.backend, cfg.target,
                               sparse.schedule, "crossover", sparse.compiled, "lowered", None,
                               dense_below=1 << 62, dense=f) for k, f in fallbacks.items()}
    series: dict[str, list[float]] = {"sparse": [], **{k: [] for k in kinds}}
    per_layer: dict[int, dict[str, list[float]]] = {}
    for c in contexts:
        sums = dict.fromkeys(series, 0.0)
        for prob in problems_at(c):
            ms = _time_problem(sparse, dense, prob, repeats)
            for name, t in ms.items():
                sums[name] += t
            if prob.layer is not None:
                row = per_layer.setdefault(prob.layer, {n: [] for n in series})
                for name, t in ms.items():
                    row[name].append(t)
        for name, t in sums.items():
            series[name].append(t)
        if on_point:
            on_point(c)
    impl = min(kinds, key=lambda k: sum(series[k]))
    layers = {layer: {"sparse_ms": row["sparse"], "dense_ms": row[impl],
                      "dense_below": crossover_point(contexts, row["sparse"], row[impl])}
              for layer, row in per_layer.items() if len(row["sparse"]) == len(contexts)}
    return Crossover(crossover_point(contexts, series["sparse"], series[impl]), impl, contexts,
                     series["sparse"], {k: series[k] for k in kinds}, layers)


def _time_problem(sparse: DecodePipeline, dense: dict[str, DecodePipeline], prob: Problem,
                  repeats: int) -> dict[str, float]:
    """ms per step of the sparse pipeline and each dense fallback on ``prob``, each timed as
    ``served_ms`` times a trial and ``eval`` (plan, then call after call), one after the other.

    Not call by call in turns: a call right after another implementation's pays for what that
    one left behind. On a 2-core VM a fused decode step that takes 1.75 ms call after call took
    2.5 ms right after an SDPA fallback's call, and about six calls to come back down; in turns
    the series read ~1.5x slower than the trials and ``eval`` that timed the same problem."""
    return {name: served_ms(dp, prob, repeats)
            for name, dp in {"sparse": sparse, **dense}.items()}
