"""Tests for qlib.methods.qat: straight-through gradients, LSQ scale gradients, QAT step 0 == PTQ, QAT beats PTQ at 4 bits."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qlib.quant.api import quantize_
from qlib.quant.config import W8A8Config
from qlib.quant.primitives import qparams, quant_dequant, representable_range
from qlib.methods.qat import (ActFakeQuant, QATConfig, QATModule, WeightFakeQuant, lsq_grad_scale, prepare_qat,
                      scale_parameters, ste_fake_quant, train)


def test_ste_forward_is_quant_dequant_and_gradient_is_one_inside_zero_outside():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 64, generator=g) * 2).requires_grad_()
    for bits, sym, gran in ((4, True, "tensor"), (4, False, "channel"), (8, False, "tensor"), (3, True, "channel")):
        qp = qparams(x.detach() * 0.5, bits, sym, gran)  # a narrower range: some values fall outside it
        scale = qp.scale  # per channel its [16, 1] shape broadcasts against [16, 64]
        y = ste_fake_quant(x, scale, qp.zero, qp.qmax)
        assert torch.equal(y.detach(), quant_dequant(x.detach(), qp))  # bit-identical forward
        (gx,) = torch.autograd.grad((y * 3.0).sum(), x)
        lo, hi = representable_range(x, qp)
        inside = (x.detach() >= lo) & (x.detach() <= hi)
        assert 0.1 < inside.float().mean() < 0.99
        assert torch.equal(gx, 3.0 * inside.float())


def test_lsq_scale_gradient_matches_the_paper():
    x = torch.tensor([-3.0, -0.26, 0.1, 0.74, 5.0])
    scale = torch.tensor(0.5, requires_grad=True)
    zero, qmax = torch.tensor(8.0), 15  # 4-bit symmetric: codes 0..15, steps -8..7
    y = ste_fake_quant(x, scale, zero, qmax, grad_scale=0.25)
    (gs,) = torch.autograd.grad(y.sum(), scale)
    v = x / 0.5
    inside = (v + 8 >= 0) & (v + 8 <= 15)
    expect = torch.where(inside, torch.round(v) - v, torch.clamp(torch.round(v) + 8, 0, 15) - 8)  # -x/s + round(x/s); Qn, Qp
    assert torch.allclose(gs, 0.25 * expect.sum())
    assert lsq_grad_scale(100, 15, 8.0) == pytest.approx(1 / (100 * 7) ** 0.5)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize("scales", ["lsq", "minmax"])
@pytest.mark.parametrize("gran,wsym", [("tensor", True), ("channel", True), ("tensor", False)])
def test_prepared_model_equals_static_ptq(scales, gran, wsym):
    model = _mlp()
    calib = [torch.randn(8, 16) for _ in range(4)]
    x = torch.randn(32, 16)
    ptq = quantize_(copy.deepcopy(model), W8A8Config(act_mode="static", weight_bits=4, weight_symmetric=wsym,
                                                     weight_group_size=-1 if gran == "tensor" else None), calib=calib)
    qat = quantize_(copy.deepcopy(model), QATConfig(weight_bits=4, weight_granularity=gran, weight_symmetric=wsym,
                                                    scales=scales), calib=calib).eval()
    with torch.no_grad():
        assert torch.equal(qat(x), ptq(x))  # QAT step 0 is PTQ, bit for bit
    assert sum(isinstance(m, QATModule) for m in qat.modules()) == 3
    assert isinstance(qat[1], nn.LayerNorm)  # LayerNorm stays FP32
    assert len(scale_parameters(qat)) == (6 if scales == "lsq" else 0)


def test_quantize_with_qat_config_takes_convs_and_equals_prepare_qat():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    calib, x = [torch.randn(4, 3, 8, 8)], torch.randn(6, 3, 8, 8)
    only_conv = lambda m, fqn: isinstance(m, nn.Conv2d)  # noqa: E731
    q = quantize_(copy.deepcopy(model), QATConfig(), filter_fn=only_conv, calib=calib).eval()
    assert isinstance(q[0], QATModule) and type(q[2]) is nn.Linear and list(q.qlib_quantized) == ["0"]
    p = prepare_qat(copy.deepcopy(model), QATConfig(), calib=calib, filter_fn=only_conv).eval()
    with torch.no_grad():
        assert torch.equal(q(x), p(x)) and not torch.equal(q(x), model(x))


def test_minmax_activation_range_moves_in_training_and_freezes_in_eval():
    fq = ActFakeQuant(torch.tensor(-1.0), torch.tensor(1.0), 8, False, "minmax", momentum=0.5)
    fq.train()
    fq(torch.tensor([-3.0, 5.0]))
    assert fq.lo.item() == pytest.approx(-2.0) and fq.hi.item() == pytest.approx(3.0)
    fq.eval()
    fq(torch.tensor([-100.0, 100.0]))
    assert fq.hi.item() == pytest.approx(3.0)


def test_weight_fake_quant_conv_per_channel_shapes_and_gradient():
    w = torch.randn(6, 3, 3, 3, requires_grad=True)
    fq = WeightFakeQuant(w.detach(), 4, True, "channel", "lsq")
    assert fq.scale.shape == (6, 1)
    y = fq(w)
    assert y.shape == w.shape
    y.sum().backward()
    assert fq.scale.grad is not None and fq.scale.grad.shape == (6, 1) and w.grad.abs().sum() > 0


def test_config_validation():
    with pytest.raises(ValueError, match="scales"):
        QATConfig(scales="ema")
    with pytest.raises(ValueError, match="weight_granularity"):
        QATConfig(weight_granularity=128)
    with pytest.raises(ValueError, match="calibration"):
        prepare_qat(_mlp(), QATConfig())
    assert QATConfig().tag == "qat.w4t.a8.lsq"


def _blobs(n, seed):
    """A 4-class problem in 16 dims that a small MLP learns well."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 16, generator=torch.Generator().manual_seed(123)) * 1.2
    y = torch.randint(0, 4, (n,), generator=g)
    return centers[y] + torch.randn(n, 16, generator=g), y


@pytest.mark.parametrize("scales", ["lsq", "minmax"])
def test_qat_beats_ptq_at_4_bits_on_a_toy_problem(scales):
    torch.set_num_threads(1)
    xtr, ytr = _blobs(2048, 0)
    xte, yte = _blobs(2048, 1)
    model = _mlp()
    with torch.no_grad():  # planted outlier weight: per-tensor 4-bit grids become coarse for every other weight
        model[3].weight[0, 0] = 6.0
    batches = [torch.randint(0, 2048, (64,), generator=torch.Generator().manual_seed(i)) for i in range(300)]
    loss_of = lambda m: (lambda idx: F.cross_entropy(m(xtr[idx]), ytr[idx]))  # noqa: E731
    train(model, loss_of(model), batches, lr=3e-3, progress=False)
    with torch.no_grad():
        model[3].weight[0, 0] = 6.0  # keep the outlier after training
    acc = lambda m: float((m.eval()(xte).argmax(-1) == yte).float().mean())  # noqa: E731
    fp32 = acc(model)
    calib = [xtr[:256]]
    cfg = QATConfig(weight_bits=4, weight_granularity="tensor", act_bits=8, scales=scales)
    ptq = acc(prepare_qat(copy.deepcopy(model), cfg, calib=calib))
    qat_model = prepare_qat(copy.deepcopy(model), cfg, calib=calib)
    hist = train(qat_model, loss_of(qat_model), batches[:150], lr=1e-3, progress=False,
                 eval_fn=acc, eval_at=[0, 150])
    qat = acc(qat_model)
    assert fp32 > 0.85
    assert ptq < fp32 - 0.05                    # 4-bit per-tensor PTQ clearly loses accuracy here
    assert (qat - ptq) / (fp32 - ptq) > 0.7       # QAT recovers most of the gap
    assert hist[0]["metric"] == pytest.approx(ptq) and hist[-1]["metric"] == pytest.approx(qat)
    assert hist[-1]["train_s"] > 0 and hist[-1]["loss"] > 0
