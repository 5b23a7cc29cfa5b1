"""Quantization-aware training (QAT): fake-quant modules with a straight-through estimator, and a small training loop.

    quantize_(model, QATConfig(weight_bits=4, weight_granularity="tensor", scales="lsq"), calib=batches)
    history = train(model, loss_of, batches, lr=2e-5, eval_fn=..., eval_at=[0, 50, 100])

What is quantized: the WEIGHT and the INPUT of every selected ``nn.Linear`` / ``nn.Conv2d`` (subclasses included,
e.g. EfficientNet's same-padding convs), the places a W8A8 / W4A8 integer kernel quantizes. Everything else stays
FP32 and keeps training: LayerNorm (its gain and bias are ordinary trainable parameters; its input and output are
not quantized), embeddings, softmax, GELU, residual additions. BatchNorm is not handled here: fold it into the
preceding convolution first (``qlib.methods.cnn.fold_bn``), so QAT trains the folded weights with the BN statistics frozen
(the "fold, then freeze BN" variant of Krishnamoorthi 2018; batch statistics are never re-estimated).

Both ways of getting the scales start from the PTQ parameters (min-max weights, activation ranges calibrated on
``calib``), so a freshly prepared model computes exactly what ``qlib.quant.api.quantize_(W8A8Config(act_mode="static"))``
computes (tested): QAT step 0 *is* PTQ.

- ``scales="lsq"``: LSQ (Esser et al. 2020). Each scale is a trainable parameter; its gradient goes through the
  rounding by the straight-through estimator and is multiplied by ``1 / sqrt(n * Qp)`` (n elements per scale, Qp the
  positive integer range), the paper's gradient scale. Zero-points are integers fixed at their PTQ value.
- ``scales="minmax"``: observed ranges. Weight scales are recomputed from the current weight at every call (min-max,
  as PTQ would); activation ranges follow an exponential moving average of each training batch's min and max
  (PyTorch's ``MovingAverageMinMaxObserver``, averaging constant ``act_momentum``) and are frozen in eval mode.

The gradient with respect to the quantized tensor is the straight-through estimator clipped to the representable
range: 1 where ``x`` lies inside ``[(0 - zero) * scale, (qmax - zero) * scale]``, 0 outside (as
``qlib.quant.primitives.fake_quant``). The forward value is bit-identical to ``qlib.quant.primitives.quant_dequant``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qlib.quant.api import calibrate_act_ranges, quantize_, register
from qlib.quant.config import FakeQuantConfig
from qlib.quant.modules import as_linear, set_module
from qlib.quant.primitives import qparams, qparams_from_range

SCALE_MODES = ("lsq", "minmax")


@dataclass(frozen=True)
class QATConfig(FakeQuantConfig):
    """What QAT fake-quantizes: weight bits/granularity/symmetry, activation bits (None: weight-only), how scales move."""

    scales: str = "lsq"  # "lsq" (learned) or "minmax" (observed)
    act_momentum: float = 0.01  # EMA averaging constant of the "minmax" activation observer

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scales not in SCALE_MODES:
            raise ValueError(f"scales={self.scales!r} is unknown; use 'lsq' (learned) or 'minmax' (observed)")
        if not 0 < self.act_momentum <= 1:
            raise ValueError(f"act_momentum={self.act_momentum!r} must lie in (0, 1]; 0.01 is PyTorch's default")

    @property
    def tag(self) -> str:
        """E.g. ``qat.w4t.a8.lsq``."""
        a = f".a{self.act_bits}" if self.act_bits else ""
        return f"qat.w{self.weight_bits}{self.weight_granularity[0]}{'' if self.weight_symmetric else 'asym'}{a}.{self.scales}"


# --------------------------------------------------------------------------------------------------
# the straight-through fake-quant function


def ste_fake_quant(x: Tensor, scale: Tensor, zero: Tensor, qmax: int, grad_scale: float = 1.0) -> Tensor:
    """``(clamp(round(x / scale) + zero, 0, qmax) - zero) * scale`` with STE gradients (LSQ's for ``scale``).

    d/dx is 1 inside the representable range and 0 outside; d/dscale is ``round(x/s) - x/s`` inside and
    ``q - zero`` (the clipped code) outside, times ``grad_scale``. ``scale``/``zero`` broadcast against ``x``.
    """
    if not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)):
        with torch.no_grad():  # evaluation: the quant-dequant alone, in place (same operations, same values)
            t = x / scale
            return t.round_().add_(zero).clamp_(0, qmax).sub_(zero).mul_(scale)
    s = scale if grad_scale == 1.0 else (scale - scale * grad_scale).detach() + scale * grad_scale
    xs = x / s
    with torch.no_grad():
        q = torch.clamp(torch.round(xs) + zero, 0, qmax)  # the same operations as primitives.quantize
        inside = (x >= -zero * s) & (x <= (qmax - zero) * s)  # primitives.representable_range
    x_in = torch.where(inside, x, x.detach())  # d/dx = 1 exactly inside, 0 outside
    xd_in = torch.where(inside, x.detach(), torch.zeros_like(xs))
    s_path = xd_in * (s.detach() / s) - xd_in  # value 0; d/ds = -x/s inside (LSQ's term; outside only q - zero)
    return (q - zero) * s + (x_in - x_in.detach()) + s_path


def lsq_grad_scale(n_per_scale: int, qmax: int, zero: float) -> float:
    """LSQ's scale-gradient factor ``1 / sqrt(n * Qp)``, Qp = largest positive integer step above the zero-point."""
    qp = max(qmax - zero, 1.0)
    return 1.0 / math.sqrt(max(n_per_scale, 1) * qp)


class WeightFakeQuant(nn.Module):
    """Fake-quantizes a weight [out, ...] per tensor or per output channel; learned (LSQ) or min-max scales."""

    def __init__(self, weight: Tensor, bits: int, symmetric: bool, granularity: str, scales: str) -> None:
        super().__init__()
        self.bits, self.symmetric, self.granularity, self.scales = bits, symmetric, granularity, scales
        self.qmax = 2**bits - 1
        qp = qparams(weight.detach().reshape(weight.shape[0], -1), bits, symmetric, granularity, name="weight")
        self.register_buffer("zero", qp.zero.clone())
        if scales == "lsq":
            self.scale = nn.Parameter(qp.scale.clone())
            n = weight.numel() if granularity == "tensor" else weight[0].numel()
            self.grad_scale = lsq_grad_scale(n, self.qmax, float(qp.zero.flatten()[0]))

    def forward(self, w: Tensor) -> Tensor:
        w2 = w.reshape(w.shape[0], -1)  # per channel: scale [out, 1]; per tensor: a 0-dim scale
        if self.scales == "lsq":
            out = ste_fake_quant(w2, self.scale.clamp_min(1e-12), self.zero, self.qmax, self.grad_scale)
        else:
            qp = qparams(w2.detach(), self.bits, self.symmetric, self.granularity, name="weight")
            out = ste_fake_quant(w2, qp.scale, qp.zero, self.qmax)
        return out.reshape(w.shape)

    def extra_repr(self) -> str:
        return f"w{self.bits}{'sym' if self.symmetric else 'asym'}/{self.granularity}/{self.scales}"


class ActFakeQuant(nn.Module):
    """Fake-quantizes an activation per tensor from a calibrated range; learned (LSQ) or EMA min-max scale."""

    def __init__(self, lo: Tensor, hi: Tensor, bits: int, symmetric: bool, scales: str, momentum: float = 0.01) -> None:
        super().__init__()
        self.bits, self.symmetric, self.scales, self.momentum = bits, symmetric, scales, momentum
        self.qmax = 2**bits - 1
        qp = qparams_from_range(lo, hi, bits, symmetric, -1)
        self.register_buffer("zero", qp.zero.clone())
        if scales == "lsq":
            self.scale = nn.Parameter(qp.scale.clone())
        else:
            self.register_buffer("lo", lo.detach().float().clone())
            self.register_buffer("hi", hi.detach().float().clone())

    def forward(self, x: Tensor) -> Tensor:
        if self.scales == "lsq":
            g = lsq_grad_scale(x.numel(), self.qmax, float(self.zero))
            return ste_fake_quant(x, self.scale.clamp_min(1e-12), self.zero, self.qmax, g)
        if self.training:  # moving-average min-max, as PyTorch's MovingAverageMinMaxObserver
            with torch.no_grad():
                lo, hi = torch.aminmax(x.detach().float())
                if self.symmetric:
                    hi = torch.maximum(lo.abs(), hi.abs())
                    lo = -hi
                self.lo.add_(self.momentum * (lo - self.lo))
                self.hi.add_(self.momentum * (hi - self.hi))
        qp = qparams_from_range(self.lo, self.hi, self.bits, self.symmetric, -1)
        return ste_fake_quant(x, qp.scale, qp.zero, self.qmax)

    def extra_repr(self) -> str:
        return f"a{self.bits}{'sym' if self.symmetric else 'asym'}/tensor/{self.scales}"


class QATModule(nn.Module):
    """A Linear or Conv2d whose weight and input pass through fake-quant; the wrapped module's own forward is used."""

    def __init__(self, module: nn.Module, weight_fq: WeightFakeQuant, act_fq: ActFakeQuant | None) -> None:
        super().__init__()
        self.module, self.weight_fq, self.act_fq = module, weight_fq, act_fq

    def forward(self, x: Tensor) -> Tensor:
        if self.act_fq is not None:
            x = self.act_fq(x)
        # functional_call keeps the module's own forward (e.g. TF "same" padding) with the fake-quantized weight
        return torch.func.functional_call(self.module, {"weight": self.weight_fq(self.module.weight)}, (x,))


# --------------------------------------------------------------------------------------------------
# preparing a model


def prepare_qat(model: nn.Module, config: QATConfig, calib: Iterable | None = None,
                filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """``quantize_(model, config, filter_fn, calib)``: wrap the selected layers (in place) in ``QATModule``s at their PTQ parameters."""
    if not isinstance(config, QATConfig):
        raise TypeError(f"config must be a qlib.methods.qat.QATConfig, got {type(config).__name__}")
    return quantize_(model, config, filter_fn, calib)


def wrap_fake_quant(model: nn.Module, config: FakeQuantConfig, fqns: list[str], calib: Iterable | None,
                    scales: str = "minmax", act_momentum: float = 0.01) -> nn.Module:
    """Wrap each layer in ``fqns`` (in place) in a ``QATModule`` initialised at its PTQ parameters.

    Activation ranges are calibrated (min-max, per tensor) on ``calib`` first: model inputs, as for ``quantize_``.
    """
    ranges = {}
    if config.act_bits is not None:
        if calib is None:
            raise ValueError("fake-quant with quantized activations needs calibration batches to start from: "
                             "pass calib=[batch, ...]")
        obs = calibrate_act_ranges(model, fqns, calib, config.act_bits, config.act_symmetric, progress=False)
        ranges = {f: (o.lo, o.hi) for f, o in obs.items()}
    for f in fqns:
        mod = as_linear(model.get_submodule(f))  # GPT-2's Conv1D as an nn.Linear: per-channel means per output row
        wfq = WeightFakeQuant(mod.weight, config.weight_bits, config.weight_symmetric, config.weight_granularity, scales)
        afq = None
        if config.act_bits is not None:
            afq = ActFakeQuant(*ranges[f], config.act_bits, config.act_symmetric, scales, act_momentum)
        set_module(model, f, QATModule(mod, wfq, afq).to(mod.weight.device))
    return model


@register(QATConfig)
def apply_qat(model: nn.Module, config: QATConfig, fqns: list[str], calib: Iterable | None = None) -> nn.Module:
    """``quantize_``'s QAT handler: the selected layers become ``QATModule``s (step 0 = PTQ), ready for ``train``."""
    return wrap_fake_quant(model, config, fqns, calib, config.scales, config.act_momentum)


def scale_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learned (LSQ) scales of a prepared model."""
    return [p for n, p in model.named_parameters() if n.endswith("_fq.scale")]


# --------------------------------------------------------------------------------------------------
# the training loop


def train(model: nn.Module, loss_of: Callable[[Any], Tensor], batches: Sequence, lr: float, *,
          scale_lr: float | None = None, weight_decay: float = 0.0, warmup: int = 0, seed: int = 0,
          eval_fn: Callable[[nn.Module], float] | None = None, eval_at: Iterable[int] = (),
          progress: bool = True, desc: str = "QAT") -> list[dict]:
    """AdamW over ``batches`` (one step each, linear warm-up then linear decay to 0), seeded; returns the history.

    ``scale_lr`` gives the learned (LSQ) scales their own learning rate (default: ``lr``); Adam's per-parameter
    normalisation makes LSQ's gradient scale matter less than under the paper's SGD, so a larger one helps them move.
    ``eval_fn(model) -> metric`` runs (in eval mode, not timed) before the steps listed in ``eval_at`` (0 = before
    training, ``len(batches)`` = after the last step). Each history row: step, metric, loss (mean since the previous
    row), train_s (cumulative training seconds, evaluation excluded).
    """
    steps = len(batches)
    if steps < 1:
        raise ValueError("no training batches; pass at least one")
    if lr <= 0:
        raise ValueError(f"lr={lr!r} must be positive")
    torch.manual_seed(seed)
    scales = {id(p) for p in scale_parameters(model)}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in scales]
    groups = [{"params": params}]
    if scales:
        groups.append({"params": [p for p in scale_parameters(model) if p.requires_grad], "lr": scale_lr or lr,
                       "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    warm = max(warmup, 0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / warm if i < warm else max(0.0, (steps - i) / max(1, steps - warm)))
    eval_at = sorted({int(s) for s in eval_at if 0 <= int(s) <= steps})
    history, losses, train_s = [], [], 0.0

    def record(step: int) -> None:
        metric = None
        if eval_fn is not None:
            model.eval()
            with torch.no_grad():
                metric = float(eval_fn(model))
        history.append({"step": step, "metric": metric, "loss": float(sum(losses) / len(losses)) if losses else None,
                        "train_s": train_s})
        losses.clear()

    with tqdm(total=steps, desc=desc, disable=not progress) as bar:
        for i, batch in enumerate(batches):
            if i in eval_at:
                record(i)
            model.train()
            t0 = time.perf_counter()
            loss = loss_of(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            train_s += time.perf_counter() - t0
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    if steps in eval_at:
        record(steps)
    model.eval()
    return history
