"""FP8 (E4M3 and E5M2) simulation next to INT8: scaled casts to PyTorch's float8 dtypes and back (accuracy only).

An FP8 number has a sign, ``e`` exponent bits and ``m`` mantissa bits: E4M3 (``torch.float8_e4m3fn``: bias 7,
largest finite 448, no infinities) keeps precision, E5M2 (``torch.float8_e5m2``: bias 15, largest finite 57344)
keeps range. Unlike INT8's evenly spaced grid, the spacing grows with magnitude: every binade ``[2^k, 2^(k+1))``
holds ``2^m`` values, so the relative error is about ``2^-(m+1)`` whatever the scale, and an outlier costs the
small values little. That is why FP8 is pitched for activations with outliers (H100-class hardware has FP8
matmuls; this CPU does not, so everything here is fake-quant in float32: quality only, never speed).

- ``round_to_fp8(x, fmt)``: the grid rounding written out in float arithmetic (round to nearest, ties to
  even, subnormals, SATURATING at the largest finite value). Tested equal to PyTorch's own cast
  ``x.to(dtype).float()`` on random and edge values; PyTorch's cast saturates for E4M3 but overflows to
  ``inf`` for E5M2, which is why the simulation clamps before casting.
- ``fp8_quant_dequant(x, fmt, granularity)``: scale so the group's absolute maximum lands on the format's
  largest value (per tensor, per channel / per token), cast to the float8 dtype, cast back, unscale.
- ``FP8Config`` + ``FP8Linear``: weights (and optionally inputs, dynamically per tensor or per token)
  through that, registered with ``qlib.quant.api.quantize_``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlib.quant.api import check_weights, register
from qlib.quant.config import QuantConfig
from qlib.quant.modules import as_linear, set_module


@dataclass(frozen=True)
class FP8Format:
    """An FP8 format: exponent and mantissa bits, exponent bias, largest finite value, PyTorch dtype."""

    name: str
    exp_bits: int
    man_bits: int
    bias: int
    max: float
    dtype: torch.dtype

    @property
    def min_normal_exp(self) -> int:
        """Exponent of the smallest normal number (``1 - bias``); below it the spacing stays ``2^(1-bias-m)``."""
        return 1 - self.bias


FORMATS = {
    "e4m3": FP8Format("e4m3", 4, 3, 7, 448.0, torch.float8_e4m3fn),
    "e5m2": FP8Format("e5m2", 5, 2, 15, 57344.0, torch.float8_e5m2),
}
FP8_GRANULARITIES = ("tensor", "channel", "token")


def fp8_format(fmt: str | FP8Format) -> FP8Format:
    """The ``FP8Format`` named ``fmt`` ('e4m3' or 'e5m2')."""
    if isinstance(fmt, FP8Format):
        return fmt
    if fmt not in FORMATS:
        raise ValueError(f"fp8 format {fmt!r} is unknown; use 'e4m3' (precision) or 'e5m2' (range)")
    return FORMATS[fmt]


def round_to_fp8(x: Tensor, fmt: str | FP8Format = "e4m3") -> Tensor:
    """``x`` rounded to the nearest value of the FP8 grid (ties to even), saturating at +-max; float32 out.

    Written out in float arithmetic: the binade ``2^e`` of each value (``e`` floored at the smallest normal
    exponent, which gives the subnormals), the spacing ``2^(e - m)`` there, then ``round(x / spacing)``
    (exact: the spacing is a power of two; ``torch.round`` rounds half to even, as the hardware does).
    """
    f = fp8_format(fmt)
    x = x.float()
    a = x.abs()
    _, e = torch.frexp(a)  # a = mant * 2**e with mant in [0.5, 1): floor(log2 a) = e - 1
    e = torch.clamp(e - 1, min=f.min_normal_exp)
    step = torch.ldexp(torch.ones_like(a), e - f.man_bits)
    q = torch.round(a / step) * step
    q = torch.clamp(q, max=f.max)  # saturate (rounding up past max, or a value beyond max)
    return torch.where(torch.isnan(x), x, torch.copysign(q, x))


def cast_fp8(x: Tensor, fmt: str | FP8Format = "e4m3") -> Tensor:
    """``x`` through PyTorch's float8 dtype and back to float32, saturating at +-max (no inf for E5M2)."""
    f = fp8_format(fmt)
    return torch.clamp(x.float(), -f.max, f.max).to(f.dtype).float()


def fp8_scale(x: Tensor, fmt: str | FP8Format = "e4m3", granularity: str = "tensor") -> Tensor:
    """The scale that maps each group's absolute maximum onto the format's largest value (1 for all-zero groups).

    ``tensor``: one scale (0-dim); ``channel`` / ``token``: one per row of the last dim (``[..., 1]``).
    """
    f = fp8_format(fmt)
    if granularity not in FP8_GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is unknown; use one of {', '.join(FP8_GRANULARITIES)}")
    amax = x.detach().abs().amax() if granularity == "tensor" else x.detach().abs().amax(dim=-1, keepdim=True)
    amax = amax.float()
    return torch.where(amax > 0, amax / f.max, torch.ones_like(amax))


def fp8_quant_dequant(x: Tensor, fmt: str | FP8Format = "e4m3", granularity: str = "tensor") -> Tensor:
    """Scaled FP8 fake-quant of ``x``: ``cast_fp8(x / scale) * scale`` in ``x``'s dtype."""
    s = fp8_scale(x, fmt, granularity)
    return (cast_fp8(x.float() / s, fmt) * s).to(x.dtype)


@dataclass(frozen=True)
class FP8Config(QuantConfig):
    """FP8 weights (scaled per output channel or per tensor) and optionally FP8 inputs (dynamic, per tensor or token).

    Simulated (fake-quant): this CPU has no FP8 matmul, so it measures quality only, like ``W8A8Config``.
    """

    weight_format: str = "e4m3"
    weight_granularity: str = "channel"  # or "tensor"
    act_format: str | None = None  # None: weight-only
    act_granularity: str = "tensor"  # or "token"

    def __post_init__(self) -> None:
        fp8_format(self.weight_format)
        if self.act_format is not None:
            fp8_format(self.act_format)
        if self.weight_granularity not in ("tensor", "channel"):
            raise ValueError(f"weight_granularity={self.weight_granularity!r} is invalid; use 'channel' or 'tensor'")
        if self.act_granularity not in ("tensor", "token"):
            raise ValueError(f"act_granularity={self.act_granularity!r} is invalid; use 'tensor' or 'token'")

    @property
    def tag(self) -> str:
        """E.g. ``fp8.we4m3.ch`` or ``fp8.we4m3.ch.ae4m3.t``."""
        w = f"fp8.w{self.weight_format}.{'ch' if self.weight_granularity == 'channel' else 't'}"
        if self.act_format is None:
            return w
        return f"{w}.a{self.act_format}.{'tok' if self.act_granularity == 'token' else 't'}"


class FP8Linear(nn.Module):
    """A linear layer with an FP8 fake-quant weight (once) and, if ``act_format``, FP8 fake-quant inputs (every call)."""

    def __init__(self, linear: nn.Linear, config: FP8Config) -> None:
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features, self.config = linear.in_features, linear.out_features, config
        self.weight = nn.Parameter(fp8_quant_dequant(w, config.weight_format, config.weight_granularity),
                                   requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.config.act_format is not None:
            x = fp8_quant_dequant(x, self.config.act_format, self.config.act_granularity)
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.config.tag}"


@register(FP8Config)
def _fp8(model: nn.Module, config: FP8Config, fqns: list[str], calib=None) -> nn.Module:
    """``quantize_`` handler: swap each selected linear for an ``FP8Linear`` (fake-quant, accuracy only)."""
    check_weights(model, fqns, "channel")
    for f in fqns:
        lin = model.get_submodule(f)
        set_module(model, f, FP8Linear(as_linear(lin), config).to(lin.weight.device))
    return model
