"""A pipeline lowered to TVM kernels: ``plan()`` sizes scratch once per batch shape, ``run()``
calls the stage kernels in order on torch tensors (zero copy), with no loop over heads.

Widths: the candidate lists hold at most the selector's budget (pages × page size) plus the
keep rules' tokens; kept lists at most the candidates. Scratch is sized for a context rounded
up to a multiple of ``_ROUND`` tokens, so a growing context re-plans rarely.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import stages
from ..backend import Artifact
from ..keycodes import KeyCodeSpec
from ..passes import budget_units, list_widths
from ..stages import PagedCache
from .append import AppendMixin, append_sources, gen_summaries
from .attend import attend_rows, gen_attend, gen_combine, splits
from .build import Kernel, aligned, build, set_threads
from .context import StageCtx
from .estimate import gen_estimate
from .expr import channel_tables, table_rows
from .select import gen_candidates, gen_rank, gen_score, score_rows
from .top_p import decision_rows, gen_decide, gen_kept

_ROUND = 1024


@dataclass
class Plan:
    batch: int
    tokens: int  # context capacity (tokens)
    bufs: dict


class TVMCompiled(AppendMixin):
    """The TVM backend's ``StageKernels`` (``compiler.backend``)."""

    def __init__(self, ctx: StageCtx, target, kernels: dict[str, Kernel] | None = None):
        """Builds every stage kernel, or takes ``kernels`` (name → Kernel, e.g. loaded from an
        exported library by ``artifacts.load_pipeline``) as they are."""
        ctx.check_supported()
        self.ctx, self.target, self.p = ctx, target, ctx.p
        self.kernels: dict[str, Kernel] = dict(kernels or {})
        if kernels is None:
            for src in self._sources():
                self.kernels[src.name] = build(src, target, int(ctx.sched.get("threads", 0)))
        sel = self.p.select
        exprs = [sel.score.expr] if sel and sel.score else []
        self.tables = [aligned(torch.tensor(table_rows(t, ctx.HKV), dtype=torch.int32))
                       for t in channel_tables(exprs)]
        sexprs = [f.expr for sm in self.p.summaries() for f in sm.fields]
        self.summary_tables = [aligned(torch.tensor(table_rows(t, ctx.HKV), dtype=torch.int32))
                               for t in channel_tables(sexprs)]
        self.plan_: Plan | None = None
        self._artifacts: list[Artifact] | None = None

    def _sources(self):
        return pipeline_sources(self.ctx)

    @property
    def artifacts(self) -> list[Artifact]:
        if self._artifacts is None:
            self._artifacts = [k.artifact() for k in self.kernels.values()]
        return self._artifacts

    # ---- plan ---------------------------------------------------------------------------------
    def widths(self, tokens: int) -> list[int]:
        """List widths: candidates, then after each pruner (``passes.list_widths``)."""
        return list_widths(self.p, self.ctx.G, tokens)

    def plan(self, batch: int, tokens: int) -> Plan:
        """Scratch for ``batch`` requests of up to ``tokens`` tokens (rounded up)."""
        ctx = self.ctx
        tokens = max(_ROUND, -(-tokens // _ROUND) * _ROUND)
        e32 = dict(dtype=torch.int32)
        widths = self.widths(tokens)
        b: dict[str, torch.Tensor] = {}
        sel = self.p.select
        if sel is not None and sel.score is not None:
            hs, _ = score_rows(ctx)
            n = -(-tokens // ctx.PS) if sel.score.per == "page" else tokens
            b["scores"] = torch.empty(batch, hs, n)
            b["sel"] = torch.empty(batch, hs, n, dtype=torch.uint8)
        b["kunits"] = torch.zeros(batch, **e32)
        b["idx0"] = torch.empty(batch, ctx.HQ, widths[0], **e32)
        b["cnt0"] = torch.empty(batch, ctx.HQ, **e32)
        for i, pr in enumerate(self.p.prune):
            c, rows = widths[i], decision_rows(ctx, i)[0]
            b[f"w{i}"] = torch.empty(batch, ctx.HQ, c)
            b[f"dec{i}"] = torch.empty(batch, ctx.HQ, c, dtype=torch.uint8)
            b[f"k{i}"] = torch.zeros(batch, **e32)
            if self._strategy(pr) == "sort":
                for nm, dt in (("ka", torch.uint32), ("ia", torch.int32), ("kb", torch.uint32),
                               ("ib", torch.int32)):
                    b[f"{nm}{i}"] = torch.empty(batch, rows, c, dtype=dt)
            b[f"idx{i + 1}"] = torch.empty(batch, ctx.HQ, widths[i + 1], **e32)
            b[f"cnt{i + 1}"] = torch.empty(batch, ctx.HQ, **e32)
        if splits(ctx) > 1:
            b["pacc"] = torch.empty(batch, ctx.HQ, splits(ctx), ctx.D)
            b["pml"] = torch.empty(batch, ctx.HQ, splits(ctx), 2)
        self.plan_ = Plan(batch, tokens, b)
        return self.plan_

    def _strategy(self, pr) -> str:
        return self.ctx.sched.get("top_p_strategy", "bisect") if pr.rule == "top_p" else pr.rule

    # ---- run ----------------------------------------------------------------------------------
    def run(self, q, cache: PagedCache, req=None, return_lists: bool = False):
        return stages.run_stages(self, self.inputs(q, cache, req), len(self.p.prune),
                                 return_lists)

    def inputs(self, q, cache: PagedCache, req=None) -> stages.StageInputs:
        """The stage inputs of requests ``req``: their page-table rows and lengths as int32."""
        ids = cache.resolve_ids(req)
        rows = torch.tensor(ids, dtype=torch.int64)
        pt = cache.page_table.index_select(0, rows)
        lens = cache.lengths.index_select(0, rows).to(torch.int32)
        return stages.StageInputs(aligned(q), pt, lens, cache, ids)

    def _ensure_plan(self, x: stages.StageInputs) -> dict:
        b, t = x.q.shape[0], x.max_len
        p = self.plan_
        if p is None or p.batch != b or p.tokens < t:
            p = self.plan(b, t)
        set_threads(int(self.ctx.sched.get("threads", 0)))
        return p.bufs

    def select(self, x: stages.StageInputs):
        bufs, sel, k = self._ensure_plan(x), self.p.select, self.kernels
        if sel is not None and sel.score is not None:
            leaves = self._score_leaves(x.cache)
            k["score"](x.q, x.page_table, x.lengths, *leaves, *self.tables, bufs["scores"])
            if sel.rule == "top_k":
                unit = x.cache.page_size if sel.score.per == "page" else 1
                budget_units(sel.budget, x.lengths, unit, bufs["kunits"])
            k["rank"](bufs["scores"], x.lengths, bufs["kunits"], bufs["sel"])
            k["candidates"](x.lengths, bufs["sel"], bufs["idx0"], bufs["cnt0"])
        else:
            k["candidates"](x.lengths, bufs["idx0"], bufs["cnt0"])
        return bufs["idx0"], bufs["cnt0"]

    def _score_leaves(self, cache: PagedCache) -> list[torch.Tensor]:
        sc = self.p.select.score
        if sc.per == "token":
            return [cache.k_pages]
        return [cache.summaries[f"{sc.summary.name}.{f}"] for f in sc.summary.field_names()]

    def estimate(self, stage: int, x: stages.StageInputs, idx, cnt) -> torch.Tensor:
        bufs = self._ensure_plan(x)
        w = _fit(bufs[f"w{stage}"], idx)
        e = self.p.prune[stage].estimator
        if e.kind == "exact":
            keys = [x.cache.k_pages]
        else:
            keys = list(x.cache.key_codes[KeyCodeSpec.of(e)].tensors())
        self.kernels[f"estimate{stage}"](x.q, x.page_table, aligned(idx), aligned(cnt), *keys, w)
        return w

    def prune(self, stage: int, x: stages.StageInputs, w, idx, cnt):
        bufs, pr = self._ensure_plan(x), self.p.prune[stage]
        dec = _fit(bufs[f"dec{stage}"], idx)
        if pr.rule == "top_k":
            budget_units(pr.budget, x.lengths, 1, bufs[f"k{stage}"])
        extra = []
        if self._strategy(pr) == "sort":
            extra = [_fit(bufs[f"{nm}{stage}"], idx) for nm in ("ka", "ia", "kb", "ib")]
        self.kernels[f"decide{stage}"](aligned(w), aligned(cnt), bufs[f"k{stage}"], dec, *extra)
        kidx, kcnt = bufs[f"idx{stage + 1}"], bufs[f"cnt{stage + 1}"]
        self.kernels[f"kept{stage}"](x.lengths, aligned(idx), aligned(cnt), dec, kidx, kcnt)
        return kidx, kcnt

    def attend(self, x: stages.StageInputs, idx, cnt) -> torch.Tensor:
        bufs = self._ensure_plan(x)
        q, c = x.q, x.cache
        out = torch.empty_like(q)
        args = (q, x.page_table, aligned(idx), aligned(cnt), c.k_pages, c.v_pages)
        if splits(self.ctx) == 1:
            self.kernels["attend"](*args, out)
        else:
            self.kernels["attend"](*args, bufs["pacc"], bufs["pml"])
            self.kernels["combine"](bufs["pacc"], bufs["pml"], out)
        return out


def pipeline_sources(ctx: StageCtx):
    """The TVMScript of every kernel a pipeline needs, in call order (text only: cheap)."""
    p = ctx.p
    sel = p.select
    if sel is not None and sel.score is not None:
        yield gen_score(ctx)
        yield gen_rank(ctx)
    yield gen_candidates(ctx)
    for i, _ in enumerate(p.prune):
        yield gen_estimate(ctx, i)
        yield gen_decide(ctx, i)
        yield gen_kept(ctx, i)
    yield gen_attend(ctx)
    if splits(ctx) > 1:
        yield gen_combine(ctx)
    for summ in p.summaries():
        yield gen_summaries(ctx, summ)
    yield from append_sources(ctx)


def _fit(buf: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """A planned ``[B, H, Cmax]`` scratch when the lists are exactly that wide (they are: widths
    come from the same plan); a fresh buffer otherwise (lists from another producer)."""
    if buf.shape[2] == idx.shape[2] and buf.shape[0] == idx.shape[0]:
        return buf
    return torch.empty(buf.shape[0], buf.shape[1], idx.shape[2], dtype=buf.dtype)


def attend_info(ctx: StageCtx) -> dict:
    rows, gh = attend_rows(ctx)
    return {"rows_per_request": rows * splits(ctx), "heads_per_row": gh}
