"""``install(model)``: the default pipeline, with and without the model's calibration, and the
calibration of a transformers model that files it (tiny random Llama, offline)."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from twilight import knobs
from twilight.runtime.store.estimator_choice import keep_choice, write_keep

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="needs transformers>=5")


@pytest.fixture(autouse=True)
def fresh_dirs(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with knobs.scope(cache_dir=tmp_path / "kernels", data_dir=tmp_path / "data",
                     disable_compile=None):
        yield
    torch.set_num_threads(threads)


def tiny_llama(name: str = "tiny-llama"):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, vocab_size=512,
                      name_or_path=name)
    return AutoModelForCausalLM.from_config(cfg).eval()


def install(model, *args, **kw):
    from twilight.runtime.serving.hf_attention import install as _install

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _install(model, *args, **kw)


def test_default_without_calibration():
    att = install(tiny_llama(), context=4096)
    p = att.decode.ir
    assert (p.name, p.keep.sink, p.keep.window) == ("quest_twilight", 16, 64)
    assert (p.select.budget.kind, p.select.budget.value) == ("fraction", 1 / 4)
    assert p.prune[0].p == 0.95 and sorted(att.sparse) == [2, 3]  # the first two stay dense
    assert {sl.sparse_from for sl in att.sparse.values()} == {4096}
    assert "no calibration" in att.note
    att.uninstall()
    att = install(tiny_llama(), "auto", context=1024, dense_layers=0)
    assert (att.decode.ir.select.budget.kind, att.decode.ir.select.budget.value) == ("tokens", 512)
    assert sorted(att.sparse) == [0, 1, 2, 3]
    att.uninstall()


def test_default_follows_the_model_calibration():
    write_keep("tiny-llama", 0, 128, [])
    att = install(tiny_llama("tiny-llama"), context=4096)  # found by config.name_or_path
    assert (att.decode.ir.keep.sink, att.decode.ir.keep.window) == (0, 128)
    assert "calibration of tiny-llama" in att.note
    att.uninstall()


class FakeTokenizer:
    """Text to ids without a vocabulary file: one id per character."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 500 for c in text]}


def test_calibrate_model_files_estimator_and_keep():
    from twilight.runtime.evaluation.hf_calibrate import calibrate_model

    model = tiny_llama()
    text = "".join(chr(97 + (i * 7919) % 26) for i in range(4000))
    report = calibrate_model(model, FakeTokenizer(), text, "tiny-llama", tokens=512)
    assert "chosen: sink" in report and "keep sink" in report
    assert keep_choice("tiny-llama") is not None
    att = install(model, context=512)  # finds both the estimator and the keep rules
    assert "calibration of tiny-llama" in att.note
    att.uninstall()
