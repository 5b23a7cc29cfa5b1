"""CNN quantization: exact BatchNorm folding, fake-quant of convolutions (naive / folded, per tensor / per channel), ORT INT8.

    folded, pairs = fold_bn(model, example)            # a copy with every conv -> BN folded; BN becomes Identity
    quantize_(model, CNNConfig(weight_bits=8, weight_granularity="channel", fold=True), calib=calib)  # in place

Folding (Jacob et al. 2018; Krishnamoorthi 2018, section 3.2): a BatchNorm in eval mode after a convolution is a
per-output-channel affine map, ``y = gamma * (conv(x) - mean) / sqrt(var + eps) + beta``, so it merges into the
convolution: ``W' = W * m`` (m = gamma / sqrt(var + eps), one multiplier per output channel, depthwise included) and
``b' = (b - mean) * m + beta``. In float the folded model computes the same function (tested, ~1e-6 relative).

Which BN follows which conv is found by running one example batch with hooks: a BN whose input tensor IS a conv's
output tensor is paired with that conv. ``fold_bn`` then checks the folded copy against the original on that batch
and raises if they differ (a conv output also used elsewhere, e.g. by a residual branch, would be caught there).

``quantize_`` with a ``CNNConfig`` builds the PTQ variants of notebook 07 from ``qlib.methods.qat``'s fake-quant modules, frozen
at their PTQ parameters (min-max weights, min-max calibrated per-tensor activations at the input of every quantized op);
the first calibration batch finds and checks the conv -> BN pairs:

- ``fold=False`` ("naive", BN kept separate): each conv's output is quantized to 8 bits before its BN, and the BN is
  run as its own integer op — its input quantized per tensor and its per-channel multiplier quantized per tensor, as
  an integer engine without fusion would store it (``QuantBatchNorm``).
- ``fold=True``: BN folded first; the folded weights are quantized per tensor or per output channel.

Fake-quant is for accuracy; the INT8 speed comes from ONNX Runtime's QDQ kernels (``export_image_onnx`` +
``qlib.tools.onnx_utils.quantize_static_qdq`` with an ``ImageCalibrationReader``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader
from torch import Tensor, nn

from qlib.methods.qat import ActFakeQuant, wrap_fake_quant
from qlib.quant.api import calibrate_act_ranges, register
from qlib.quant.config import FakeQuantConfig, check_flags
from qlib.quant.modules import set_module
from qlib.quant.primitives import qparams, quant_dequant

CONV_TYPES = (nn.Conv2d,)


# --------------------------------------------------------------------------------------------------
# BatchNorm folding


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A copy of ``conv`` with the eval-mode ``bn`` that follows it folded into its weight and bias (any ``groups``)."""
    if conv.out_channels != bn.num_features:
        raise ValueError(f"conv has {conv.out_channels} output channels but the BatchNorm has {bn.num_features}; "
                         "fold only a BN that directly follows the conv")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("the BatchNorm tracks no running statistics (track_running_stats=False); it cannot be folded")
    folded = copy.deepcopy(conv)
    with torch.no_grad():
        w64 = conv.weight.double()
        mult = bn.running_var.double().add(bn.eps).rsqrt()
        if bn.weight is not None:
            mult = mult * bn.weight.double()
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mult)
        new_bias = (bias - bn.running_mean.double()) * mult + (bn.bias.double() if bn.bias is not None else 0.0)
        folded.weight = nn.Parameter((w64 * mult.view(-1, *([1] * (w64.dim() - 1)))).to(conv.weight.dtype))
        folded.bias = nn.Parameter(new_bias.to(conv.weight.dtype))
    return folded


def find_conv_bn_pairs(model: nn.Module, example: Tensor) -> list[tuple[str, str]]:
    """(conv name, BN name) for every BatchNorm2d whose input is exactly a Conv2d's output, found on one forward pass."""
    outputs: dict[int, str] = {}
    pairs: list[tuple[str, str]] = []
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, CONV_TYPES):
            hooks.append(mod.register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(id(out), name)))
        elif isinstance(mod, nn.BatchNorm2d):
            def pre(m, args, name=name):
                conv = outputs.get(id(args[0]))
                if conv is not None and (conv, name) not in pairs:
                    pairs.append((conv, name))
            hooks.append(mod.register_forward_pre_hook(pre))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example)  # noqa: F841  kept alive so no conv output id is reused during the pass
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return pairs


def count_bn(model: nn.Module) -> int:
    """Number of BatchNorm2d layers."""
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def fold_bn(model: nn.Module, example: Tensor, rtol: float = 1e-4) -> tuple[nn.Module, list[tuple[str, str]]]:
    """A copy of ``model`` (eval mode) with every conv -> BN pair folded (the BN replaced by ``nn.Identity``).

    Raises if the folded copy's output on ``example`` differs from the original's by more than ``rtol`` (relative to
    the largest output), i.e. if a pairing was wrong.
    """
    model = model.eval()
    pairs = find_conv_bn_pairs(model, example)
    folded = copy.deepcopy(model)
    for conv_name, bn_name in pairs:
        set_module(folded, conv_name, fold_conv_bn(folded.get_submodule(conv_name), folded.get_submodule(bn_name)))
        set_module(folded, bn_name, nn.Identity())
    folded.eval()
    diff = max_rel_diff(model, folded, example)
    if diff > rtol:
        raise ValueError(f"the folded model differs from the original by {diff:.2e} (relative); a BatchNorm input is "
                         "probably also used elsewhere, so it cannot be folded into the conv")
    return folded, pairs


def max_rel_diff(a: nn.Module, b: nn.Module, x: Tensor) -> float:
    """max |a(x) - b(x)| / max |a(x)|, both in eval mode."""
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    return float((ya - yb).abs().max() / ya.abs().max().clamp_min(1e-30))


def bn_multipliers(model: nn.Module) -> dict[str, Tensor]:
    """Each BatchNorm2d's per-channel multiplier ``gamma / sqrt(var + eps)`` (what folding scales the conv by)."""
    out = {}
    for name, bn in model.named_modules():
        if isinstance(bn, nn.BatchNorm2d):
            m = bn.running_var.add(bn.eps).rsqrt()
            out[name] = (m * bn.weight if bn.weight is not None else m).detach()
    return out


# --------------------------------------------------------------------------------------------------
# PTQ variants


class QuantBatchNorm(nn.Module):
    """A BatchNorm run as its own integer op: input fake-quantized per tensor, multiplier quantized per tensor, bias FP32."""

    def __init__(self, bn: nn.BatchNorm2d, act_fq: ActFakeQuant, weight_bits: int = 8, symmetric: bool = True) -> None:
        super().__init__()
        with torch.no_grad():
            mult = bn.running_var.add(bn.eps).rsqrt() * (bn.weight if bn.weight is not None else 1.0)
            add = (bn.bias if bn.bias is not None else 0.0) - bn.running_mean * mult
            mq = quant_dequant(mult[None], qparams(mult[None], weight_bits, symmetric, "tensor", name="BN multiplier"))[0]
        self.act_fq = act_fq
        self.register_buffer("mult", mq.view(1, -1, 1, 1).clone())
        self.register_buffer("add", add.view(1, -1, 1, 1).detach().clone())
        self.zeroed = int((mq == 0).sum())  # multipliers rounded to zero by the per-tensor grid

    def forward(self, x: Tensor) -> Tensor:
        return self.act_fq(x) * self.mult + self.add


@dataclass(frozen=True)
class CNNConfig(FakeQuantConfig):
    """CNN post-training fake-quant: BN folded first (``fold=True``) or run as its own integer op, then every selected
    Linear / Conv2d fake-quantized at frozen min-max parameters (weights per tensor or per output channel)."""

    weight_bits: int = 8
    weight_symmetric: bool = False
    fold: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_flags(self, "fold")

    @property
    def tag(self) -> str:
        """E.g. ``cnn.w8t.asym.a8.fold`` (``.naive`` when BN is kept separate)."""
        a = f".a{self.act_bits}" if self.act_bits else ""
        sym = "sym" if self.weight_symmetric else "asym"
        return f"cnn.w{self.weight_bits}{self.weight_granularity[0]}.{sym}{a}.{'fold' if self.fold else 'naive'}"


def fold_bn_(model: nn.Module, example: Tensor, rtol: float = 1e-4) -> list[tuple[str, str]]:
    """``fold_bn`` in place: each paired conv replaced by its folded copy, each BN by ``nn.Identity``; return the pairs."""
    folded, pairs = fold_bn(model, example, rtol)
    for conv_name, bn_name in pairs:
        set_module(model, conv_name, folded.get_submodule(conv_name))
        set_module(model, bn_name, nn.Identity())
    return pairs


@register(CNNConfig)
def apply_cnn_ptq(model: nn.Module, config: CNNConfig, fqns: list[str], calib: Iterable | None = None) -> nn.Module:
    """``quantize_``'s CNN handler (in place, eval mode): fold BN or wrap it in ``QuantBatchNorm``, then fake-quant ``fqns``."""
    calib = list(calib) if calib is not None else []
    if not calib:
        raise ValueError("CNN PTQ needs calibration images: pass calib=[images [N, C, H, W], ...]")
    model.eval()
    if config.fold:
        fold_bn_(model, calib[0])
    bns = [] if config.fold else [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    bn_ranges = {}
    if bns:  # calibrate the BN inputs on the float model, as the conv/linear inputs are
        obs = calibrate_act_ranges(model, bns, calib, config.act_bits or 8, False, progress=False)
        bn_ranges = {n: (o.lo, o.hi) for n, o in obs.items()}
    wrap_fake_quant(model, config, fqns, calib, scales="minmax")
    for n in bns:
        set_module(model, n, QuantBatchNorm(model.get_submodule(n), ActFakeQuant(*bn_ranges[n], config.act_bits or 8, False,
                                                                              "minmax"), config.weight_bits,
                                            config.weight_symmetric))
    return model.eval()


def zeroed_bn_multipliers(model: nn.Module) -> int:
    """How many BN multipliers a ``CNNConfig(fold=False)`` model rounded to zero."""
    return sum(m.zeroed for m in model.modules() if isinstance(m, QuantBatchNorm))


# --------------------------------------------------------------------------------------------------
# ONNX Runtime INT8 for image models


def export_image_onnx(model: nn.Module, example: Tensor, path: str | Path, dynamo: bool = False) -> Path:
    """Export an image classifier ``[N, C, H, W] -> logits`` to ONNX with a dynamic batch (input "pixels", output "logits")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    if dynamo:
        program = torch.onnx.export(model, (example,), input_names=["pixels"], output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},),
                                    dynamo=True, verbose=False)
        program.save(str(path))
    else:
        torch.onnx.export(model, (example,), str(path), input_names=["pixels"], output_names=["logits"],
                          dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    return path


class ImageCalibrationReader(CalibrationDataReader):
    """Calibration batches of prepared images [N, C, H, W] for ``quantize_static``, ``batch_size`` at a time."""

    def __init__(self, images: Tensor | np.ndarray, input_name: str = "pixels", batch_size: int = 8) -> None:
        if len(images) == 0:
            raise ValueError("no calibration images; pass at least one")
        self.images = np.asarray(images.detach().cpu() if isinstance(images, Tensor) else images, dtype=np.float32)
        self.input_name, self.batch_size, self._next = input_name, batch_size, 0

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.images):
            return None
        batch = self.images[self._next:self._next + self.batch_size]
        self._next += self.batch_size
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._next = 0


def ort_image_logits(session, images: Tensor | np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits of an image ONNX model on ``images`` [N, C, H, W], in batches."""
    x = np.asarray(images.detach().cpu() if isinstance(images, Tensor) else images, dtype=np.float32)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)])


# --------------------------------------------------------------------------------------------------
# deterministic views of a few natural images (EfficientNet agreement without labels)


def augmented_views(images: Sequence[np.ndarray], n_views: int, seed: int = 0) -> list[np.ndarray]:
    """``n_views`` deterministic variants of each uint8 HxWx3 image: random crops (50-100% of the short side), flips,
    brightness/contrast changes; view 0 of each image is the image itself."""
    rng = np.random.default_rng(seed)
    out = []
    for img in images:
        h, w = img.shape[:2]
        for v in range(n_views):
            if v == 0:
                out.append(img)
                continue
            side = int(min(h, w) * rng.uniform(0.5, 1.0))
            top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = img[top:top + side, left:left + side].astype(np.float32)
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            crop = (crop - 128.0) * rng.uniform(0.7, 1.3) + 128.0 + rng.uniform(-30, 30)
            out.append(np.ascontiguousarray(np.clip(crop, 0, 255).astype(np.uint8)))
    return out
