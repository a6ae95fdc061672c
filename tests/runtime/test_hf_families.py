"""The transformers backend on every common decoder family, built tiny and random, offline.

For each family: with ``tw.builtins.dense()`` installed, the logits of the prefill and of 16
decode steps at a context of more than 3× the sliding window equal the model's own (its
default attention, SDPA or eager, and its own cache) within float32 tolerance — and the layers
twilight runs really did run through it; with ``quest_twilight`` installed decoding runs and
stays finite. Families twilight cannot reproduce are refused at install, with the feature named.
Padded batches of different prompt lengths, ``generate`` and beam search are checked against
the model's own generation.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import pytest
import torch

import twilight as tw
from twilight import knobs
from twilight.errors import InputError, UnsupportedModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="needs transformers>=5")

WINDOW = 16
PROMPT, STEPS = 3 * WINDOW + 21, 16  # the last decode step attends over 85 > 3 × 16 tokens
BASE = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=512, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, max_position_embeddings=512)

# family -> (config overrides, the layers twilight runs with dense_layers=0)
FAMILIES = {
    "llama": ({}, [0, 1, 2, 3]),
    "mistral": ({"sliding_window": WINDOW}, []),  # every layer slides: all stay the model's
    "qwen2": ({"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2},
              [0, 1]),
    "qwen3": ({"head_dim": 64}, [0, 1, 2, 3]),  # q/k norms
    "gemma2": ({"head_dim": 16, "sliding_window": WINDOW, "query_pre_attn_scalar": 24,
                "attn_logit_softcapping": 20.0}, [1, 3]),  # eager; scale, softcap
    "gemma3_text": ({"head_dim": 256, "num_key_value_heads": 1, "sliding_window": WINDOW,
                     "sliding_window_pattern": 2, "query_pre_attn_scalar": 128},
                    [1, 3]),  # MQA, head_dim 256, scale, q/k norms
    "phi3": ({}, [0, 1, 2, 3]),
    "gpt_oss": ({"head_dim": 16, "sliding_window": WINDOW, "num_local_experts": 2,
                 "num_experts_per_tok": 1}, [1, 3]),  # learned sinks, eager
    "cohere2": ({"sliding_window": WINDOW}, [3]),  # full layers without RoPE
    "olmo3": ({"sliding_window": WINDOW}, [3]),
    "llama4_text": ({"head_dim": 16, "attention_chunk_size": WINDOW, "intermediate_size_mlp": 128,
                     "num_local_experts": 2}, [3]),  # chunked attention, NoPE + temperature
    "qwen3_next": ({"head_dim": 16, "linear_num_value_heads": 2, "linear_num_key_heads": 2,
                    "linear_key_head_dim": 16, "linear_value_head_dim": 16,
                    "num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 32,
                    "shared_expert_intermediate_size": 32}, [3]),  # linear-attention hybrid
}

# family -> (config overrides, the feature the refusal names)
REFUSED = {
    "deepseek_v3": ({"num_key_value_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
                     "qk_nope_head_dim": 8, "v_head_dim": 8, "n_routed_experts": 2,
                     "num_experts_per_tok": 1, "moe_intermediate_size": 32,
                     "first_k_dense_replace": 4}, "MLA"),
    "gemma3_text": ({"head_dim": 16, "use_bidirectional_attention": True,
                     "sliding_window_pattern": 2}, "bidirectional"),
    "bloom": ({"n_head": 4, "n_layer": 2}, "AttentionInterface"),  # ALiBi, its own attention
    "minimax_m3_vl_text": ({"head_dim": 16, "sparse_attention_config":
                            {"sparse_attention_freq": [0, 1, 0, 1]}}, "block_indices"),
}


@pytest.fixture(scope="module", autouse=True)
def fresh_kernel_cache_one_thread(tmp_path_factory):
    """A fresh kernel cache; one torch thread (a hidden size of 64 gains nothing from two,
    and on busy cores their hand-offs cost more than the work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with knobs.scope(cache_dir=tmp_path_factory.mktemp("kernels"), disable_compile=None):
        yield
    torch.set_num_threads(threads)


def build(family: str, overrides: dict, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(family, **{**BASE, **overrides})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg).eval()
    # random weights give flat logits: scale the embeddings so attention is peaked and a wrong
    # key set shows in the logits
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(4.0)
    return model


def install(model, pipeline, **kw):
    from twilight.runtime.serving.hf_attention import install as _install

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _install(model, pipeline, **kw)


def run(model, ids: torch.Tensor, cache) -> list[torch.Tensor]:
    """Logits of the prefill's last position and of each decode step (teacher-forced)."""
    out = []
    with torch.no_grad():
        out.append(model(input_ids=ids[:, :PROMPT], cache=cache, use_cache=True).logits[:, -1])
        for t in range(PROMPT, ids.shape[1]):
            out.append(model(input_ids=ids[:, t:t + 1], cache=cache,
                             use_cache=True).logits[:, -1])
    return out


def own_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_pipeline_reproduces_the_model(family):
    overrides, twilight_layers = FAMILIES[family]
    model = build(family, overrides)
    ids = torch.randint(3, 512, (1, PROMPT + STEPS), generator=torch.Generator().manual_seed(1))
    want = run(model, ids, own_cache(model))

    att = install(model, tw.builtins.dense(), dense_layers=0)
    assert sorted(att.sparse) == twilight_layers, att.report()
    got = run(model, ids, att.new_cache())
    assert att.decode_calls == len(twilight_layers) * STEPS
    diff = max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True))
    assert diff < 1e-4, f"{family}: max |logit diff| {diff:.2e}\n{att.report()}"
    att.uninstall()

    att = install(model, tw.builtins.quest_twilight(budget=32, p=0.9), dense_layers=0)
    got = run(model, ids, att.new_cache())
    assert att.decode_calls == len(twilight_layers) * STEPS
    assert all(bool(torch.isfinite(g).all()) for g in got)
    att.uninstall()


def test_a_broken_layer_is_caught_by_the_comparison():
    """The dense-equivalence check can fail: a pipeline attending with the wrong scale (what the
    backend did before it read ``scaling`` from the model) gives other logits."""
    overrides, _ = FAMILIES["gemma3_text"]
    model = build("gemma3_text", overrides)
    ids = torch.randint(3, 512, (1, PROMPT + 4), generator=torch.Generator().manual_seed(1))
    want = run(model, ids, own_cache(model))
    att = install(model, tw.builtins.dense(), dense_layers=0)
    for sl in att.sparse.values():  # swap in the default 1/sqrt(d) scale behind its back
        sl.decode = tw.load(tw.builtins.dense(), shape=sl.decode.shape, backend="tvm")
    got = run(model, ids, att.new_cache())
    assert max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True)) > 1e-3
    att.uninstall()


@pytest.mark.parametrize("family", REFUSED)
def test_refused_with_the_feature_named(family):
    overrides, feature = REFUSED[family]
    model = build(family, overrides)
    with pytest.raises(UnsupportedModel, match=feature):
        install(model, tw.builtins.dense(), dense_layers=0)


def test_explicit_scale_that_disagrees_is_refused():
    model = build("llama", {})
    pipe = tw.Pipeline(select=tw.top_k(tw.builtins.quest, tw.tokens(64)),
                       attend=tw.attention(scale=0.5), name="odd_scale")
    with pytest.raises(UnsupportedModel, match="scales logits"):
        install(model, pipe)


def padded(lengths: list[int], width: int, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = torch.randint(3, 512, (n,), generator=gen)
        mask[b, width - n:] = 1
    return ids, mask


def generate(model, ids, mask, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False,
                              output_logits=True, return_dict_in_generate=True,
                              eos_token_id=None, pad_token_id=0, **kw)


@pytest.mark.parametrize(("family", "beams", "sparse_from"),
                         [("llama", 1, 0), ("llama", 3, 0), ("gemma2", 3, 0), ("gpt_oss", 1, 0),
                          ("llama", 3, PROMPT + 6)])
def test_generate_padded_batch_and_beams(family, beams, sparse_from):
    """``generate`` over a left-padded batch of different prompt lengths (padding left out of
    the paged cache), greedy and beam search (beams reorder and copy pages), and a layer that
    moves to its pages mid-generation: the same tokens and logits as the model's own."""
    overrides, layers = FAMILIES[family]
    model = build(family, overrides)
    ids, mask = padded([3 * WINDOW + 5, PROMPT], PROMPT)
    want = generate(model, ids, mask, num_beams=beams)
    att = install(model, tw.builtins.dense(), dense_layers=0, sparse_from=sparse_from)
    cache = att.new_cache()
    got = generate(model, ids, mask, num_beams=beams, cache=cache)
    assert torch.equal(got.sequences, want.sequences)
    diff = max(float((g - w).abs().max()) for g, w in zip(got.logits, want.logits, strict=True))
    assert diff < 1e-4
    paged = cache.layers[layers[0]].paged
    lengths = sorted(int(paged.lengths[r]) for r in cache.layers[layers[0]].ids)
    n = STEPS - 1  # tokens fed back after the prefill
    assert lengths == sorted([3 * WINDOW + 5 + n] * beams + [PROMPT + n] * beams)
    sparse_steps = n - max(0, sparse_from - PROMPT)  # decode steps after the move to pages
    assert att.decode_calls == len(layers) * sparse_steps
    att.uninstall()


def test_later_prefill_chunk_and_plan_growth():
    """A second multi-token chunk attends over the pages; a context past the planned one grows
    the plan; both against the model's own."""
    model = build("llama", {})
    ids = torch.randint(3, 512, (2, 160), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        c = own_cache(model)
        want = [model(input_ids=ids[:, :40], cache=c).logits,
                model(input_ids=ids[:, 40:150], cache=c).logits,
                model(input_ids=ids[:, 150:151], cache=c).logits]
        att = install(model, tw.builtins.dense(), dense_layers=1, context=32)
        c = att.new_cache(initial_pages=1)
        got = [model(input_ids=ids[:, :40], cache=c).logits,
               model(input_ids=ids[:, 40:150], cache=c).logits,
               model(input_ids=ids[:, 150:151], cache=c).logits]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    dp = att.decode  # stage by stage it plans itself; fused (TVM on the CPU) its module does
    planned = dp._plan.context if dp._plan is not None else dp.compiled.plan_.tokens
    assert att.decode_calls == 3 and planned >= 151
    att.uninstall()


def test_wrong_dtype_is_named():
    model = build("llama", {})
    att = install(model, tw.builtins.dense(), dense_layers=0)
    cache = att.new_cache()
    layer = cache.layers[1]
    k = torch.zeros(1, 2, 3, 16, dtype=torch.float16)
    with pytest.raises(InputError, match=r"key_states of layer 1: expected torch.float32"):
        layer.update(k, k)
    att.uninstall()


def test_crop_is_refused_and_reset_frees_pages():
    model = build("llama", {})
    att = install(model, tw.builtins.dense(), dense_layers=0)
    cache = att.new_cache()
    with torch.no_grad():
        model(input_ids=torch.randint(3, 512, (1, 20)), cache=cache)
    with pytest.raises(UnsupportedModel, match="cropped"):
        cache.crop(-1)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.layers[0].paged.num_requests == 0
    att.uninstall()
