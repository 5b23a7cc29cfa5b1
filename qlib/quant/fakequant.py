"""Fake-quantized modules for ACCURACY experiments: integer-grid weights and activations in float arithmetic.

``QuantLinear`` stands in for an ``nn.Linear`` whose weight was quant-dequantized once and whose input is
quant-dequantized on every call (dynamic min-max qparams, or static ones frozen after calibration). It runs
at float speed and float memory; speed and bytes come from ``qlib.quant.kernels``, never from here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlib.quant.primitives import (QParams, dynamic_act_qparams, group_size_for, observe_range, qparams,
                             qparams_from_range, quant_dequant)


class ActRangeObserver:
    """Running per-tensor activation range over calibration batches.

    ``minmax`` keeps the extremes over all batches; ``percentile`` and ``mse`` clip each batch on its own and
    average the per-batch ranges weighted by element count (memory stays O(1) per layer, instead of storing
    every activation).
    """

    def __init__(self, bits: int, symmetric: bool, observer: str = "minmax", **observer_kw):
        self.bits, self.symmetric, self.observer, self.observer_kw = bits, symmetric, observer, observer_kw
        self.lo: Tensor | None = None
        self.hi: Tensor | None = None
        self.count = 0

    def update(self, x: Tensor, name: str = "activation") -> None:
        """Fold one batch of activations into the running range."""
        lo, hi = observe_range(x.detach(), self.bits, self.symmetric, "tensor", self.observer, name=name, **self.observer_kw)
        n = x.numel()
        if self.lo is None:
            self.lo, self.hi = lo, hi
        elif self.observer == "minmax":
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        else:
            w = n / (self.count + n)
            self.lo, self.hi = self.lo + w * (lo - self.lo), self.hi + w * (hi - self.hi)
        self.count += n

    def qparams(self) -> QParams:
        """Frozen per-tensor QParams from the range seen so far."""
        if self.lo is None:
            raise ValueError("the observer saw no activations; run calibration batches through the model first")
        return qparams_from_range(self.lo, self.hi, self.bits, self.symmetric, -1)


class QuantLinear(nn.Module):
    """A linear layer with fake-quantized weight (once) and fake-quantized input (every call)."""

    def __init__(self, linear: nn.Linear, weight_bits: int = 8, weight_symmetric: bool = True,
                 weight_granularity: str | int = "channel", act_bits: int = 8, act_symmetric: bool = False,
                 act_granularity: str = "tensor", act_qparams: QParams | None = None):
        super().__init__()
        w = linear.weight.detach()
        group_size_for(w, weight_granularity)  # raises a clear error before anything is built
        wq = quant_dequant(w, qparams(w, weight_bits, weight_symmetric, weight_granularity, name="weight"))
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(wq, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.weight_bits, self.weight_symmetric, self.weight_granularity = weight_bits, weight_symmetric, weight_granularity
        self.act_bits, self.act_symmetric, self.act_granularity = act_bits, act_symmetric, act_granularity
        self.static = act_qparams is not None
        if self.static:
            if act_qparams.group_size != -1:
                raise ValueError("static activation qparams must be per-tensor; compute them with granularity='tensor'")
            self.register_buffer("act_scale", act_qparams.scale.detach().clone())
            self.register_buffer("act_zero", act_qparams.zero.detach().clone())

    def act_qparams(self, x: Tensor) -> QParams:
        """Frozen calibration qparams (static) or min-max qparams of this very input (dynamic)."""
        if self.static:
            return QParams(self.act_scale, self.act_zero, self.act_bits, self.act_symmetric, -1)
        return dynamic_act_qparams(x, self.act_bits, self.act_symmetric, self.act_granularity)

    def forward(self, x: Tensor) -> Tensor:
        xq = quant_dequant(x, self.act_qparams(x))
        return F.linear(xq, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        mode = "static" if self.static else f"dynamic/{self.act_granularity}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"w{self.weight_bits}{'sym' if self.weight_symmetric else 'asym'}/{self.weight_granularity}, "
                f"a{self.act_bits}{'sym' if self.act_symmetric else 'asym'}/{mode}")
