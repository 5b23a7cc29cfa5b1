"""Tests for qlib.quant.primitives: affine quantization round trips, granularity shapes, observers, STE, errors."""
from __future__ import annotations

import math
import re

import pytest
import torch

from qlib.quant.primitives import (QParams, dequantize, dynamic_act_qparams, expand_qparams, fake_quant, group_index,
                             observe_range, qparams, qparams_from_range, quant_dequant, quantize, representable_range,
                             rtn, sqnr_db)

torch.set_num_threads(1)

GRANULARITIES = ["tensor", "channel", 16]
ALL_BITS = list(range(2, 9))


def _scale_per_element(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """The step size that applies to each element of ``x``."""
    lo, hi = representable_range(x, qp)
    return (hi - lo) / qp.qmax


def _heavy_tailed(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A Gaussian scale mixture: heavier tails than Gaussian, like real weights and activations."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) / torch.rand(shape, generator=g).clamp_min(0.05).sqrt()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("bits", ALL_BITS)
def test_round_trip_error_within_half_step(bits, symmetric, granularity):
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(6, 64, generator=g) * torch.rand(6, 1, generator=g) * 10 + (0 if symmetric else 1.5)
        qp = qparams(x, bits, symmetric, granularity)
        q = quantize(x, qp)
        assert q.dtype == torch.uint8 and q.shape == x.shape
        assert int(q.min()) >= 0 and int(q.max()) <= 2**bits - 1
        err = (dequantize(q, qp) - x).abs()
        step = _scale_per_element(x, qp)
        assert bool((err <= step / 2 * (1 + 1e-5) + 1e-6).all()), f"max excess {(err - step / 2).max().item()}"
        # the codes are a fixed point: quantizing the dequantized values gives the same codes back
        assert torch.equal(quantize(dequantize(q, qp), qp), q)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("bits", ALL_BITS)
def test_asymmetric_represents_zero_exactly(bits, granularity):
    g = torch.Generator().manual_seed(bits)
    x = torch.rand(4, 64, generator=g) * 3 + 0.5  # all positive: xmin is pulled to 0 so 0 stays representable
    x[:, ::7] = 0.0
    x[1] -= 2.0
    x[1, ::7] = 0.0
    y = quant_dequant(x, qparams(x, bits, symmetric=False, granularity=granularity))
    assert torch.equal(y[x == 0], torch.zeros_like(y[x == 0]))


def test_symmetric_and_asymmetric_formulas():
    x = torch.tensor([[-1.0, 0.5, 3.0, 2.0], [-4.0, -2.0, -1.0, -0.5]])
    qp = qparams(x, bits=4, symmetric=True, granularity="channel")
    assert torch.allclose(qp.scale.squeeze(1), torch.tensor([2 * 3.0 / 15, 2 * 4.0 / 15]))
    assert torch.equal(qp.zero, torch.full((2, 1), 8.0))
    qa = qparams(x, bits=4, symmetric=False, granularity="channel")
    assert torch.allclose(qa.scale.squeeze(1), torch.tensor([4.0 / 15, 4.0 / 15]))  # row 2: xmax pulled up to 0
    assert torch.equal(qa.zero.squeeze(1), torch.tensor([round(15 / 4), 15.0]))
    assert qa.zero.dtype == torch.float32 and bool((qa.zero == qa.zero.round()).all())


def test_scale_shapes_per_granularity():
    x = torch.randn(3, 5, 96)
    assert qparams(x, granularity="tensor").scale.shape == ()
    assert qparams(x, granularity="channel").scale.shape == (3, 5, 1)
    assert qparams(x, granularity="channel").group_size == 96
    qp = qparams(x, granularity=32)
    assert qp.scale.shape == qp.zero.shape == (3, 5, 3) and qp.group_size == 32
    assert qparams(x, granularity=-1).group_size == -1
    assert dynamic_act_qparams(x, granularity="token").scale.shape == (3, 5, 1)


def test_all_zero_groups_are_safe():
    x = torch.zeros(2, 32)
    x[1, :16] = torch.linspace(-1, 1, 16)
    for sym in (True, False):
        qp = qparams(x, 4, sym, granularity=16)
        assert torch.isfinite(qp.scale).all() and bool((qp.scale > 0).all())
        assert qp.scale[0, 0].item() == 1.0
        y = quant_dequant(x, qp)
        assert torch.isfinite(y).all() and torch.equal(y[0], torch.zeros(32))


def test_gaussian_sqnr_levels():
    x = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    s8 = sqnr_db(x, rtn(x, 8, True, "channel"))
    s4 = sqnr_db(x, rtn(x, 4, True, "channel"))
    s4g = sqnr_db(x, rtn(x, 4, True, 128))
    assert s8 > 40
    assert 14 < s4 < 20  # theory for amax ~ 3.7 sigma: 10 log10(675 / 3.7^2) ~ 17 dB
    assert 18 < s4g < 22 and s4g > s4  # smaller groups, smaller ranges


def test_each_bit_adds_about_six_db():
    x = torch.randn(128, 512, generator=torch.Generator().manual_seed(1))
    s = [sqnr_db(x, rtn(x, b, True, "channel")) for b in ALL_BITS]
    gains = [b - a for a, b in zip(s, s[1:])]
    assert all(d > 0 for d in gains), s
    assert all(5.0 < d < 7.0 for d in gains[1:]), gains  # 20 log10(2) = 6.02 dB per bit once the grid is fine


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["channel", 32])
def test_mse_observer_never_worse_than_minmax(symmetric, granularity):
    x = _heavy_tailed((32, 256), seed=2)
    mm = quant_dequant(x, qparams(x, 4, symmetric, granularity, "minmax"))
    ms = quant_dequant(x, qparams(x, 4, symmetric, granularity, "mse", norm=2.0))
    gs = 256 if granularity == "channel" else granularity
    err_mm = (mm - x).pow(2).reshape(-1, gs).sum(1)
    err_ms = (ms - x).pow(2).reshape(-1, gs).sum(1)
    assert bool((err_ms <= err_mm * (1 + 1e-5)).all())  # ratio 1.0 (= min-max) is on the search grid
    assert err_ms.sum() < 0.97 * err_mm.sum()  # heavy tails: clipping pays (measured 0.75-0.95 of min-max error)
    default = quant_dequant(x, qparams(x, 4, symmetric, granularity, "mse"))  # norm 2.4, GPTQ's default
    assert sqnr_db(x, default) > sqnr_db(x, mm)


def test_percentile_clips_outliers():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 100_000, generator=g)
    x[0, :5] = torch.tensor([500.0, -400.0, 300.0, 250.0, -600.0])
    inlier = x.abs() < 50
    for sym in (True, False):
        mm = qparams(x, 8, sym, "tensor")
        pc = qparams(x, 8, sym, "tensor", "percentile", p=99.99)
        assert pc.scale < mm.scale / 50
        lo, hi = observe_range(x, 8, sym, "tensor", "percentile", p=99.99)
        assert 3.0 < hi.item() < 5.0 and -5.0 < lo.item() < -3.0
        assert sqnr_db(x[inlier], quant_dequant(x, pc)[inlier]) > sqnr_db(x[inlier], quant_dequant(x, mm)[inlier]) + 20


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0, True])
def test_bad_bits_raise(bits):
    with pytest.raises(ValueError, match="2..8"):
        qparams(torch.randn(2, 8), bits=bits)


def test_group_size_must_divide():
    msg = ("group size 128 does not divide the input dimension 576; pick a divisor such as 64 or 192, "
           "or pass pad=True for a shorter last group (as the GPTQ reference does)")
    with pytest.raises(ValueError, match=re.escape(msg)):
        qparams(torch.randn(4, 576), 4, granularity=128)
    with pytest.raises(ValueError, match="unknown granularity"):
        qparams(torch.randn(4, 64), 4, granularity="row")
    with pytest.raises(ValueError, match="unknown granularity"):
        qparams(torch.randn(4, 64), 4, granularity=0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_inputs_raise(bad):
    x = torch.randn(4, 32)
    x[2, 3] = bad
    with pytest.raises(ValueError, match="weight of layer fc1 has 1 non-finite"):
        qparams(x, name="weight of layer fc1")
    qp = qparams(torch.randn(4, 32))
    with pytest.raises(ValueError, match="non-finite"):
        quantize(x, qp)


def test_bad_observer_and_mismatched_qparams_raise():
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="unknown observer"):
        qparams(x, observer="entropy")
    with pytest.raises(ValueError, match="takes no options"):
        qparams(x, observer="minmax", p=99.0)
    with pytest.raises(ValueError, match="needs"):
        quantize(torch.randn(5, 64), qparams(x, granularity=16))


def test_fake_quant_straight_through_gradient():
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(8, 64, generator=g) * 2).requires_grad_()
    for sym in (True, False):
        qp = qparams(x.detach() * 0.5, 4, sym, granularity=16)  # a range narrower than x: some values fall outside
        y = fake_quant(x, qp)
        assert torch.equal(y.detach(), quant_dequant(x.detach(), qp))
        (gx,) = torch.autograd.grad((y * 3.0).sum(), x)
        lo, hi = representable_range(x, qp)
        inside = (x.detach() >= lo) & (x.detach() <= hi)
        assert 0.1 < inside.float().mean() < 0.99
        assert torch.equal(gx, 3.0 * inside.float())


def test_dtype_preserved_and_range_round_trip():
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    assert rtn(x, 4, granularity=32).dtype == torch.bfloat16
    assert dequantize(quantize(x, qparams(x)), qparams(x)).dtype == torch.float32
    lo, hi = observe_range(x, 4, False, 32)
    assert torch.equal(qparams_from_range(lo, hi, 4, False, 32).scale, qparams(x, 4, False, 32).scale)


def test_sqnr_db():
    x = torch.ones(100)
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(x, x * 1.1) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="shapes differ"):
        sqnr_db(x, torch.ones(10))


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_quant_dequant_matches_dequantize_of_codes(granularity):
    x = torch.randn(4, 3, 64, generator=torch.Generator().manual_seed(5)) * 4
    for sym in (True, False):
        qp = qparams(x, 3, sym, granularity)
        assert torch.equal(quant_dequant(x, qp), dequantize(quantize(x, qp), qp))


# --------------------------------------------------------------------------------------------------
# pad=True: a shorter last group (576 = 4 x 128 + 64, as the GPTQ reference does)

OBSERVER_KW = {"minmax": {}, "mse": {"steps": 20}, "percentile": {"p": 95.0}}  # p=95 clips inside a 64-wide group


@pytest.mark.parametrize("observer", list(OBSERVER_KW))
@pytest.mark.parametrize("symmetric", [True, False])
def test_short_last_group_equals_two_parts(symmetric, observer):
    x = _heavy_tailed((6, 576), seed=6) + (0 if symmetric else 0.7)
    kw = OBSERVER_KW[observer]
    qp = qparams(x, 4, symmetric, 128, observer, pad=True, **kw)
    assert qp.scale.shape == qp.zero.shape == (6, 5) and qp.group_size == 128 and qp.in_features == 576
    head = qparams(x[:, :512], 4, symmetric, 128, observer, **kw)  # 4 full groups
    tail = qparams(x[:, 512:], 4, symmetric, "channel", observer, **kw)  # the last 64 columns as one group
    assert torch.equal(qp.scale, torch.cat([head.scale, tail.scale], 1))
    assert torch.equal(qp.zero, torch.cat([head.zero, tail.zero], 1))
    codes = torch.cat([quantize(x[:, :512], head), quantize(x[:, 512:], tail)], 1)
    assert torch.equal(quantize(x, qp), codes)
    assert torch.equal(quant_dequant(x, qp), torch.cat([quant_dequant(x[:, :512], head), quant_dequant(x[:, 512:], tail)], 1))
    assert torch.equal(rtn(x, 4, symmetric, 128, observer, pad=True, **kw), quant_dequant(x, qp))
    lo, hi = observe_range(x, 4, symmetric, 128, observer, pad=True, **kw)
    assert lo.shape == hi.shape == (6, 5)
    if observer == "percentile":  # zero-padding the tail to 128 would move the percentile: the real columns matter
        padded = qparams(torch.nn.functional.pad(x[:, 512:], (0, 64)), 4, symmetric, "channel", observer, **kw)
        assert not torch.allclose(padded.scale, tail.scale)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_short_last_group_round_trip_and_shapes(bits, symmetric):
    x = torch.randn(2, 3, 200, generator=torch.Generator().manual_seed(bits)) * 3 + (0 if symmetric else 1.0)
    qp = qparams(x, bits, symmetric, 64, pad=True)  # 200 = 3 x 64 + 8
    assert qp.scale.shape == (2, 3, 4) and qp.in_features == 200
    q = quantize(x, qp)
    assert q.dtype == torch.uint8 and q.shape == x.shape and q.is_contiguous()
    y = dequantize(q, qp)
    assert y.shape == x.shape and torch.equal(quant_dequant(x, qp), y)
    err, step = (y - x).abs(), _scale_per_element(x, qp)
    assert bool((err <= step / 2 * (1 + 1e-5) + 1e-6).all())
    assert torch.allclose(step[..., 192:], qp.scale[..., 3:].expand(2, 3, 8), rtol=1e-5)  # the 8 tail columns share the last scale
    assert torch.equal(quantize(y, qp), q)


def test_pad_is_a_no_op_when_the_group_divides_and_handles_k_below_g():
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(7))
    a, b = qparams(x, 4, False, 128, pad=True), qparams(x, 4, False, 128)
    assert torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero) and a.group_size == b.group_size == 128
    small = x[:, :40]  # K < g: one group of the 40 real columns, i.e. per-channel
    qs = qparams(small, 4, True, 64, pad=True)
    assert qs.scale.shape == (4, 1) and torch.equal(qs.scale, qparams(small, 4, True, "channel").scale)
    assert torch.equal(quant_dequant(small, qs), rtn(small, 4, True, "channel"))


def test_group_index_and_expand_qparams():
    idx = group_index(576, 128)
    assert idx.dtype == torch.int64 and torch.equal(torch.bincount(idx), torch.tensor([128, 128, 128, 128, 64]))
    assert torch.equal(group_index(5, -1), torch.zeros(5, dtype=torch.int64))
    x = _heavy_tailed((3, 576), seed=8)
    qp = qparams(x, 4, False, 128, pad=True)
    s, z = expand_qparams(qp, 576)
    assert s.shape == z.shape == (3, 576)
    assert torch.equal(s[:, 511], qp.scale[:, 3]) and torch.equal(s[:, 512], qp.scale[:, 4]) and torch.equal(z[:, 575], qp.zero[:, 4])
    q = quantize(x, qp)
    assert torch.equal((q.float() - z) * s, dequantize(q, qp))  # per-column form, as a packed kernel uses it
    # a kernel that zero-pads K to 640 can keep qp.scale as is: the real columns get the same codes
    padded = QParams(qp.scale, qp.zero, 4, False, 128, 640)
    assert torch.equal(quantize(torch.nn.functional.pad(x, (0, 64)), padded)[:, :576], q)
    st, zt = expand_qparams(qparams(x, 8, True, "tensor"), 576)
    assert st.shape == (576,) and bool((zt == 128).all())
    with pytest.raises(ValueError, match="do not fit an input dimension of 600"):
        expand_qparams(qp, 600)


def test_short_last_group_needs_matching_input_dimension():
    qp = qparams(torch.randn(6, 576), 4, granularity=128, pad=True)
    with pytest.raises(ValueError, match="computed for an input dimension of 576"):
        quantize(torch.randn(6, 600), qp)  # 600 also splits into 5 groups of 128: only in_features tells them apart
    bare = QParams(qp.scale, qp.zero, 4, True, 128)  # no in_features: a shorter last group is not assumed
    with pytest.raises(ValueError, match="does not split into groups of 128"):
        dequantize(torch.zeros(6, 576, dtype=torch.uint8), bare)


def test_fake_quant_ste_with_short_last_group():
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(8, 72, generator=g) * 2).requires_grad_()  # 72 = 2 x 32 + 8
    for sym in (True, False):
        qp = qparams(x.detach() * 0.5, 4, sym, granularity=32, pad=True)
        y = fake_quant(x, qp)
        assert y.shape == x.shape and torch.equal(y.detach(), quant_dequant(x.detach(), qp))
        (gx,) = torch.autograd.grad((y * 3.0).sum(), x)
        lo, hi = representable_range(x, qp)
        inside = (x.detach() >= lo) & (x.detach() <= hi)
        assert 0.1 < inside[:, 64:].float().mean() < 0.99  # the tail group clips too
        assert torch.equal(gx, 3.0 * inside.float())
