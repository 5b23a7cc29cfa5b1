"""Affine (uniform integer) quantization as pure tensor functions: qparams, quantize, dequantize, fake-quant.

Conventions (those of the GPTQ reference quantizer, IST-DASLab/gptq ``quant.py``, so qlib's GPTQ can be
compared with gptqmodel / llm-compressor side by side):

- Integer codes are UNSIGNED, in ``[0, qmax]`` with ``qmax = 2**bits - 1``, stored as ``torch.uint8``
  (``bits`` is 2..8). ``q = clamp(round(x / scale) + zero, 0, qmax)`` and ``dequant = (q - zero) * scale``.
  ``round`` is ``torch.round`` (half to even).
- Symmetric: ``zero = 2**(bits-1)`` (fixed) and ``scale = 2 * amax / qmax`` with ``amax = max|x|`` of the
  group (after the observer's clipping). So 8-bit codes 0..255 map to -128..127 steps around zero.
- Asymmetric: ``xmin = min(min(x), 0)``, ``xmax = max(max(x), 0)`` (so 0.0 is exactly representable),
  ``scale = (xmax - xmin) / qmax``, ``zero = clamp(round(-xmin / scale), 0, qmax)``.
- ``zero`` is a float32 tensor holding integers, with the same shape as ``scale``.
- A group whose range is zero (all zeros) gets ``scale = 1``, so nothing is ever NaN.

Granularity is one notion along the LAST dim of ``x`` ([..., K]); ``QParams.group_size`` records it:

- ``"tensor"`` (or ``-1``): one scale; ``scale`` is a 0-dim tensor; ``group_size = -1``.
- ``"channel"`` (or ``"token"``, or ``None``): one scale per leading index (per output channel of a weight
  [out, in]; per token of an activation [..., T, K]); ``scale`` is ``[..., 1]``; ``group_size = K``.
- an int ``g`` > 0 dividing K: one scale per ``g`` consecutive elements; ``scale`` is ``[..., K // g]``.
- an int ``g`` > 0 NOT dividing K, with ``pad=True``: ``ceil(K / g)`` groups, the last one shorter
  (``K - g * (ceil(K / g) - 1)`` wide; e.g. 576 = 4 x 128 + 64), as the GPTQ reference and gptqmodel do.
  ``scale`` is ``[..., ceil(K / g)]``; the last group's range comes from its real columns only.
  Without ``pad`` a non-dividing ``g`` raises. ``QParams.in_features`` records K so codes can be
  dequantized; ``group_index`` / ``expand_qparams`` give the per-column scale and zero a kernel needs.

Observers choose the clipping range of each group: ``"minmax"``; ``"percentile"`` (nearest-rank ``p``-th
percentile, default 99.99, of ``|x|`` for symmetric, of both tails for asymmetric); ``"mse"`` (GPTQ's
grid search: shrink the min-max range by ratios ``linspace(1, 1 - maxshrink, steps)`` (default 1 .. 0.5 in
100 steps) and keep, per group, the ratio minimising ``sum |x - qdq(x)|**norm`` with ``norm = 2.4`` by
default, GPTQ's choice; ``norm=2`` gives the plain MSE). All three are vectorised over groups.

Fake-quant is for ACCURACY only: speed and memory figures must come from packed weights on real kernels
(``qlib.quant.kernels``), never from these functions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

Granularity = str | int | None

MIN_BITS, MAX_BITS = 2, 8
OBSERVERS = ("minmax", "percentile", "mse")
_OBSERVER_KW = {"minmax": set(), "percentile": {"p"}, "mse": {"steps", "maxshrink", "norm"}}


@dataclass(frozen=True)
class QParams:
    """Affine quantization parameters: ``dequant = (q - zero) * scale`` per group of the last dim."""

    scale: Tensor  # float32: 0-dim ("tensor") or [..., ceil(K / group_size)]
    zero: Tensor  # float32 holding integers, same shape as scale
    bits: int
    symmetric: bool
    group_size: int  # -1 per-tensor; K per-channel; g per-group
    in_features: int | None = None  # K the params were computed for; needed for a shorter last group, None per-tensor

    @property
    def qmax(self) -> int:
        """Largest integer code, ``2**bits - 1``."""
        return 2**self.bits - 1

    def to(self, device: torch.device | str) -> QParams:
        """The same parameters on another device."""
        return QParams(self.scale.to(device), self.zero.to(device), self.bits, self.symmetric, self.group_size,
                       self.in_features)


# --------------------------------------------------------------------------------------------------
# validation and group views


def check_bits(bits: int) -> None:
    """Raise ValueError unless ``bits`` is an int in 2..8."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits!r} is outside the supported range {MIN_BITS}..{MAX_BITS}; pick an integer from {MIN_BITS} to {MAX_BITS}")


def check_finite(x: Tensor, name: str = "x") -> None:
    """Raise ValueError if ``x`` holds NaN or Inf."""
    if x.numel() == 0 or not x.is_floating_point():
        return
    lo, hi = torch.aminmax(x.detach())  # NaN and +-Inf propagate; ~5x faster than isfinite(x).all() on CPU
    if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} has {n_bad} non-finite values (NaN or Inf); fix or mask them before quantizing")


def group_size_for(x: Tensor, granularity: Granularity, pad: bool = False) -> int:
    """``QParams.group_size`` for ``granularity`` on ``x``: -1 per-tensor, K per-channel, g per-group.

    ``pad=True`` accepts a group size that does not divide K (a shorter last group); else that raises.
    """
    if x.dim() == 0:
        raise ValueError("cannot quantize a 0-dim tensor; pass a tensor with at least one dimension")
    k = x.shape[-1]
    if granularity is None or granularity in ("channel", "token"):
        return k
    if granularity == "tensor" or (isinstance(granularity, int) and not isinstance(granularity, bool) and granularity == -1):
        return -1
    if isinstance(granularity, int) and not isinstance(granularity, bool) and granularity > 0:
        if k % granularity != 0 and not pad:
            raise ValueError(f"group size {granularity} does not divide the input dimension {k}; "
                             f"pick a divisor such as {_divisor_hint(k, granularity)}, "
                             "or pass pad=True for a shorter last group (as the GPTQ reference does)")
        return granularity
    raise ValueError(f"unknown granularity {granularity!r}; use 'tensor', 'channel' (or 'token'), or a positive group size")


def _divisor_hint(k: int, g: int) -> str:
    """Nearby group sizes that divide ``k``: the largest power of two below ``g`` and the next multiple of 32 above."""
    below = [d for d in (2**i for i in range(1, 12)) if d < g and k % d == 0]
    above = [d for d in range(32 * (g // 32 + 1), k + 1, 32) if k % d == 0]
    picks = ([str(below[-1])] if below else []) + ([str(above[0])] if above else [])
    return " or ".join(picks) if picks else f"{k} (per-channel)"


def _groups(x: Tensor, group_size: int) -> Tensor:
    """View ``x`` as [n_groups, g] rows (float32): one row per quantization group."""
    x = x.float()
    return x.reshape(1, -1) if group_size == -1 else x.reshape(-1, group_size)


def _scale_shape(x: Tensor, group_size: int) -> tuple[int, ...]:
    """Shape of ``scale`` for ``x`` at ``group_size``: ``[..., ceil(K / g)]`` (0-dim per-tensor)."""
    return () if group_size == -1 else (*x.shape[:-1], -(-x.shape[-1] // group_size))


def group_index(k: int, group_size: int) -> Tensor:
    """Group of each of ``k`` columns, ``arange(k) // group_size`` (int64 [k]); a shorter last group gets the last index.

    ``group_size`` is ``QParams.group_size``: -1 (per-tensor) and ``k`` (per-channel) map every column to group 0.
    """
    if k < 1 or group_size == 0 or group_size < -1:
        raise ValueError(f"group_index needs k >= 1 and group_size -1 or > 0 (got k={k}, group_size={group_size})")
    return torch.arange(k) // (k if group_size == -1 else group_size)


def expand_qparams(qp: QParams, k: int) -> tuple[Tensor, Tensor]:
    """Per-column ``(scale, zero)``, each ``[..., k]`` (``[k]`` per-tensor), for a tensor whose last dim is ``k``.

    Column ``j`` gets its group's values (``scale[..., group_index(k, g)[j]]``), so a shorter last group needs
    no special case; a kernel that zero-pads K to a multiple of ``g`` can instead use ``qp.scale`` as is.
    """
    if qp.group_size == -1:
        return qp.scale.expand(k), qp.zero.expand(k)
    if qp.in_features not in (None, k) or qp.scale.dim() == 0 or qp.scale.shape[-1] != -(-k // qp.group_size):
        raise ValueError(f"QParams with scale {tuple(qp.scale.shape)}, group size {qp.group_size} and in_features "
                         f"{qp.in_features} do not fit an input dimension of {k}; pass the K they were computed for")
    idx = group_index(k, qp.group_size).to(qp.scale.device)
    return qp.scale.index_select(-1, idx), qp.zero.index_select(-1, idx)


def _expand(t: Tensor, qp: QParams) -> Tensor:
    """``scale``/``zero`` broadcast to the [..., G, g] view of ``x`` (or a 0-dim tensor per-tensor)."""
    return t if qp.group_size == -1 else t.unsqueeze(-1)


def _view(x: Tensor, qp: QParams) -> Tensor:
    """``x`` as float32 [..., G, g] (zero-padded when the last group is shorter; unchanged shape per-tensor)."""
    if qp.group_size == -1:
        if qp.scale.dim() != 0:
            raise ValueError(f"per-tensor QParams need a 0-dim scale, got shape {tuple(qp.scale.shape)}")
        return x.float()
    k = x.shape[-1] if x.dim() else 0
    if qp.in_features is not None and k != qp.in_features:
        raise ValueError(f"QParams were computed for an input dimension of {qp.in_features} but the tensor has shape "
                         f"{tuple(x.shape)}; use QParams computed from a tensor of the same shape")
    if x.dim() == 0 or (qp.in_features is None and k % qp.group_size != 0):
        raise ValueError(f"tensor of shape {tuple(x.shape)} does not split into groups of {qp.group_size} along its last dim; "
                         "use QParams computed from a tensor of the same shape")
    want = _scale_shape(x, qp.group_size)
    if tuple(qp.scale.shape) != want:
        raise ValueError(f"QParams scale has shape {tuple(qp.scale.shape)} but a tensor of shape {tuple(x.shape)} "
                         f"with group size {qp.group_size} needs {want}; use QParams computed from a tensor of the same shape")
    xf, n = x.float(), want[-1]
    if n * qp.group_size != k:  # shorter last group: pad with zeros, sliced off again by _unview
        xf = torch.nn.functional.pad(xf, (0, n * qp.group_size - k))
    return xf.reshape(*x.shape[:-1], n, qp.group_size)


def _unview(t: Tensor, shape: torch.Size) -> Tensor:
    """Undo ``_view``: back to ``shape``, dropping the zero padding of a shorter last group."""
    if t.shape == shape:
        return t
    flat = t.reshape(*shape[:-1], -1)
    return flat if flat.shape[-1] == shape[-1] else flat[..., : shape[-1]].contiguous()


# --------------------------------------------------------------------------------------------------
# scale / zero from a clipping range


def _scale_zero(lo: Tensor, hi: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero per group from the clipping range: ``hi`` = amax if symmetric, else (lo, hi) with 0 inside."""
    qmax = 2**bits - 1
    if symmetric:
        scale = 2 * hi / qmax
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = (hi - lo) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).clamp_min(torch.finfo(torch.float32).tiny)
        zero = torch.round(-lo / scale).clamp(0, qmax) + 0.0  # + 0.0 turns -0.0 into 0.0
        return scale, zero
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).clamp_min(torch.finfo(torch.float32).tiny)
    return scale, zero


def _qdq_rows(xg: Tensor, scale: Tensor, zero: Tensor, qmax: int) -> Tensor:
    """Quant-dequant of [R, g] rows with per-row [R, 1] scale and zero."""
    q = torch.clamp(torch.round(xg / scale) + zero, 0, qmax)
    return (q - zero) * scale


def _minmax_range(xg: Tensor, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Per-row (lo, hi): (-amax, amax) if symmetric, else (min, max)."""
    if symmetric:
        amax = xg.abs().amax(dim=1)
        return -amax, amax
    return torch.aminmax(xg, dim=1)


def _kth(v: Tensor, frac: float) -> Tensor:
    """Nearest-rank ``frac`` quantile of each row of ``v`` (works on rows of any length, unlike torch.quantile)."""
    n = v.shape[1]
    k = min(max(int(math.ceil(frac * n)), 1), n)
    return v.kthvalue(k, dim=1).values


def _percentile_range(xg: Tensor, symmetric: bool, p: float = 99.99) -> tuple[Tensor, Tensor]:
    """Per-row (lo, hi) at the ``p``-th percentile: of |x| if symmetric, of both tails otherwise."""
    if not 0 < p <= 100:
        raise ValueError(f"percentile p={p!r} must lie in (0, 100]; 99.99 is a common choice")
    if symmetric:
        amax = _kth(xg.abs(), p / 100)
        return -amax, amax
    return -_kth(-xg, p / 100), _kth(xg, p / 100)


def _mse_range(xg: Tensor, bits: int, symmetric: bool, steps: int = 100, maxshrink: float = 0.5,
               norm: float = 2.4) -> tuple[Tensor, Tensor]:
    """Per-row (lo, hi): the min-max range shrunk by the ratio in [1 - maxshrink, 1] minimising sum |x - qdq(x)|**norm."""
    if steps < 1 or not 0 <= maxshrink < 1 or norm <= 0:
        raise ValueError(f"mse observer needs steps >= 1, 0 <= maxshrink < 1 and norm > 0 (got {steps}, {maxshrink}, {norm})")
    lo0, hi0 = _minmax_range(xg, symmetric)
    qmax = 2**bits - 1
    best = torch.full_like(lo0, math.inf)
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for r in torch.linspace(1.0, 1.0 - maxshrink, steps).tolist():
        lo, hi = lo0 * r, hi0 * r
        scale, zero = _scale_zero(lo, hi, bits, symmetric)
        err = (_qdq_rows(xg, scale[:, None], zero[:, None], qmax) - xg).abs_().pow_(norm).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    return best_lo, best_hi


# --------------------------------------------------------------------------------------------------
# public API


def _observe_rows(xg: Tensor, bits: int, symmetric: bool, observer: str, observer_kw: dict) -> tuple[Tensor, Tensor]:
    """Per-row (lo, hi) of [R, g] rows with the named observer."""
    if observer == "minmax":
        return _minmax_range(xg, symmetric)
    if observer == "percentile":
        return _percentile_range(xg, symmetric, **observer_kw)
    return _mse_range(xg, bits, symmetric, **observer_kw)


def observe_range(x: Tensor, bits: int = 8, symmetric: bool = True, granularity: Granularity = "channel",
                  observer: str = "minmax", *, pad: bool = False, name: str = "x",
                  **observer_kw) -> tuple[Tensor, Tensor]:
    """Clipping range (lo, hi) of each group of ``x``, shaped like its ``scale``; symmetric gives lo = -hi.

    With ``pad=True`` and a group size not dividing K, the shorter last group is observed on its own columns.
    """
    check_bits(bits)
    if observer not in OBSERVERS:
        raise ValueError(f"unknown observer {observer!r}; use one of {', '.join(OBSERVERS)}")
    extra = set(observer_kw) - _OBSERVER_KW[observer]
    if extra:
        raise ValueError(f"observer {observer!r} takes no options {sorted(extra)}; it accepts {sorted(_OBSERVER_KW[observer]) or 'none'}")
    gs = group_size_for(x, granularity, pad)
    x = x.detach()
    check_finite(x, name)
    if gs == -1 or x.shape[-1] % gs == 0:
        lo, hi = _observe_rows(_groups(x, gs), bits, symmetric, observer, observer_kw)
        shape = _scale_shape(x, gs)
        return lo.reshape(shape), hi.reshape(shape)
    full = x.shape[-1] - x.shape[-1] % gs  # full groups, then the shorter last group, each observed on real columns
    parts = [(x[..., :full], gs)] if full else []
    ranges = [_observe_rows(_groups(p, g), bits, symmetric, observer, observer_kw)
              for p, g in parts + [(x[..., full:], x.shape[-1] - full)]]
    lead = x.shape[:-1]
    lo = torch.cat([r[0].reshape(*lead, -1) for r in ranges], dim=-1)
    hi = torch.cat([r[1].reshape(*lead, -1) for r in ranges], dim=-1)
    return lo, hi


def qparams_from_range(lo: Tensor, hi: Tensor, bits: int, symmetric: bool, group_size: int,
                       in_features: int | None = None) -> QParams:
    """QParams from a clipping range (symmetric uses ``max(|lo|, |hi|)``); ``group_size``, ``in_features`` as in ``QParams``."""
    check_bits(bits)
    lo, hi = lo.float(), hi.float()
    if symmetric:
        hi = torch.maximum(lo.abs(), hi.abs())
    scale, zero = _scale_zero(lo, hi, bits, symmetric)
    return QParams(scale, zero, bits, symmetric, group_size, in_features)


def qparams(x: Tensor, bits: int = 8, symmetric: bool = True, granularity: Granularity = "channel",
            observer: str = "minmax", *, pad: bool = False, name: str = "x", **observer_kw) -> QParams:
    """Quantization parameters of ``x`` at ``bits`` for one granularity, with the given observer's clipping.

    ``pad=True`` allows a group size that does not divide K: ``ceil(K / g)`` groups, the last one shorter.
    """
    lo, hi = observe_range(x, bits, symmetric, granularity, observer, pad=pad, name=name, **observer_kw)
    gs = group_size_for(x, granularity, pad)
    return qparams_from_range(lo, hi, bits, symmetric, gs, None if gs == -1 else x.shape[-1])


def dynamic_act_qparams(x: Tensor, bits: int = 8, symmetric: bool = False, granularity: str = "tensor") -> QParams:
    """Min-max QParams of an activation at run time: per-tensor or per-token (one scale per row of the last dim)."""
    if granularity not in ("tensor", "token"):
        raise ValueError(f"activation granularity {granularity!r} is not supported; use 'tensor' or 'token'")
    return qparams(x, bits, symmetric, granularity, "minmax", name="activation")


def quantize(x: Tensor, qp: QParams) -> Tensor:
    """Unsigned integer codes of ``x`` (torch.uint8, same shape as ``x``)."""
    check_finite(x)
    xv = _view(x.detach(), qp)
    q = torch.clamp(torch.round(xv / _expand(qp.scale, qp)) + _expand(qp.zero, qp), 0, qp.qmax)
    return _unview(q.to(torch.uint8), x.shape)


def dequantize(q: Tensor, qp: QParams) -> Tensor:
    """Float32 values ``(q - zero) * scale`` of integer codes ``q``."""
    qv = _view(q, qp)
    return _unview((qv - _expand(qp.zero, qp)) * _expand(qp.scale, qp), q.shape)


def quant_dequant(x: Tensor, qp: QParams) -> Tensor:
    """``dequantize(quantize(x))`` without gradient, in ``x``'s dtype."""
    check_finite(x)
    with torch.no_grad():
        s, z = _expand(qp.scale, qp), _expand(qp.zero, qp)
        t = _view(x.detach(), qp) / s  # in-place from here: same values as dequantize(quantize(x)), fewer copies
        t.round_().add_(z).clamp_(0, qp.qmax).sub_(z).mul_(s)
        return _unview(t, x.shape).to(x.dtype)


def representable_range(x: Tensor, qp: QParams) -> tuple[Tensor, Tensor]:
    """Lowest and highest representable values ``(0 - zero) * scale`` and ``(qmax - zero) * scale`` for each element of ``x``."""
    xv = _view(x.detach(), qp)
    s, z = _expand(qp.scale, qp), _expand(qp.zero, qp)
    lo, hi = (-z * s).expand_as(xv), ((qp.qmax - z) * s).expand_as(xv)
    return _unview(lo, x.shape), _unview(hi, x.shape)


class _FakeQuantSTE(torch.autograd.Function):
    """Quant-dequant forward; straight-through backward masked to the representable range."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero: Tensor, bits: int, symmetric: bool, group_size: int,
                in_features: int | None) -> Tensor:
        qp = QParams(scale, zero, bits, symmetric, group_size, in_features)
        lo, hi = representable_range(x, qp)
        xf = x.detach().float()
        ctx.save_for_backward((xf >= lo) & (xf <= hi))
        return dequantize(quantize(x, qp), qp).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None, None, None, None, None, None


def fake_quant(x: Tensor, qp: QParams) -> Tensor:
    """Quant-dequant with a straight-through gradient: 1 where ``x`` is inside the representable range, 0 outside."""
    return _FakeQuantSTE.apply(x, qp.scale.detach(), qp.zero.detach(), qp.bits, qp.symmetric, qp.group_size,
                               qp.in_features)


def rtn(x: Tensor, bits: int = 4, symmetric: bool = True, granularity: Granularity = 128,
        observer: str = "minmax", *, pad: bool = False, **kw) -> Tensor:
    """Round-to-nearest quant-dequant of ``x`` in one call, in ``x``'s dtype (``pad=True``: shorter last group)."""
    return quant_dequant(x, qparams(x, bits, symmetric, granularity, observer, pad=pad, **kw))


def sqnr_db(x: Tensor, y: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum x^2 / sum (x - y)^2)`` in dB; inf when equal."""
    if x.shape != y.shape:
        raise ValueError(f"shapes differ ({tuple(x.shape)} vs {tuple(y.shape)}); compare tensors of the same shape")
    xd = x.detach().double()
    return db_ratio(xd.pow(2).sum().item(), (xd - y.detach().double().to(xd.device)).pow(2).sum().item())


def db_ratio(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)``, inf for zero noise and -inf for zero signal (SQNR from summed powers)."""
    if noise == 0.0:
        return math.inf
    return -math.inf if signal == 0.0 else 10.0 * math.log10(signal / noise)
