from __future__ import annotations

import doctest

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twilight.compiler import keycodes as quant
from twilight.compiler.keycodes import (
    KeyCodeSpec,
    bytes_per_token,
    dequantize_minmax,
    dequantize_token,
    fit_smoothing,
    pack_codes,
    packed_bytes,
    quantize_page,
    quantize_token,
    unpack_codes,
)

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _within_half_scale(x: torch.Tensor, deq: torch.Tensor, scale: torch.Tensor) -> bool:
    x = x.float()
    slack = 1e-6 * (x.abs() + 1)
    return bool(((x - deq).abs() <= scale / 2 + slack).all())


def test_doctests() -> None:
    assert doctest.testmod(quant).failed == 0


def test_key_code_spec_validates_and_names() -> None:
    assert KeyCodeSpec(4, "token").name == "int4_token"
    assert KeyCodeSpec(2, "page").name == "int2_page"
    assert KeyCodeSpec(8) == KeyCodeSpec(8, "token")
    assert len({KeyCodeSpec(4, "page"), KeyCodeSpec(4, "page")}) == 1
    with pytest.raises(ValueError, match="bits"):
        KeyCodeSpec(3, "token")
    with pytest.raises(ValueError, match="granularity"):
        KeyCodeSpec(4, "channel")
    assert KeyCodeSpec(4, "group", 8).name == "int4_group8"
    assert KeyCodeSpec(2, "token", smooth=True).name == "int2_token_smooth"
    for bad in (dict(granularity="group"), dict(granularity="group", group_pages=3),
                dict(granularity="page", group_pages=2), dict(granularity="page", smooth=True),
                dict(smooth=2.0)):
        with pytest.raises(ValueError):
            KeyCodeSpec(4, **bad)


def test_bytes_per_token() -> None:
    assert bytes_per_token(KeyCodeSpec(8, "token"), 128, 16) == 136
    assert bytes_per_token(KeyCodeSpec(4, "token"), 7, 16) == 4 + 8
    assert bytes_per_token(KeyCodeSpec(4, "token", smooth=True), 64, 16) == 32 + 8
    assert bytes_per_token(KeyCodeSpec(2, "page"), 128, 64) == 32 + 2 * 2 * 128 / 64
    assert bytes_per_token(KeyCodeSpec(2, "page"), 128, 64, elem_bytes=4) == 32 + 16
    assert bytes_per_token(KeyCodeSpec(4, "group", 4), 64, 16) == 32 + 4 * 64 / 64
    assert packed_bytes(7, 2) == 2 and packed_bytes(7, 4) == 4 and packed_bytes(7, 8) == 7


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), d=st.integers(1, 133), lead=st.integers(1, 4))
def test_pack_unpack_round_trip(bits: int, d: int, lead: int) -> None:
    codes = torch.randint(0, 1 << bits, (lead, 3, d), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (lead, 3, packed_bytes(d, bits))
    assert torch.equal(unpack_codes(packed, bits, d), codes)


def test_pack_layout() -> None:
    assert pack_codes(torch.tensor([1, 2, 3]), 4).tolist() == [0x21, 0x03]
    assert pack_codes(torch.tensor([1, 2, 3, 0, 1]), 2).tolist() == [1 | 2 << 2 | 3 << 4, 1]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [7, 64, 96, 128])
def test_token_error_bound_and_range(bits: int, dtype: torch.dtype, d: int) -> None:
    x = (torch.randn(3, 17, d) * torch.rand(3, 17, 1) * 10).to(dtype)
    packed, scale, zero = quantize_token(x, bits)
    assert scale.dtype == zero.dtype == torch.float32 and scale.shape == (3, 17)
    codes = unpack_codes(packed, bits, d)
    assert int(codes.max()) < 1 << bits
    deq = dequantize_token(packed, scale, zero, bits, d)
    assert _within_half_scale(x, deq, scale[..., None])


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [7, 64, 96])
def test_page_error_bound_over_valid_tokens(bits: int, dtype: torch.dtype, d: int) -> None:
    x = (torch.randn(4, 2, 16, d) * 5).to(dtype)
    valid = torch.arange(16) < torch.tensor([16, 9, 1, 0])[:, None]  # [P, ps]
    packed, lo, hi = quantize_page(x, valid[:, None, :], bits)
    assert packed.shape == (4, 2, 16, packed_bytes(d, bits)) and lo.shape == (4, 2, d)
    # min and max of values of a dtype are values of it: storing them in the cache dtype
    # (as the shared Quest summary does) loses nothing
    assert torch.equal(lo.to(dtype).float(), lo) and torch.equal(hi.to(dtype).float(), hi)
    scale = (hi - lo) / ((1 << bits) - 1)
    codes = unpack_codes(packed, bits, d)
    assert int(codes.max()) < 1 << bits
    assert not codes[~valid[:, None, :].expand(4, 2, 16)].any()  # invalid slots are code 0
    assert not lo[3].any() and not hi[3].any()  # a page without valid tokens
    deq = dequantize_minmax(packed, lo.to(dtype), hi.to(dtype), bits, d)
    m = valid[:, None, :, None].expand_as(x)
    assert _within_half_scale(x[m], deq[m], scale[:, :, None, :].expand_as(x)[m])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_all_equal_is_exact_and_finite(bits: int) -> None:
    x = torch.full((2, 5, 7), 3.25)
    x[1] = -0.5
    packed, scale, zero = quantize_token(x, bits)
    assert not scale.any() and not unpack_codes(packed, bits, 7).any()
    assert torch.equal(dequantize_token(packed, scale, zero, bits, 7), x)
    packed, lo, hi = quantize_page(x, torch.ones(2, 5, dtype=torch.bool), bits)
    assert torch.equal(lo, hi)
    assert torch.equal(dequantize_minmax(packed, lo, hi, bits, 7), x)


def test_zero_input_has_no_nan() -> None:
    x = torch.zeros(3, 16, 8)
    for fn in (quantize_token(x, 4), quantize_page(x, torch.ones(3, 16, dtype=torch.bool), 4)):
        assert all(torch.isfinite(t.float()).all() for t in fn)


def test_page_granularity_survives_outlier_channels() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 4, 16, 128)
    x[..., [3, 77]] *= 20
    p_tok = dequantize_token(*quantize_token(x, 4), bits=4, head_dim=128)
    valid = torch.ones(8, 1, 16, dtype=torch.bool)
    p_page = dequantize_minmax(*quantize_page(x, valid, 4), bits=4, head_dim=128)
    s = fit_smoothing(x.transpose(0, 2).reshape(4, -1, 128))  # [Hkv=4, D]
    xs = x / s[:, None, :]
    p_smooth = dequantize_token(*quantize_token(xs, 4), bits=4, head_dim=128) * s[:, None, :]
    err_tok, err_page = (p_tok - x).abs().mean(), (p_page - x).abs().mean()
    err_smooth = (p_smooth - x).abs().mean()
    assert err_page < err_tok / 2 and err_smooth < err_tok / 2


def test_fit_smoothing_is_the_channel_absmax_with_floors() -> None:
    k = torch.zeros(3, 5, 4)
    k[0, 2] = torch.tensor([-4.0, 2.0, 0.0, float("inf")])
    k[1, :, 1] = 1e-9
    s = fit_smoothing(k)
    assert torch.allclose(s[0], torch.tensor([4.0, 2.0, 4e-3, 4e-3]))  # inf ignored; floors
    assert torch.allclose(s[1], torch.tensor([1e-12, 1e-9, 1e-12, 1e-12]))
    assert s[2].tolist() == [1.0] * 4  # nothing at all: no scaling
    half = fit_smoothing(k, 0.5)  # a weaker strength flattens less
    assert torch.allclose(half[:2], s[:2].sqrt()) and half[2].tolist() == [1.0] * 4
