"""One compiled call per decode step (llvm): a pipeline's stage kernels as private subroutines of
one IRModule, and two public entry points that run them in order without returning to Python.
The module also exports each stage kernel under its own name (a thin wrapper over the same
subroutine), so the stage-by-stage path and the fused one share one compile.

* ``run(q, rows, <cache>, <scratch>, out)``: gather the batch's page-table rows and lengths,
  then select → (estimate → decide → kept) per pruner → attend (→ combine);
* ``step(q, k, v, rows, <cache>, <scratch>, out)``: first append the step's one token per
  request — its K/V row, the page's fill and the request's length, then the touched page's
  summaries and key codes with the append kernels (bit-exact with the torch cache) — then
  ``run``'s body.

Every stage is the same generated kernel the stage-by-stage path calls (``pipeline.py``), written
as a subroutine (``Dialect.private``: typed pointers and symbolic dims as arguments): the
subroutines' parallel loops launch from inside the one FFI call. The cache's tensors are passed
as they are (no copy); ``rows`` are the requests' page-table rows (int64). The caller reserves
the page a token lands on beforehand (``PagedKVCache.reserve``: host bookkeeping only).

Entry-point arguments are named buffers (``KernelSource.entries`` lists each entry's, in order;
``fused_call.py`` fills them); a stage's symbolic dims are bound from the first buffer that
carries them, and every other buffer carrying the same dim is checked against it at entry, as a
kernel's own ``T.match_buffer`` would. A subroutine that fails (an assert, a parallel task)
returns non-zero and the entry point raises, naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from ..ir import Budget
from ..keycodes import KeyCodeSpec, minmax_summaries
from .append import append_sources, gen_summaries
from .attend import gen_attend, gen_combine, splits
from .build import KernelSource
from .context import StageCtx
from .dialect import Src
from .estimate import gen_estimate
from .expr import channel_tables, matrices
from .rank import gen_candidates, gen_rank
from .select import gen_score
from .top_p import gen_decide, gen_kept

FUSED = "fused"


def fusable(p) -> bool:
    """Can the fused module run ``p``? It wires the stages of one scored selector (``top_k`` or
    ``threshold``, its score over page summaries or the keys) or none, the pruners (budgets in
    tokens or a fraction) and plain attention; its append keeps K/V, page summaries and key codes. Anything else — combined or
    top-p selectors, scores over key codes or token summaries, projection matrices, token
    summaries, mean-value attention (the running V sum) — runs stage by stage (never a wrong
    answer: ``TVMCompiled.fused`` is then false and ``DecodePipeline`` takes ``run_stages``)."""
    sel = p.select
    if p.token_summaries() or p.attend.mean_value:
        return False
    budgets = [pr.budget for pr in p.prune if pr.rule == "top_k"]
    budgets += [sel.budget] if sel is not None and sel.rule == "top_k" else []
    if any(b.kind not in ("tokens", "fraction") for b in budgets):  # gen_budget's two kinds
        return False
    if any(matrices([f.expr]) for sm in p.summaries() for f in sm.fields):
        return False
    if sel is None:
        return True
    if sel.score is None:  # ``nothing()``: keep rules only (a combination has scored parts)
        return not p.selectors()
    return (sel.score is not None and p.selectors() == (sel,) and sel.estimator is None
            and sel.rule in ("top_k", "threshold") and not matrices([sel.score.expr]))


def private_ctx(ctx: StageCtx) -> StageCtx:
    return dataclasses.replace(ctx, dialect=dataclasses.replace(ctx.dialect, private=True))


# ---- small subroutines of the fused module only ---------------------------------------------
def gen_gather(ctx: StageCtx) -> KernelSource:
    """The batch's page-table rows (-1 past the cache's table) and lengths, as the stages read
    them: ``pt int32 [B, NP]``, ``lens int32 [B]``."""
    s = Src(ctx.dialect)
    params = [("rows", ("B",), "int64"), ("table", ("S", "TW"), "int32"),
              ("lengths", ("S",), "int64"), ("pt", ("B", "NP"), "int32"),
              ("lens", ("B",), "int32")]
    with s.func("gather", params, ("B", "S", "TW", "NP")):
        # no scalar bindings: in a serial subroutine TVM turns them into allocations outside
        # the device scope, which its lowering then rejects
        with s.block("for b in range(B):"):
            s('lens[b] = T.Cast("int32", lengths[rows[b]])')
            with s.block("for n in range(NP):"):
                s("pt[b, n] = T.if_then_else(n < TW, table[rows[b], T.min(n, TW - 1)], -1)")
    return s.source("fused", "gather")


def gen_budget(ctx: StageCtx, name: str, budget: Budget, unit: int) -> KernelSource:
    """``out int32 [B]``: the units (pages or tokens) ``budget`` allows each request, with the
    reference's rounding of fraction budgets (``pipeline._budget_units``)."""
    s = Src(ctx.dialect)
    params = [("lens", ("B",), "int32"), ("out", ("B",), "int32")]
    with s.func(name, params, ("B",)):
        with s.block("for b in range(B):"):
            if budget.kind == "tokens":
                s(f"out[b] = {-(-int(budget.value) // unit)}")
            else:  # torch: round(L · value · 1e6) (half to even), then a ceil division
                x = (f'T.Cast("int64", T.nearbyint(T.Cast("float64", lens[b]) * '
                     f'T.float64({float(budget.value)!r}) * T.float64(1000000.0)))')
                tok = f"T.max(({x} + T.int64(999999)) // T.int64(1000000), T.int64(1))"
                # inline, no bindings (see gen_gather)
                s(f'out[b] = T.Cast("int32", ({tok} + T.int64({unit - 1})) // T.int64({unit}))')
    return s.source("fused", name)


def gen_append_kv(ctx: StageCtx, groups: tuple[int, ...]) -> KernelSource:
    """Write each request's new K/V row at its length (the page is reserved already), bump the
    page's fill and the length, and list what the append kernels recompute: the touched page
    and slot, and per group size ``G`` the group's pages (-1 where not allocated, as
    ``PagedKVCache.group_pages``)."""
    s = Src(ctx.dialect)
    kv = ("CAP", ctx.HKV, ctx.PS, ctx.D)
    params = [("rows", ("B",), "int64"), ("table", ("S", "TW"), "int32"),
              ("lengths", ("S",), "int64"), ("fill", ("CAP",), "int64"),
              ("kp", kv, ctx.dtype), ("vp", kv, ctx.dtype),
              ("knew", ("B", ctx.HKV, ctx.D), ctx.dtype), ("vnew", ("B", ctx.HKV, ctx.D), ctx.dtype),
              ("touched", ("B",), "int64"), ("tslot", ("B",), "int64")]
    params += [(f"gp{g}", ("B", g), "int64") for g in groups]
    pos = 'T.Cast("int32", lengths[rows[b]])'  # inline: see gen_gather
    pg, slot = f"table[rows[b], {pos} // {ctx.PS}]", f"{pos} % {ctx.PS}"
    with s.func("append_kv", params, ("B", "S", "TW", "CAP")):
        with s.block("for b in range(B):"):
            # never write through a page that was not reserved (-1, or past the table)
            s(f"assert {pos} // {ctx.PS} < TW, \"no page-table column for the new token\"")
            s(f"assert table[rows[b], T.min({pos} // {ctx.PS}, TW - 1)] >= 0, "
              '"no page reserved for the new token"')
            with s.block(f"for h, c in T.grid({ctx.HKV}, {ctx.D}):"):
                s(f"kp[{pg}, h, {slot}, c] = knew[b, h, c]", f"vp[{pg}, h, {slot}, c] = vnew[b, h, c]")
            s(f'touched[b] = T.Cast("int64", {pg})', f'tslot[b] = T.Cast("int64", {slot})')
            for g in groups:
                col = f"{pos} // {ctx.PS} // {g} * {g} + i"
                with s.block(f"for i in range({g}):"):
                    s(f'gp{g}[b, i] = T.if_then_else({col} < TW, T.Cast("int64", '
                      f"table[rows[b], T.min({col}, TW - 1)]), T.int64(-1))")
            s("fill[touched[b]] = fill[touched[b]] + T.int64(1)",
              "lengths[rows[b]] = lengths[rows[b]] + T.int64(1)")
    return s.source("fused", "append_kv")


# ---- the wiring: which entry-point buffer each stage argument is -----------------------------
def summary_buffers(ctx: StageCtx) -> dict[str, str]:
    """Cache summary name (``"minmax.kmin"``) → entry-point buffer name, for the pipeline's
    summaries (page codes without them use the cache's own ``key.min``/``key.max``:
    ``code_buffers``)."""
    return {f"{s.name}.{f.name}": f"sum_{s.name}_{f.name}" for s in ctx.p.summaries()
            for f in s.fields}


def code_buffers(ctx: StageCtx, spec: KeyCodeSpec) -> list[str]:
    """Entry-point buffer names of ``cache.key_codes[spec].tensors()``, in that order."""
    tag = spec.name.replace(".", "_")
    if spec.granularity == "token":
        return [f"codes_{tag}", f"ksc_{tag}", f"kzr_{tag}"] + \
            ([f"smooth_{tag}"] if spec.smooth else [])
    if spec.granularity == "page":
        linked = minmax_summaries(ctx.p)
        if linked is not None:  # the cache's page min/max *are* these summaries
            sb = summary_buffers(ctx)
            return [f"codes_{tag}", sb[linked[0]], sb[linked[1]]]
        return [f"codes_{tag}", "sum_key_min", "sum_key_max"]
    return [f"codes_{tag}", f"klo_{tag}", f"khi_{tag}"]


def _append_calls(ctx: StageCtx) -> Iterator[tuple[KernelSource, list[str]]]:
    pc = private_ctx(ctx)
    specs = KeyCodeSpec.of_pipeline(ctx.p)
    groups = tuple(sorted({sp.group_pages for sp in specs if sp.granularity == "group"}))
    yield gen_append_kv(pc, groups), ["rows", "table", "lengths", "fill", "kp", "vp", "knew",
                                      "vnew", "touched", "tslot", *(f"gp{g}" for g in groups)]
    sb = summary_buffers(ctx)
    for summ in ctx.p.summaries():  # each summary's own channel tables (pipeline.py plans them)
        src = gen_summaries(pc, summ)
        stables = [f"stbl_{summ.name}_{i}" for i in range(len(
            channel_tables([f.expr for f in summ.fields])))]
        yield src, ["kp", "fill", "touched", *stables[:_ntables(src)],
                    *(sb[f"{summ.name}.{f.name}"] for f in summ.fields)]
    for spec, src in zip(specs, append_sources(pc), strict=True):
        if spec.granularity == "token":
            yield src, ["kp", "touched", "tslot", *code_buffers(ctx, spec)]
        elif spec.granularity == "page":
            yield src, ["kp", "fill", "touched", *code_buffers(ctx, spec)]
        else:
            yield src, ["kp", "fill", f"gp{spec.group_pages}", *code_buffers(ctx, spec)]


def _ntables(src: KernelSource) -> int:
    return sum(1 for p, _, _ in src.params if p.startswith("tbl"))


def _run_calls(ctx: StageCtx) -> Iterator[tuple[KernelSource, list[str] | None]]:
    """``run``'s subroutines in order with the buffers each is called with; ``None``: a stage
    kernel the module holds for the stage path only (called by neither entry point)."""
    pc, p = private_ctx(ctx), ctx.p
    yield gen_gather(pc), ["rows", "table", "lengths", "pt", "lens"]
    sel = p.select
    if sel is not None and sel.score is not None:
        sc = sel.score
        if sc.per == "token":
            leaves = ["kp"]
        else:
            sb = summary_buffers(ctx)
            leaves = [sb[f"{sc.summary.name}.{f}"] for f in sc.summary.field_names()]
        covered = sel.rule == "top_k"  # a budget covering the context: no scores needed
        if covered:
            unit = ctx.PS if sc.per == "page" else 1
            yield gen_budget(pc, "budget_select", sel.budget, unit), ["lens", "kunits0"]
        src = gen_score(pc, covered=covered)  # selector part 0, the only one (``fusable``)
        yield src, ["q", "pt", "lens", *leaves, *(f"tbl{i}" for i in range(_ntables(src))),
                    "scores0", *(["kunits0"] if covered else []), "nsplit"]
        if covered:  # the stage path's own score: in the module, called by neither entry
            yield gen_score(pc), None
        yield gen_rank(pc), ["scores0", "lens", "kunits0", "sel0"]
        yield gen_candidates(pc), ["lens", "sel0", "idx0", "cnt0"]
    else:
        yield gen_candidates(pc), ["lens", "idx0", "cnt0"]
    for i, pr in enumerate(p.prune):
        e = pr.estimator
        keys = ["kp"] if e.kind == "exact" else code_buffers(ctx, KeyCodeSpec.of(e))
        yield gen_estimate(pc, i), ["q", "pt", f"idx{i}", f"cnt{i}", *keys, f"w{i}", "nsplit"]
        if pr.rule == "top_k":
            yield gen_budget(pc, f"budget_prune{i}", pr.budget, 1), ["lens", f"k{i}"]
        src = gen_decide(pc, i)
        sort = [f"{nm}{i}" for nm in ("ka", "ia", "kb", "ib")] if len(src.params) > 4 else []
        yield src, [f"w{i}", f"cnt{i}", f"k{i}", f"dec{i}", *sort]
        yield gen_kept(pc, i), ["lens", f"idx{i}", f"cnt{i}", f"dec{i}", f"idx{i + 1}",
                                f"cnt{i + 1}"]
    n = len(p.prune)
    args = ["q", "pt", f"idx{n}", f"cnt{n}", "kp", "vp"]
    if splits(ctx) == 1:
        yield gen_attend(pc), [*args, "out"]
    else:
        yield gen_attend(pc), [*args, "pacc", "pml"]
        yield gen_combine(pc), ["pacc", "pml", "out"]


# ---- the module text ------------------------------------------------------------------------
_FAILS = {"append_kv": "the page of a new token is not reserved (PagedKVCache.reserve)"}


@dataclasses.dataclass
class _Entry:
    """One public entry point being written: its buffers (first use fixes shape and dtype)."""

    name: str
    bufs: dict[str, tuple[tuple, str]] = dataclasses.field(default_factory=dict)
    checks: list[str] = dataclasses.field(default_factory=list)
    body: list[str] = dataclasses.field(default_factory=list)

    def dim(self, buf: str, i: int, shape) -> str:
        return str(shape[i]) if isinstance(shape[i], int) else f"{buf}_d{i}"

    def call(self, src: KernelSource, wiring: list[str]) -> None:
        if len(wiring) != len(src.params):
            raise AssertionError(f"fused: {src.name} takes {len(src.params)} buffers, wired "
                                 f"{len(wiring)}")
        bound: dict[str, str] = {}
        for (pname, shape, dtype), buf in zip(src.params, wiring, strict=True):
            have = self.bufs.setdefault(buf, (shape, dtype))
            if have[1] != dtype or len(have[0]) != len(shape):
                raise AssertionError(f"fused: {src.name}.{pname} is {dtype}{list(shape)} but "
                                     f"buffer {buf} is {have[1]}{list(have[0])}")
            for i, d in enumerate(shape):
                mine = self.dim(buf, i, have[0])
                if isinstance(d, int):
                    if str(d) != mine:
                        self.checks.append(f"{mine} == {d}")
                elif d not in bound:
                    bound[d] = mine
                elif bound[d] != mine:
                    self.checks.append(f"{bound[d]} == {mine}")
        # a dim no buffer carries is unused by the kernel (its public twin declares it anyway)
        args = [f"{b}.data" for b in wiring] + [bound.get(v, "0") for v in src.sym]
        why = _FAILS.get(src.name, "a parallel task failed")
        self.body.append(f"assert Mod.{src.name}_impl({', '.join(args)}) == 0, "
                         f'"twilight fused {self.name}: {src.name} failed: {why}"')

    def text(self) -> list[str]:
        out = [f"@T.prim_func\ndef {self.name}({', '.join(f'{b}_h: T.handle' for b in self.bufs)}):",
               '    T.func_attr({"tirx.noalias": True})']
        for b, (shape, _) in self.bufs.items():
            out += [f"    {self.dim(b, i, shape)} = T.int32()" for i, d in enumerate(shape)
                    if not isinstance(d, int)]
        for b, (shape, dtype) in self.bufs.items():
            dims = ", ".join(self.dim(b, i, shape) for i in range(len(shape)))
            out.append(f'    {b} = T.match_buffer({b}_h, ({dims},), "{dtype}")')
        for c in dict.fromkeys(self.checks):
            out.append(f'    assert {c}, "fused {self.name}: buffers disagree on a dim ({c})"')
        return out + [f"    {line}" for line in self.body]


def wrapper(src: KernelSource) -> list[str]:
    """A public function ``src.name`` over the subroutine ``src.name_impl``: the stage kernel as
    the stage-by-stage path calls it (same name and arguments as a kernel built alone)."""
    args = ", ".join(f"{p}_h: T.handle" for p, _, _ in src.params)
    out = [f"@T.prim_func\ndef {src.name}({args}):", '    T.func_attr({"tirx.noalias": True})']
    out += [f"    {v} = T.int32()" for v in src.sym]
    carried = {d for _, shape, _ in src.params for d in shape if isinstance(d, str)}
    for p, shape, dtype in src.params:
        dims = ", ".join(str(x) for x in shape)
        out.append(f'    {p} = T.match_buffer({p}_h, ({dims},), "{dtype}")')
    call = [f"{p}.data" for p, _, _ in src.params] + [v if v in carried else "0" for v in src.sym]
    return out + [f"    T.evaluate(Mod.{src.name}_impl({', '.join(call)}))"]


def gen_fused(ctx: StageCtx) -> KernelSource:
    """The pipeline's module (a ``fusable`` one): every kernel as a subroutine, a public wrapper of each stage
    kernel (``wrapper``) and the two entry points; ``entries`` names each entry point's
    buffers in argument order."""
    subs: dict[str, KernelSource] = {}
    run, step = _Entry("run"), _Entry("step")
    for src, wiring in _append_calls(ctx):
        subs.setdefault(src.name, src)
        step.call(src, wiring)
    for src, wiring in _run_calls(ctx):
        subs.setdefault(src.name, src)
        if wiring is not None:
            run.call(src, wiring)
            step.call(src, wiring)
    lines = ["@I.ir_module", "class Mod:"]
    for src in subs.values():
        lines += ["    " + ln if ln else ln for ln in src.text.splitlines()] + [""]
        if src.stage != "fused":
            lines += ["    " + ln for ln in "\n".join(wrapper(src)).splitlines()] + [""]
    for e in (run, step):
        lines += ["    " + ln for ln in "\n".join(e.text()).splitlines()] + [""]
    entries = {e.name: tuple(e.bufs) for e in (run, step)}
    return KernelSource("fused", FUSED, "\n".join(lines) + "\n", entries=entries)
