"""A pipeline lowered to TVM kernels: ``plan()`` sizes scratch once per batch shape, ``run()``
calls the stage kernels in order on torch tensors (zero copy), with no loop over heads.

Widths: the candidate lists hold at most the selector's budget (pages × page size) plus the
keep rules' tokens; kept lists at most the candidates. Scratch is sized for a context rounded
up to a multiple of ``_ROUND`` tokens, so a growing context re-plans rarely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ... import knobs
from .. import stages
from ..backend import CPU_THREADS, Artifact
from ..keycodes import KeyCodeSpec
from ..passes import budget_units, list_widths
from ..stages import PagedCache
from .append import AppendMixin, append_sources, gen_summaries, gen_token_summaries
from .attend import attend_rows, gen_attend, gen_combine, gen_reallocate, splits
from .build import Kernel, aligned, build, member, pool_threads, set_threads
from .context import StageCtx
from .estimate import gen_estimate
from .expr import channel_tables, matrices, matrix_rows, table_rows
from .fused import FUSED, fusable, gen_fused
from .fused_call import FusedCall
from .rank import gen_candidates, gen_rank
from .select import gen_score, kernel_suffix, score_rows
from .top_p import decision_rows, gen_decide, gen_kept

_ROUND = 1024
MAX_SPLITS = 8
_ALIGN_W = 64  # list widths are multiples of this
_TIER = 256  # the fused step's scratch narrows to the context in steps of this many tokens


@dataclass
class Plan:
    batch: int
    tokens: int  # context capacity (tokens)
    bufs: dict
    fused: FusedCall | None = None
    ids: list[int] | None = None  # the requests ``bufs["rows"]`` holds
    tiers: dict = field(default_factory=dict)  # narrower fused calls (``TVMCompiled.tier``)


class TVMCompiled(AppendMixin):
    """The TVM backend's ``StageKernels`` (``compiler.backend``)."""

    def __init__(self, ctx: StageCtx, target, kernels: dict[str, Kernel] | None = None):
        """Builds every stage kernel, or takes ``kernels`` (name → Kernel, e.g. loaded from an
        exported library by ``artifacts.load_pipeline``) as they are."""
        ctx.check_supported()
        self.ctx, self.target, self.p = ctx, target, ctx.p
        self.kernels: dict[str, Kernel] = dict(kernels or {})
        if kernels is None:
            threads = int(ctx.sched.get("threads", 0))
            srcs = list(self._sources())
            fused = [src for src in srcs if src.name == FUSED]
            if fused:  # llvm: one module holds every kernel (one compile)
                module = build(fused[0], target, threads)
                self.kernels = {src.name: module if src.name == FUSED else member(src, module)
                                for src in srcs}
            else:
                self.kernels = {src.name: build(src, target, threads) for src in srcs}
        self.parts = self.p.selectors()
        self.tables = [_constants([sel.score.expr], ctx.HKV) for sel in self.parts]
        self.summary_tables = {sm.name: _constants([f.expr for f in sm.fields], ctx.HKV)
                               for sm in self.p.summaries() + self.p.token_summaries()}
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
        """List widths: candidates, then after each pruner (``passes.list_widths``), rounded up
        to ``_ALIGN_W`` so that list rows start 64-byte aligned (kept lists read words)."""
        return [-(-c // _ALIGN_W) * _ALIGN_W for c in list_widths(self.p, self.ctx.G, tokens)]

    def plan(self, batch: int, tokens: int) -> Plan:
        """Scratch for ``batch`` requests of up to ``tokens`` tokens (rounded up)."""
        tokens = max(_ROUND, -(-tokens // _ROUND) * _ROUND)
        zeroed = {"kunits", "k", "nsplit"}  # as before: budgets the host fills, split count
        b = {n: (torch.zeros if n.rstrip("0123456789") in zeroed else torch.empty)(
                 shape, dtype=dt) for n, (shape, dt) in self._shapes(batch, tokens).items()}
        self.plan_ = Plan(batch, tokens, b)
        if FUSED in self.kernels:
            self._plan_fused(self.plan_)
        return self.plan_

    def _shapes(self, batch: int, tokens: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The plan's scratch tensors (shape, dtype) for ``batch`` requests of ``tokens``
        tokens: every one is contiguous, so that a narrower plan's is a prefix of a wider one's
        (``tier``)."""
        ctx, f32, i32, u8 = self.ctx, torch.float32, torch.int32, torch.uint8
        widths = self.widths(tokens)
        b: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for i, sel in enumerate(self.parts):
            hs, _ = score_rows(ctx, i)
            n = -(-tokens // ctx.PS) if sel.score.per == "page" else tokens
            b[f"scores{i}"] = ((batch, hs, n), f32)
            b[f"sel{i}"] = ((batch, hs, n), u8)
            b[f"kunits{i}"] = ((batch,), i32)
        if not ctx.dialect.cuda:  # its length is the split count (estimate; see splits_for)
            b["nsplit"] = ((splits_for(ctx, batch),), i32)
        b["idx0"] = ((batch, ctx.HQ, widths[0]), i32)
        b["cnt0"] = ((batch, ctx.HQ), i32)
        for i, pr in enumerate(self.p.prune):
            c, rows = widths[i], decision_rows(ctx, i)[0]
            b[f"w{i}"] = ((batch, ctx.HQ, c), f32)
            b[f"dec{i}"] = ((batch, ctx.HQ, c), u8)
            b[f"k{i}"] = ((batch,), i32)
            if self._strategy(pr) == "sort":
                for nm, dt in (("ka", torch.uint32), ("ia", i32), ("kb", torch.uint32),
                               ("ib", i32)):
                    b[f"{nm}{i}"] = ((batch, rows, c), dt)
            b[f"idx{i + 1}"] = ((batch, ctx.HQ, widths[i + 1]), i32)
            b[f"cnt{i + 1}"] = ((batch, ctx.HQ), i32)
        if splits(ctx) != 1:
            ns = splits(ctx) or splits_for(ctx, batch)
            b["pacc"] = ((batch, ctx.HQ, ns, ctx.D), f32)
            b["pml"] = ((batch, ctx.HQ, ns, 2), f32)
        if FUSED in self.kernels:  # the fused step's gathered page-table rows
            b["pt"] = ((batch, tokens // ctx.PS), i32)
        return b

    def _plan_fused(self, plan: Plan) -> None:
        """The fused step's own scratch: the batch's rows and lengths, and what an append
        touched (pages, slots, groups)."""
        b, e64 = plan.batch, dict(dtype=torch.int64)
        bufs = plan.bufs
        bufs["rows"] = torch.zeros(b, **e64)
        bufs["lens"] = torch.empty(b, dtype=torch.int32)
        bufs["touched"], bufs["tslot"] = torch.empty(b, **e64), torch.empty(b, **e64)
        for spec in KeyCodeSpec.of_pipeline(self.p, "group"):
            bufs[f"gp{spec.group_pages}"] = torch.empty(b, spec.group_pages, **e64)
        plan.fused = self._fused_call(bufs)

    def _fused_call(self, bufs: dict[str, torch.Tensor]) -> FusedCall:
        tables = {f"tbl{i}": t for i, t in enumerate(self.tables[0] if self.tables else [])}
        tables |= {f"stbl_{name}_{i}": t for name, ts in self.summary_tables.items()
                   for i, t in enumerate(ts)}
        scratch = {k: v for k, v in bufs.items() if k != "rows"}
        return FusedCall(self.ctx, self.kernels[FUSED], scratch, tables)

    def tier(self, plan: Plan, need: int) -> tuple[FusedCall, dict[str, torch.Tensor]]:
        """The fused call for contexts of up to ``need`` tokens and its scratch: the plan's
        buffers narrowed to ``need`` rounded up to ``_TIER`` tokens (prefix views, no copy), so
        that a step's loops over list and page-table widths follow the context, not the
        plan's capacity (a plan for 32k tokens serving a 2k context would otherwise clear and
        scan 16 times the lists it uses)."""
        unit = _TIER * self.ctx.PS // math.gcd(_TIER, self.ctx.PS)
        t = min(plan.tokens, -(-need // unit) * unit)
        if t == plan.tokens:
            return plan.fused, plan.bufs
        if t not in plan.tiers:
            bufs = dict(plan.bufs)
            for n, (shape, _) in self._shapes(plan.batch, t).items():
                if tuple(bufs[n].shape) != shape:
                    bufs[n] = bufs[n].view(-1)[:math.prod(shape)].view(shape)
            plan.tiers[t] = (self._fused_call(bufs), bufs)
        return plan.tiers[t]

    def _strategy(self, pr) -> str:
        return self.ctx.sched.get("top_p_strategy", "bisect") if pr.rule == "top_p" else pr.rule

    # ---- run ----------------------------------------------------------------------------------
    def run(self, q, cache: PagedCache, req=None, return_lists: bool = False):
        if knobs.check_finite():
            stages.check_query_finite(q, cache, req)
        return stages.run_stages(self, self.inputs(q, cache, req), len(self.p.prune),
                                 return_lists)

    @property
    def fused(self) -> bool:
        """Is there a fused module (llvm): one FFI call per step (``call_fused``)?"""
        return FUSED in self.kernels

    def call_fused(self, q, cache: PagedCache, ids: list[int], k=None, v=None, out=None,
                   return_lists: bool = False):
        """The pipeline's output ``[B, Hq, D]`` for queries ``q`` (aligned, contiguous) of
        requests ``ids``, in one call of the fused module; with ``k``/``v`` ``[B, Hkv, D]``
        (aligned) it first appends them, one token per request (``cache.reserve`` makes room,
        ``cache.advance`` records it: host bookkeeping, no tensor read)."""
        if not self.fused:
            raise TypeError(f"call_fused: pipeline {self.p.name!r} has no fused module (see "
                            "compiler.tvm.fused.fusable); run it stage by stage")
        grow = 0 if k is None else 1
        need = max(cache.length(r) for r in ids) + grow
        p = self.plan_
        if p is None or p.batch != len(ids) or p.tokens < need:  # a longer context: double
            keep = 0 if p is None else p.tokens if p.tokens >= need else 2 * p.tokens
            p = self.plan(len(ids), max(need, keep))
        if p.ids != ids:
            p.bufs["rows"].copy_(torch.tensor(ids, dtype=torch.int64))
            p.ids = list(ids)
        out = torch.empty_like(q) if out is None else out
        set_threads(CPU_THREADS.get() or int(self.ctx.sched.get("threads", 0)))
        call, bufs = self.tier(p, need)
        if grow:
            cache.reserve(ids)
            call("step", cache, q=q, knew=k, vnew=v, rows=p.bufs["rows"], out=out)
            cache.advance(ids)
        else:
            call("run", cache, q=q, rows=p.bufs["rows"], out=out)
        if return_lists:
            n = len(self.p.prune)
            return out, (bufs[f"idx{n}"], bufs[f"cnt{n}"])
        return out

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
        set_threads(CPU_THREADS.get() or int(self.ctx.sched.get("threads", 0)))
        return p.bufs

    def select(self, x: stages.StageInputs):
        bufs, k = self._ensure_plan(x), self.kernels
        for i, sel in enumerate(self.parts):
            self.scores(x, i)
            if sel.rule == "top_k":
                unit = x.cache.page_size if sel.score.per == "page" else 1
                budget_units(sel.budget, x.lengths, unit, bufs[f"kunits{i}"])
            k["rank" + kernel_suffix(i)](bufs[f"scores{i}"], x.lengths, bufs[f"kunits{i}"],
                                         bufs[f"sel{i}"])
        flags = [bufs[f"sel{i}"] for i in range(len(self.parts))]
        k["candidates"](x.lengths, *flags, bufs["idx0"], bufs["cnt0"])
        return bufs["idx0"], bufs["cnt0"]

    def scores(self, x: stages.StageInputs, part: int = 0) -> torch.Tensor:
        """Scored selector ``part``'s scores ``float32 [B, HS, N]`` (a planned buffer: rows as
        ``select.score_rows``; ``-inf`` on invalid units and NaN scores)."""
        bufs = self._ensure_plan(x)
        out = bufs[f"scores{part}"]
        self.kernels["score" + kernel_suffix(part)](
            x.q, x.page_table, x.lengths, *self._score_leaves(x.cache, part),
            *self.tables[part], out, *([] if self.ctx.dialect.cuda else [bufs["nsplit"]]))
        return out

    def _score_leaves(self, cache: PagedCache, part: int) -> list[torch.Tensor]:
        sel = self.parts[part]
        sc = sel.score
        if sc.summary is not None:
            data = cache.summaries if sc.per == "page" else cache.token_summaries
            return [data[f"{sc.summary.name}.{f}"] for f in sc.summary.field_names()]
        if sel.estimator is None:
            return [cache.k_pages]
        return list(cache.key_codes[KeyCodeSpec.of(sel.estimator)].tensors())

    def estimate(self, stage: int, x: stages.StageInputs, idx, cnt) -> torch.Tensor:
        bufs = self._ensure_plan(x)
        w = _fit(bufs[f"w{stage}"], idx)
        e = self.p.prune[stage].estimator
        if e.kind == "exact":
            keys = [x.cache.k_pages]
        else:
            keys = list(x.cache.key_codes[KeyCodeSpec.of(e)].tensors())
        extra = [] if self.ctx.dialect.cuda else [bufs["nsplit"]]
        self.kernels[f"estimate{stage}"](x.q, x.page_table, aligned(idx), aligned(cnt), *keys, w,
                                         *extra)
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
        if self.p.attend.mean_value:  # the selector's scores of this step: same object
            rid = torch.tensor(x.ids, dtype=torch.int64)
            self.kernels["reallocate"](bufs["scores0"], x.lengths, rid, aligned(idx),
                                       aligned(cnt), stages.v_sum_of(c), out)
        return out


def pipeline_sources(ctx: StageCtx):
    """The TVMScript of every kernel a pipeline needs, in call order (text only: cheap)."""
    p = ctx.p
    for i, _ in enumerate(p.selectors()):
        yield gen_score(ctx, i)
        yield gen_rank(ctx, i)
    yield gen_candidates(ctx)
    for i, _ in enumerate(p.prune):
        yield gen_estimate(ctx, i)
        yield gen_decide(ctx, i)
        yield gen_kept(ctx, i)
    yield gen_attend(ctx)
    if splits(ctx) != 1:
        yield gen_combine(ctx)
    if p.attend.mean_value:
        yield gen_reallocate(ctx)
    for summ in p.summaries():
        yield gen_summaries(ctx, summ)
    for summ in p.token_summaries():
        yield gen_token_summaries(ctx, summ)
    yield from append_sources(ctx)
    if not ctx.dialect.cuda and fusable(p):
        yield gen_fused(ctx)


def splits_for(ctx: StageCtx, batch: int) -> int:
    """Splits of each row's candidates over the threads: ``split_kv`` when the schedule fixes
    it, else enough rows (two a thread) to fill the cores when ``batch × kv_heads`` cannot.
    The cores are the threads the kernels will run on: ``CPU_THREADS`` where the caller set it
    (inside a model, ``hf_attention``, the torch op), else the schedule's, at most the pool.
    A plan made under one setting and run under another is still right, only split for other
    cores."""
    fixed = int(ctx.sched.get("split_kv", 0))
    if fixed:
        return fixed
    pool = pool_threads()  # what the loops run on: a schedule's threads past it run on it
    cores = min(CPU_THREADS.get() or int(ctx.sched.get("threads", 0)) or pool, pool)
    rows = batch * ctx.HKV
    return max(1, min(MAX_SPLITS, -(-2 * cores // rows)))


def _fit(buf: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """A planned ``[B, H, Cmax]`` scratch when the lists are exactly that wide (they are: widths
    come from the same plan); a fresh buffer otherwise (lists from another producer)."""
    if buf.shape[2] == idx.shape[2] and buf.shape[0] == idx.shape[0]:
        return buf
    return torch.empty(buf.shape[0], buf.shape[1], idx.shape[2], dtype=buf.dtype)


def _constants(exprs, kv_heads: int) -> list[torch.Tensor]:
    """The ``take`` channel tables (int32 ``[Hkv, r]``), then the projection matrices (float32
    ``[Hkv, D, R]``) of some expressions: the buffers their kernels take after the data."""
    tables = [torch.tensor(table_rows(t, kv_heads), dtype=torch.int32)
              for t in channel_tables(exprs)]
    mats = [torch.tensor(matrix_rows(m, kv_heads), dtype=torch.float32) for m in matrices(exprs)]
    return [aligned(t.contiguous()) for t in tables + mats]


def attend_info(ctx: StageCtx) -> dict:
    rows, gh = attend_rows(ctx)
    return {"rows_per_request": rows * (splits(ctx) or splits_for(ctx, 1)), "heads_per_row": gh}
