"""Tests for qlib.methods.cnn: BN folding is exact in float (ResNet and depthwise blocks), PTQ variants, ORT image export, QAT on a CNN."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qlib.lab.models import SmallResNet, efficientnet_lite0_arch
from qlib.methods.cnn import (CNNConfig, ImageCalibrationReader, QuantBatchNorm, augmented_views, bn_multipliers, count_bn,
                              export_image_onnx, find_conv_bn_pairs, fold_bn, fold_conv_bn, max_rel_diff, ort_image_logits,
                              zeroed_bn_multipliers)
from qlib.methods.qat import QATConfig, QATModule, prepare_qat, train
from qlib.quant.api import quantize_


def _randomise_bn(model, seed=0, spread=1.0):
    """Non-trivial BN statistics and affine parameters (an untrained BN is the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.exp(torch.randn(n, generator=g) * spread))
                m.weight.copy_(1 + 0.3 * torch.randn(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
    return model.eval()


def test_fold_conv_bn_exact_for_depthwise_and_bias():
    torch.manual_seed(0)
    for groups, bias in ((1, False), (8, True)):  # groups=8 with 8 channels: depthwise
        conv, bn = nn.Conv2d(8, 8, 3, padding=1, groups=groups, bias=bias), nn.BatchNorm2d(8)
        _randomise_bn(nn.Sequential(bn), seed=groups)
        x = torch.randn(2, 8, 10, 10)
        with torch.no_grad():
            ref, out = bn(conv(x)), fold_conv_bn(conv, bn)(x)
        assert (out - ref).abs().max() / ref.abs().max() < 1e-6


def test_fold_bn_exact_on_small_resnet():
    model = _randomise_bn(SmallResNet(), seed=1)
    x = torch.randn(4, 1, 28, 28)
    folded, pairs = fold_bn(model, x)
    assert len(pairs) == count_bn(model) == 9 and count_bn(folded) == 0
    assert max_rel_diff(model, folded, torch.randn(3, 1, 28, 28)) < 1e-5
    assert count_bn(model) == 9  # the original is untouched


def test_fold_bn_exact_on_efficientnet_lite_blocks():
    torch.manual_seed(0)
    model = _randomise_bn(efficientnet_lite0_arch(), seed=2, spread=2.0)
    x = torch.randn(1, 3, 64, 64)
    folded, pairs = fold_bn(model, x)
    assert len(pairs) == 49 and count_bn(folded) == 0
    assert any(folded.get_submodule(c).groups > 1 for c, _ in pairs)  # depthwise convs were folded
    assert max_rel_diff(model, folded, torch.randn(2, 3, 64, 64)) < 1e-5


class _SharedOutput(nn.Module):
    """The conv output feeds both the BN and a residual: folding would change the residual."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_fold_bn_refuses_a_conv_output_used_elsewhere():
    model = _randomise_bn(_SharedOutput())
    assert find_conv_bn_pairs(model, torch.randn(1, 3, 8, 8)) == [("conv", "bn")]
    with pytest.raises(ValueError, match="differs"):
        fold_bn(model, torch.randn(1, 3, 8, 8))


def test_ptq_variants_on_planted_channel_spread():
    """Widely spread BN multipliers: per-channel beats per-tensor after folding; naive rounds tiny multipliers to zero."""
    model = _randomise_bn(SmallResNet(), seed=3)
    with torch.no_grad():
        mult = torch.logspace(-3, 0, 24)  # stem BN multipliers over 3 decades
        model.stem[1].weight.copy_(mult * model.stem[1].running_var.add(1e-5).sqrt())
    x = torch.randn(64, 1, 28, 28)
    calib = [torch.randn(32, 1, 28, 28) for _ in range(2)]
    with torch.no_grad():
        ref = model(x)
    err = {}
    for name, kw in {"naive": dict(fold=False, weight_granularity="tensor"),
                     "folded tensor": dict(fold=True, weight_granularity="tensor"),
                     "folded channel": dict(fold=True, weight_granularity="channel")}.items():
        q = quantize_(copy.deepcopy(model), CNNConfig(**kw), calib=calib)
        with torch.no_grad():
            err[name] = float((q(x) - ref).norm() / ref.norm())
        if name == "naive":
            assert sum(isinstance(m, QuantBatchNorm) for m in q.modules()) == 9
            assert zeroed_bn_multipliers(q) > 0
    assert err["folded channel"] < err["folded tensor"]
    assert err["folded channel"] < 0.05
    assert bn_multipliers(model)["stem.1"].min() < 2e-3


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_cnn_config_equals_fold_then_frozen_minmax_fake_quant(granularity):
    """The folded CNN PTQ variant is exactly BN folding followed by QAT's fake-quant modules frozen at min-max (step 0)."""
    model = _randomise_bn(SmallResNet(), seed=4)
    x, calib = torch.randn(16, 1, 28, 28), [torch.randn(32, 1, 28, 28) for _ in range(2)]
    q = quantize_(copy.deepcopy(model), CNNConfig(weight_bits=4, weight_granularity=granularity), calib=calib)
    ref = prepare_qat(fold_bn(model, calib[0])[0], QATConfig(weight_bits=4, weight_granularity=granularity,
                                                             weight_symmetric=False, scales="minmax"), calib=calib)
    assert count_bn(q) == 0 and set(q.qlib_quantized) == set(ref.qlib_quantized)
    with torch.no_grad():
        assert torch.equal(q(x), ref.eval()(x))


def test_cnn_config_naive_keeps_every_bn_as_an_integer_op():
    model = _randomise_bn(SmallResNet(), seed=5)
    calib = [torch.randn(32, 1, 28, 28)]
    q = quantize_(copy.deepcopy(model), CNNConfig(fold=False), calib=calib)
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert all(isinstance(q.get_submodule(n), QATModule) for n in convs) and set(q.qlib_quantized) == set(convs)
    assert sum(isinstance(m, QuantBatchNorm) for m in q.modules()) == count_bn(model) == 9
    with pytest.raises(ValueError, match="calibration images"):
        quantize_(copy.deepcopy(model), CNNConfig(), calib=None)


def test_ort_image_export_and_qdq_close_to_torch(tmp_path):
    import onnxruntime as ort

    from qlib.tools.onnx_utils import op_counts, quantize_static_qdq

    torch.manual_seed(0)
    model = _randomise_bn(SmallResNet(widths=(8, 8, 8)))
    x = torch.randn(5, 1, 28, 28)
    path = export_image_onnx(model, x[:2], tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(ort_image_logits(sess, x, batch_size=3) - ref).max() < 1e-4  # dynamic batch
    reader = ImageCalibrationReader(torch.randn(16, 1, 28, 28), batch_size=4)
    assert len(reader) == 4
    q = quantize_static_qdq(path, tmp_path / "q.onnx", reader)
    qs = ort.InferenceSession(str(q), providers=["CPUExecutionProvider"])
    out = ort_image_logits(qs, x)
    assert np.abs(out - ref).max() / np.abs(ref).max() < 0.2
    assert op_counts(q).get("QuantizeLinear", 0) >= 4 and "QuantizeLinear" not in op_counts(path)
    # reduce_range keeps weights on 7 bits (the x86 U8S8 saturation remedy); the default uses the full int8 range
    import onnx
    from onnx import numpy_helper

    def int8_weight_range(p):
        ws = [numpy_helper.to_array(t) for t in onnx.load(str(p)).graph.initializer if t.data_type == onnx.TensorProto.INT8]
        return min(int(w.min()) for w in ws if w.size > 1), max(int(w.max()) for w in ws if w.size > 1)

    reader.rewind()
    q7 = quantize_static_qdq(path, tmp_path / "q7.onnx", reader, reduce_range=True)
    lo, hi = int8_weight_range(q7)
    assert lo >= -64 and hi <= 64  # ORT's symmetric 7-bit grid
    assert max(-int8_weight_range(q)[0], int8_weight_range(q)[1]) > 100


def test_augmented_views_deterministic():
    img = (np.arange(40 * 60 * 3) % 256).astype(np.uint8).reshape(40, 60, 3)
    a, b = augmented_views([img], 5, seed=1), augmented_views([img], 5, seed=1)
    assert len(a) == 5 and all(np.array_equal(u, v) for u, v in zip(a, b))
    assert np.array_equal(a[0], img) and all(v.dtype == np.uint8 and v.shape[2] == 3 for v in a)


def test_qat_beats_ptq_at_4_bits_on_a_cnn():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(4, 1, 12, 12, generator=g)

    def data(n, seed):
        gg = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 4, (n,), generator=gg)
        return protos[y] + 0.8 * torch.randn(n, 1, 12, 12, generator=gg), y

    xtr, ytr = data(1024, 1)
    xte, yte = data(1024, 2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4))
    batches = [torch.randint(0, 1024, (64,), generator=torch.Generator().manual_seed(i)) for i in range(150)]
    train(model, lambda idx: F.cross_entropy(model(xtr[idx]), ytr[idx]), batches, lr=1e-2, progress=False)
    model.eval()
    with torch.no_grad():  # one BN channel far larger than the rest: a per-tensor 4-bit grid on the folded weights is coarse
        model[4].weight[0] *= 30   # ReLU and average pooling are positively homogeneous: scaling channel 0 here ...
        model[4].bias[0] *= 30
        model[8].weight[:, 0:4] /= 30  # ... and dividing its columns of the head leaves the function unchanged
    acc = lambda m: float((m.eval()(xte).argmax(-1) == yte).float().mean())  # noqa: E731
    fp32 = acc(model)
    folded, _ = fold_bn(model, xtr[:2])
    cfg = QATConfig(weight_bits=4, weight_granularity="tensor", weight_symmetric=False, act_bits=8, scales="lsq")
    ptq = acc(prepare_qat(copy.deepcopy(folded), cfg, calib=[xtr[:256]]))
    q = prepare_qat(copy.deepcopy(folded), cfg, calib=[xtr[:256]])
    train(q, lambda idx: F.cross_entropy(q(xtr[idx]), ytr[idx]), batches[:100], lr=2e-3, progress=False)
    qat = acc(q)
    assert fp32 > 0.8 and ptq < fp32 - 0.05
    assert (qat - ptq) / (fp32 - ptq) > 0.6
