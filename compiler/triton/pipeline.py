"""``TritonCompiled``: the stage ABI of ``compiler/stages.py`` on generated Triton kernels.

Each stage is a method taking ``StageInputs`` and returning exactly the ABI tensors; ``run``
chains them. Buffers are planned once per shape (``_buf`` keeps them keyed by name, shape and
dtype, so a decode loop with a stable batch allocates nothing after the first step); there is no
Python loop over requests, heads or tokens — the only loop is over the pipeline's pruners.
Stage outputs are these planned buffers: valid until the same stage runs again (``run`` returns
a fresh output tensor).
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import Tensor

from ... import knobs
from .. import ir
from ..backend import Artifact, Target
from ..keycodes import KeyCodeSpec
from ..passes import budget_units, candidate_width
from ..stages import (
    StageInputs,
    check_page_ids,
    check_query_finite,
    run_stages,
    stage_inputs,
    v_sum_of,
)
from . import loader
from .append import codes_kernel_name
from .attend import shared_lists
from .expr import next_pow2
from .generate import generate, module_source
from .kernels import launch
from .select import select_rows, suffix
from .top_p import prune_rows


class TritonCompiled:
    """The Triton backend's ``StageKernels`` (``compiler.backend``)."""

    def __init__(self, p: ir.PipelineIR, shape: ir.Shape, schedule: dict, target: Target):
        self.p, self.shape, self.schedule, self.target = p, shape, schedule, target
        self.specs, tables = generate(p, shape, schedule)
        self.chan_table = tables.tensor()
        self.mat_table = tables.matrix_tensor()
        self.source = module_source(self.specs)
        self.artifacts = [Artifact(k.stage, k.name, k.source,
                                   metadata={"constexprs": k.const_dict,
                                             "num_warps": k.num_warps,
                                             "num_stages": k.num_stages})
                          for k in self.specs.values()]
        self._mod = None
        self.module_path = None  # the generated module's file, when it lives in a cache entry
        self.aot: dict | None = None  # variant → Triton CompiledKernel (``export``): no JIT
        self._bufs: dict[tuple, Tensor] = {}
        self._scores: dict[int, Tensor] = {}  # each scored selector's, of the latest step

    def fresh(self) -> TritonCompiled:
        """Another ``TritonCompiled`` over the same module and compiled kernels, with its own
        buffers (each ``twilight.load`` gets its own)."""
        other = copy.copy(self)
        other._bufs = {}
        return other

    # ---- plumbing ----------------------------------------------------------------------------
    @property
    def interpret(self) -> bool:
        return self.target.kind == "interpret"

    @property
    def module(self):
        if self._mod is None:
            self._mod = loader.load(self.source, self.interpret) if self.module_path is None \
                else loader.load_file(self.module_path, self.interpret)
        return self._mod

    def _launch(self, name: str, grid, *args, **consts) -> None:
        if self.aot is not None:  # kernels compiled ahead of time (a kernel-cache entry)
            spec = self.specs[name]
            kernel = self.aot[variant_name(name, consts)]
            values = spec.const_dict | consts
            kernel[grid](*args, *(values[c] for c, _ in spec.constexprs))
            return
        if self.interpret:
            mode = loader.interpreter_launch()
        else:  # a GPU launch in a process that also interprets needs JIT library functions
            ready = loader.interpreter_ready()
            mode = loader.jit_library() if ready else contextlib.nullcontext()
        with mode:
            launch(self.module, self.specs[name], grid, *args, **consts)

    def _buf(self, name: str, shape: tuple, dtype, device, fill=None) -> Tensor:
        key = (name, tuple(shape), dtype, str(device))
        if key not in self._bufs:
            self._bufs[key] = torch.empty(shape, dtype=dtype, device=device)
        t = self._bufs[key]
        return t if fill is None else t.fill_(fill)

    def _table(self, dev) -> Tensor:
        if self.chan_table.device != torch.device(dev):
            self.chan_table = self.chan_table.to(dev)
        return self.chan_table

    def _mats(self, dev) -> Tensor:
        if self.mat_table.device != torch.device(dev):
            self.mat_table = self.mat_table.to(dev)
        return self.mat_table

    def cand_width(self, t_max: int) -> int:
        """Width of the candidate lists for contexts up to ``t_max`` tokens."""
        return candidate_width(self.p, self.shape.group_size, max(1, t_max))

    def plan(self, batch: int, tokens: int) -> None:
        """Nothing to size ahead: buffers are made on the first step of a shape and kept
        (``_buf``), so a decode loop with a stable batch allocates nothing after it."""

    # ---- stages ------------------------------------------------------------------------------
    def select(self, x: StageInputs) -> tuple[Tensor, Tensor]:
        """``cand_idx int32 [B, Hq, C]`` (ascending, -1 padded) and ``cand_cnt int32 [B, Hq]``."""
        b, hq, _ = x.q.shape
        np_ = x.page_table.shape[1]
        # a bound of the longest context from the page table's width: no device sync
        dev, t_max = x.q.device, np_ * self.p.page_size
        width = self.cand_width(t_max)
        idx = self._buf("cand_idx", (b, hq, width), torch.int32, dev)
        cnt = self._buf("cand_cnt", (b, hq), torch.int32, dev)
        flags, numax = [self._buf("sel_dummy", (1,), torch.int8, dev)], [1]
        if self.p.selectors():
            flags, numax = [], []
            for i in range(len(self.p.selectors())):
                f, n = self._decide(x, i, np_, t_max)
                flags.append(f)
                numax.append(n)
        self._launch("select_compact", (b * hq,), *flags, x.lengths, idx, cnt, *numax, width)
        return idx, cnt

    def scores(self, x: StageInputs, part: int = 0) -> Tensor:
        """Scored selector ``part``'s scores ``float32 [B, rows, N]`` (a planned buffer: rows
        as ``select_rows``; ``-inf`` on invalid units and NaN scores)."""
        s, b, dev, cache = self.p.selectors()[part], x.q.shape[0], x.q.device, x.cache
        np_ = x.page_table.shape[1]
        per_page = s.score.per == "page"
        numax = max(1, np_ if per_page else np_ * self.p.page_size)
        rows = select_rows(s, self.shape)
        out = self._buf(f"scores{part}", (b, rows, numax), torch.float32, dev)
        if s.score.summary is not None:
            data = cache.summaries if per_page else cache.token_summaries
            data = [data[f"{s.score.summary.name}.{f}"] for f in s.score.summary.field_names()]
        elif s.estimator is not None:
            data = list(cache.key_codes[KeyCodeSpec.of(s.estimator)].tensors())
        else:
            data = [cache.k_pages]
        bn = self.schedule["select_block_n"]
        self._launch("select_score" + suffix(part), (b * rows, -(-numax // bn)), x.q,
                     x.page_table, x.lengths, *data, self._table(dev), self._mats(dev), out,
                     np_, numax)
        self._scores[part] = out
        return out

    def _decide(self, x: StageInputs, part: int, np_: int, t_max: int) -> tuple[Tensor, int]:
        s, b, dev = self.p.selectors()[part], x.q.shape[0], x.q.device
        scores = self.scores(x, part)
        numax, rows = scores.shape[-1], scores.shape[1]
        unit = self.p.page_size if s.score.per == "page" else 1
        kunits = (budget_units(s.budget, x.lengths, unit) if s.rule == "top_k"
                  else torch.zeros_like(x.lengths)).to(dev)
        hist = self._buf(f"sel_hist{part}", (b * rows, 1 << self.schedule["select_radix_bits"]),
                         torch.float64, dev)
        flags = self._buf(f"sel_flags{part}", (b, rows, numax), torch.int8, dev)
        scr = self._buf(f"sel_scr{part}", (b, rows, numax) if s.rule == "top_p" else (1,),
                        torch.float32, dev)
        thresh = float(s.threshold) if s.rule == "threshold" else 0.0
        self._launch("select_decide" + suffix(part), (b * rows,), scores, x.lengths, kunits,
                     hist, flags, scr, numax, thresh)
        return flags, numax

    def estimate(self, stage: int, x: StageInputs, cand_idx: Tensor, cand_cnt: Tensor) -> Tensor:
        """``est_w float32 [B, Hq, C]``: softmax of ``scale · q·K̃`` over each row's candidates."""
        b, hq, _ = x.q.shape
        width, dev = cand_idx.shape[-1], x.q.device
        e = self.p.prune[stage].estimator
        if e.kind == "exact":
            keys = [x.cache.k_pages]
        else:
            keys = list(x.cache.key_codes[KeyCodeSpec.of(e)].tensors())
        w = self._buf(f"est_w{stage}", (b, hq, width), torch.float32, dev)
        self._launch(f"estimate{stage}", (b * hq,), x.q, x.page_table, cand_idx, cand_cnt, *keys,
                     w, x.page_table.shape[1], width)
        return w

    def prune(self, stage: int, x: StageInputs, est_w: Tensor, cand_idx: Tensor,
              cand_cnt: Tensor) -> tuple[Tensor, Tensor]:
        """``kept_idx int32 [B, Hq, C]`` and ``kept_cnt int32 [B, Hq]`` (keep rules included)."""
        pr, (b, hq, width), dev = self.p.prune[stage], est_w.shape, est_w.device
        rows = prune_rows(pr, self.shape)
        bits = self.schedule.get("radix_bits", 8) if pr.rule == "top_p" \
            else self.schedule["select_radix_bits"]
        kunits = (budget_units(pr.budget, x.lengths, 1) if pr.rule == "top_k"
                  else torch.zeros_like(x.lengths)).to(dev)
        scr = self._buf(f"prune_scr{stage}", (b * rows, width), torch.float32, dev)
        hist = self._buf(f"prune_hist{stage}", (b * rows, 1 << bits), torch.float64, dev)
        flags = self._buf(f"prune_flags{stage}", (b * rows, width), torch.int8, dev)
        idx = self._buf(f"kept_idx{stage}", (b, hq, width), torch.int32, dev)
        cnt = self._buf(f"kept_cnt{stage}", (b, hq), torch.int32, dev)
        rowb = self.row_block(stage, width)
        if f"prune{stage}_compact" not in self.specs:  # fuse_prune_compact: one launch
            self._launch(f"prune{stage}_decide", (b * rows,), est_w, cand_cnt, kunits, scr,
                         hist, flags, cand_idx, x.lengths, idx, cnt, width, **rowb)
            return idx, cnt
        self._launch(f"prune{stage}_decide", (b * rows,), est_w, cand_cnt, kunits, scr, hist,
                     flags, width, **rowb)
        self._launch(f"prune{stage}_compact", (b * hq,), flags, cand_idx, cand_cnt, x.lengths,
                     idx, cnt, width)
        return idx, cnt

    def sorts(self, stage: int) -> bool:
        """Whether pruner ``stage`` sorts each row (top-p ``sort``: its block is a constexpr
        sized to the row, ``ROWB``)."""
        return self.p.prune[stage].rule == "top_p" and \
            self.schedule.get("top_p_strategy") == "sort"

    def row_block(self, stage: int, width: int) -> dict:
        """The launch-time constexprs of pruner ``stage``'s decide kernel for rows of
        ``width``: ``ROWB`` for the sort strategy, nothing otherwise (no recompiles)."""
        return {"ROWB": max(16, next_pow2(width))} if self.sorts(stage) else {}

    def attend(self, x: StageInputs, kept_idx: Tensor, kept_cnt: Tensor) -> Tensor:
        """``out [B, Hq, D]`` in q's dtype: exact attention over each head's kept list."""
        b, hq, d = x.q.shape
        dev, splits = x.q.device, self.schedule["attend_splits"]
        out = torch.empty_like(x.q)
        pacc = self._buf("pacc", (b, hq, splits, d), torch.float32, dev)
        pml = self._buf("pml", (b, hq, splits, 2), torch.float32, dev)
        groups = hq // self.shape.group_size if shared_lists(self.p) else hq
        self._launch("attend", (b * groups, splits), x.q, x.cache.k_pages, x.cache.v_pages,
                     x.page_table, kept_idx, kept_cnt, out, pacc, pml, x.page_table.shape[1],
                     kept_idx.shape[-1])
        if splits > 1:
            self._launch("attend_combine", (b * hq,), pacc, pml, out)
        if self.p.attend.mean_value:  # the selector's scores of this step: same object
            scores = self._scores[0]
            rid = torch.tensor(x.ids, dtype=torch.int64, device=dev)
            self._launch("attend_reallocate", (b * hq,), scores, x.lengths, rid, kept_idx,
                         kept_cnt, v_sum_of(x.cache), out, scores.shape[-1], kept_idx.shape[-1])
        return out

    def run(self, q, cache, req=None, return_lists: bool = False):
        if knobs.check_finite():
            check_query_finite(q, cache, req)
        return self.run_stages(stage_inputs(q, cache, req), return_lists)

    def run_stages(self, x: StageInputs, return_lists: bool = False):
        """The four stages on prepared inputs (what a decode loop times: no host sync)."""
        return run_stages(self, x, len(self.p.prune), return_lists)

    # ---- cache side --------------------------------------------------------------------------
    def refresh_pages(self, cache, pages: Tensor) -> None:
        """Recompute summaries and page-granularity codes (with their ``lo``/``hi``) of
        ``pages`` (int64 physical ids) with the generated append kernels (what
        ``PagedKVCache._update_pages`` does in torch)."""
        check_page_ids(cache, "refresh_pages", pages)
        pages = pages.to(torch.int64).contiguous()
        grid = (pages.numel(), self.shape.kv_heads)
        if not pages.numel():
            return
        for summ in self.p.summaries():
            outs = [cache.summaries[f"{summ.name}.{f}"] for f in summ.field_names()]
            self._launch(f"append_summary_{summ.name}", grid, cache.k_pages, pages,
                         cache.page_fill, self._table(pages.device), self._mats(pages.device),
                         *outs)
        for spec in KeyCodeSpec.of_pipeline(self.p, "page"):
            self._launch(codes_kernel_name(spec), grid, cache.k_pages, pages, cache.page_fill,
                         *cache.key_codes[spec].tensors())

    def refresh_tokens(self, cache, phys: Tensor, slot: Tensor) -> None:
        """Token summaries of the keys at ``(phys, slot)`` (int64 ``[N]``), and their codes in
        every token-granularity format the pipeline reads (smoothed ones with the cache's
        current factors)."""
        grid = (phys.numel(), self.shape.kv_heads)
        if not phys.numel():
            return
        check_page_ids(cache, "refresh_tokens", phys, slots=slot)
        phys, slot = phys.to(torch.int64).contiguous(), slot.to(torch.int64).contiguous()
        for summ in self.p.token_summaries():
            outs = [cache.token_summaries[f"{summ.name}.{f}"] for f in summ.field_names()]
            self._launch(f"append_token_summary_{summ.name}", grid, cache.k_pages, phys, slot,
                         self._table(phys.device), self._mats(phys.device), *outs)
        for spec in KeyCodeSpec.of_pipeline(self.p, "token"):
            self._launch(codes_kernel_name(spec), grid, cache.k_pages, phys, slot,
                         *cache.key_codes[spec].tensors())

    def refresh_groups(self, cache, gp: Tensor) -> None:
        """Min/max (at each group's first page) and codes of the groups ``gp int64 [N, G]``
        (physical pages, -1 where not allocated: ``PagedKVCache.group_pages``) for every
        group-granularity format of ``G`` pages the pipeline reads (what
        ``PagedKVCache.encode_groups`` does in torch)."""
        groups = KeyCodeSpec.of_pipeline(self.p, "group")
        formats = [sp for sp in groups if sp.group_pages == gp.shape[-1]]
        if gp.dim() != 2 or not formats:
            have = sorted({sp.group_pages for sp in groups})
            raise ValueError(f"refresh_groups: gp must be [N, G] with G among the pipeline's "
                             f"group sizes {have}, got {tuple(gp.shape)}")
        gp = gp.to(torch.int64).contiguous()
        if not gp.shape[0]:
            return
        check_page_ids(cache, "refresh_groups", gp, missing_ok=True)
        for spec in formats:
            self._launch(codes_kernel_name(spec), (gp.shape[0], self.shape.kv_heads),
                         cache.k_pages, gp, cache.page_fill, *cache.key_codes[spec].tensors())


def variant_name(name: str, consts: dict) -> str:
    """The name of a kernel compiled with launch-time constexprs ``consts`` (``prune0_decide``,
    ``prune0_decide.ROWB1024``)."""
    return ".".join([name, *(f"{k}{v}" for k, v in sorted(consts.items()))])

