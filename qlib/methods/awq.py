"""AWQ: activation-aware weight quantization (Lin et al., MLSys 2024), after the llm-awq reference.

Two separate steps, as llm-awq's ``run_awq`` / ``apply_awq``:

1. ``awq_search(model, calib, config) -> AWQResult`` — a plain result (per-channel scales, per-group clip
   values, the search's losses) that can be saved, loaded and inspected. The model is left untouched: each
   block is searched on a copy. Block by block:

   a. run the block (``qlib.methods.calib``) with hooks that keep the input of every linear; its outputs are the next
      block's inputs. Like llm-awq, these are the FLOAT outputs of the unmodified block (scaling is
      output-preserving in float, and clipping is left out of the propagation), not quantized outputs.
   b. for each scale group of the architecture table (``qlib.methods.arch``: an op ``prev`` feeding ``linears``;
      ``inspect`` is the submodule whose output is scored): ``x_mean`` = mean ``|x|`` per input channel;
      for ``ratio`` in ``0, 1/n, ..., (n-1)/n``: ``s = clamp(x_mean ** ratio, 1e-4)``,
      ``s = s / sqrt(max(s) * min(s))``; each linear's weight becomes ``Q(W * s) / s`` (round to nearest at the
      config's bits / group / symmetry); score the MSE between the float output of ``inspect`` and the output
      with those weights; the weights are restored after every trial. Keep the best ratio's ``s``. The trials
      dominate the cost (20 grid points x every token through attention and MLP, per block), so the loss is
      computed with fewer FLOPs where that is exact in real arithmetic: a scored MLP runs once on all tokens;
      batches with the same kwargs are stacked for attention; a group scored on its linears' own outputs
      (``up_proj -> down_proj``) uses ``|X dW^T|^2 = sum((dW @ X^T X) * dW)`` with ``X^T X`` formed once, when the
      calibration set has more tokens than the layer has inputs. The losses match the plain per-batch forward to
      float rounding (~1e-7 relative).
      Every group of a block is searched on the unscaled block, then all are applied at once (llm-awq's
      ``auto_scale_block`` + ``apply_scale``); folding is exact in float, so the order changes only rounding.
   c. apply the scales to the block copy: fold ``1 / s`` into ``prev`` (a norm's weight and bias, or the output
      rows of a previous linear) and multiply the linears' input columns by ``s``; the kept inputs are divided
      by ``s`` for the clip search.
   d. clip search (llm-awq's ``auto_clip``): for each linear except the query/key projections (``q @ k.T``
      makes their error hard to score, llm-awq skips them), per output row and group, the clip value
      ``max|w| * (1 - i / clip_grid)`` for ``i < max_shrink * clip_grid`` minimising the MSE of that group's
      partial outputs on a token subsample (every ``n_tokens // n_clip_tokens``-th token). Weights are then
      clamped to ``[-max_val, max_val]`` (symmetric, as llm-awq, even for asymmetric quantization).

2. ``awq_apply(model, result, config)`` on a fresh float model: fold the scales, clamp the clips, then round to
   nearest; weights become fake-quant values (accuracy) and ``model.qlib_awq_codes`` keeps ``{fqn: (codes,
   QParams)}`` for ``qlib.quant.kernels.pack_quantized`` (K zero-padded to a multiple of the group).

``quantize_(model, AWQConfig(...), calib=batches)`` is search + apply. Differences from llm-awq: the round-to-
nearest quantizer is ``qlib.quant.primitives`` (its asymmetric range always contains 0; llm-awq's does not); a group
size that does not divide K gets a shorter last group (``pad=True``). Folding needs ``prev`` to be a norm or a
linear: nothing is folded across GELU/SiLU (not positive-homogeneous); post-LN BERT keeps only v -> output.
Gemma's RMSNorm scales by ``(1 + w)``: the table's ``norm_weight_offset`` makes the fold ``(1 + w) / s - 1``.
"""
from __future__ import annotations

import copy
import inspect as pyinspect
import json
import math
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from qlib.methods.arch import (ArchSpec, ScaleGroup, arch_of, block_linears, blocks_path, get_blocks, linear_weight,
                               scale_groups_for, set_linear_weight)
from qlib.methods.calib import block_output, capture_block_inputs, capture_block_kwargs
from qlib.quant.api import apply_rtn, register
from qlib.quant.config import RTNConfig, WeightOnlyConfig, check_flags, check_int
from qlib.quant.primitives import QParams, dequantize, group_size_for, qparams, qparams_from_range, quantize

FilterFn = Callable[[nn.Module, str], bool]

NO_CLIP = ("q_proj", "k_proj", "query", "key", "q_lin", "k_lin", "Wqkv", "c_attn", "qkv_proj",
           "query_key_value")  # llm-awq skips q/k (fused qkv too) in auto_clip
SCALE_FLOOR = 1e-4  # llm-awq's clamp of x_mean ** ratio
CLIP_ROW_CHUNK = 256  # output rows per clip-search chunk (bounds memory: rows x tokens x K)
STACK_TOKENS = 4096  # tokens per stacked call when scoring attention (fewer, larger matmuls; same rows)
RESULT_FILES = ("awq.safetensors", "awq.json")


# --------------------------------------------------------------------------------------------------
# the config and the result: scales and clips, saved apart from the model


@dataclass(frozen=True)
class AWQConfig(WeightOnlyConfig):
    """AWQ (Lin et al. 2023) weight-only quantization of the linears inside transformer blocks; needs ``calib``.

    ``n_grid`` scale ratios in [0, 1); ``clip`` searches a clip value per output row and group over
    ``int(max_shrink * clip_grid)`` shrink steps on ``n_clip_tokens`` tokens (llm-awq's defaults throughout).
    The quantizer is min-max (``observer`` stays ``"minmax"``); per-tensor grids are not supported.
    """

    symmetric: bool = False  # AWQ's default: zero-point quantization
    pad: bool = True  # group size not dividing K: a shorter last group
    n_grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    n_clip_tokens: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size == -1:
            raise ValueError("AWQ quantizes per group or per channel, not per tensor; use group_size=128 or None")
        if self.observer != "minmax":
            raise ValueError(f"observer={self.observer!r} is not supported: AWQ's search and apply use min-max ranges; "
                             "leave observer='minmax'")
        check_flags(self, "clip")
        check_int(self.n_grid, "n_grid", 1, "20 is llm-awq's grid (1 gives ratio 0 only: plain RTN)")
        check_int(self.clip_grid, "clip_grid", 1, "20 is llm-awq's grid")
        check_int(self.n_clip_tokens, "n_clip_tokens", 1, "512 is llm-awq's choice")
        if isinstance(self.max_shrink, bool) or not isinstance(self.max_shrink, (int, float)) or not 0 <= self.max_shrink < 1:
            raise ValueError(f"max_shrink={self.max_shrink!r} must lie in [0, 1); 0.5 is llm-awq's choice")

    @property
    def tag(self) -> str:
        """E.g. ``awq.w4.g128.asym`` (``.noclip`` without the clip search)."""
        return f"{self.grid_tag('awq')}{'' if self.clip else '.noclip'}"


@dataclass(frozen=True, eq=False)
class AWQGroupScale:
    """The scale found for one scale group: ``prev``'s output channels are divided by ``scale``, ``linears``' inputs multiplied.

    ``best_ratio`` is the chosen exponent of ``s = mean|x| ** ratio``; ``losses`` the search's loss per grid ratio
    (``loss_ratio0``: plain RTN, ``loss_best``: the chosen one).
    """

    prev: str
    linears: tuple[str, ...]
    scale: Tensor
    best_ratio: float
    loss_best: float
    loss_ratio0: float
    losses: tuple[float, ...]

    def record(self) -> dict[str, Any]:
        """Everything but the scale, as JSON values (what ``awq.json`` keeps under ``scale_groups``)."""
        return {"linears": list(self.linears), "best_ratio": self.best_ratio, "loss_best": self.loss_best,
                "loss_ratio0": self.loss_ratio0, "losses": list(self.losses)}


@dataclass
class AWQResult:
    """What the search found: ``groups`` (one ``AWQGroupScale`` per scale group, in search order), ``clips``
    ``{linear fqn: max_val [out, groups]}``, ``meta`` (config, data, timing)."""

    groups: list[AWQGroupScale]
    clips: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def scales(self) -> dict[str, Tensor]:
        """``{prev fqn: s [C]}`` of every group."""
        return {g.prev: g.scale for g in self.groups}

    def save(self, path: str | Path) -> Path:
        """Write ``awq.safetensors`` (tensors) and ``awq.json`` (meta and group records) into folder ``path``, atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {f"scales/{g.prev}": g.scale.detach().cpu().float().contiguous() for g in self.groups}
        tensors.update({f"clips/{k}": v.detach().cpu().float().contiguous() for k, v in self.clips.items()})
        st, js = (path / name for name in RESULT_FILES)
        st_tmp, js_tmp = (p.with_name(p.name + ".tmp") for p in (st, js))
        save_file(tensors, str(st_tmp))
        meta = {**self.meta, "scale_groups": {g.prev: g.record() for g in self.groups}}
        js_tmp.write_text(json.dumps(meta, indent=1, default=str))
        os.replace(st_tmp, st)
        os.replace(js_tmp, js)
        return path

    @classmethod
    def load(cls, path: str | Path) -> AWQResult:
        """Read a result written by ``save`` (safetensors: no unpickling)."""
        from safetensors.torch import load_file

        st, js = (Path(path) / name for name in RESULT_FILES)
        if not (st.is_file() and js.is_file()):
            raise FileNotFoundError(f"{path} does not hold {' and '.join(RESULT_FILES)}; pass a folder written by AWQResult.save")
        tensors = load_file(str(st))
        meta = json.loads(js.read_text())
        records = meta.pop("scale_groups", {})
        missing = [k for k in records if f"scales/{k}" not in tensors]
        if missing:
            raise ValueError(f"{path}: scale groups {missing[:3]} have no scale tensor; the folder is incomplete, search again")
        groups = [AWQGroupScale(k, tuple(r["linears"]), tensors[f"scales/{k}"], r["best_ratio"], r["loss_best"],
                                r["loss_ratio0"], tuple(r["losses"])) for k, r in records.items()]
        clips = {k.removeprefix("clips/"): v for k, v in tensors.items() if k.startswith("clips/")}
        return cls(groups, clips, meta)


# --------------------------------------------------------------------------------------------------
# quantizer, folding, clamping: the pieces search and apply share


def _group_width(k: int, config: AWQConfig) -> int:
    """Columns per quantization group for an input dimension ``k`` (``k`` per-channel)."""
    return k if config.group_size is None else config.group_size


def _qdq_groups(wg: Tensor, config: AWQConfig) -> Tensor:
    """Min-max round-to-nearest quant-dequant of each row of ``wg`` [..., G, g] (zero-padded groups allowed).

    The search's quantizer, run thousands of times: ``qlib.quant.primitives``' rule (``qparams_from_range``, then
    ``quant_dequant``'s operations in the same order) without its per-call validation, so it is bit-identical
    to ``quant_dequant(w, qparams(w, ..., pad=True))``; zero padding changes no range, as ranges contain 0.
    """
    if config.symmetric:
        hi = wg.abs().amax(dim=-1)
        lo = -hi
    else:
        lo, hi = torch.aminmax(wg, dim=-1)
    qp = qparams_from_range(lo, hi, config.bits, config.symmetric, wg.shape[-1])
    s, z = qp.scale.unsqueeze(-1), qp.zero.unsqueeze(-1)
    return (wg.float() / s).round_().add_(z).clamp_(0, qp.qmax).sub_(z).mul_(s).to(wg.dtype)


def rtn_qdq(w: Tensor, config: AWQConfig) -> Tensor:
    """Round-to-nearest quant-dequant of an [out, in] weight at the config's bits / group / symmetry."""
    k = w.shape[1]
    g = _group_width(k, config)
    n_groups = -(-k // g)
    wg = F.pad(w, (0, n_groups * g - k)).reshape(w.shape[0], n_groups, g)
    return _qdq_groups(wg, config).reshape(w.shape[0], -1)[:, :k]


def weight_codes(w: Tensor, config: AWQConfig) -> tuple[Tensor, QParams]:
    """Codes and QParams of an [out, in] weight, K zero-padded to a multiple of the group (``pack_quantized``'s layout).

    Zero columns change no min-max range (ranges contain 0), so this equals ``pad=True``'s shorter last group.
    """
    w = w.detach().float()
    g = _group_width(w.shape[1], config)
    w = F.pad(w, (0, -(-w.shape[1] // g) * g - w.shape[1]))
    qp = qparams(w, config.bits, config.symmetric, config.granularity, name="weight")
    return quantize(w, qp), qp


def scale_candidates(x_mean: Tensor, n_grid: int) -> list[tuple[float, Tensor]]:
    """``(ratio, s)`` for ``ratio = i / n_grid``: ``s = clamp(x_mean ** ratio, 1e-4)``, normalised by ``sqrt(max * min)``."""
    out = []
    for i in range(n_grid):
        ratio = i / n_grid
        s = x_mean.float().pow(ratio).clamp(min=SCALE_FLOOR)
        out.append((ratio, s / (s.max() * s.min()).sqrt()))
    return out


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: list[nn.Module], s: Tensor, spec: ArchSpec) -> None:
    """``prev``'s output channels / ``s``, the linears' input columns * ``s``: the float function is unchanged.

    ``prev`` is a norm (1-D weight: ``(offset + w) / s - offset``, bias / s) or a linear (output rows / s).
    """
    w_prev = getattr(prev, "weight", None)
    if not isinstance(w_prev, Tensor):
        raise ValueError(f"cannot fold AWQ scales into {type(prev).__name__}: it has no weight (a norm without affine "
                         "parameters or an activation); drop this scale group from the qlib.methods.arch table")
    if w_prev.dim() == 2:  # a linear: scale its output rows
        linear_weight(prev, spec).div_(s.view(-1, 1).to(w_prev.dtype))
    elif w_prev.dim() == 1:
        off = spec.norm_weight_offset
        w_prev.copy_(((off + w_prev.float()) / s - off).to(w_prev.dtype))
    else:
        raise ValueError(f"cannot fold AWQ scales into {type(prev).__name__} with a {w_prev.dim()}-D weight; "
                         "prev must be a norm or a linear")
    bias = getattr(prev, "bias", None)
    if isinstance(bias, Tensor):
        bias.div_(s.to(bias.dtype))
    for lin in linears:
        linear_weight(lin, spec).mul_(s.view(1, -1).to(lin.weight.dtype))


def _expand_groups(t: Tensor, k: int, g: int) -> Tensor:
    """Per-group values [out, G] repeated to per-column [out, k] (a shorter last group just gets cut)."""
    return t.repeat_interleave(g, dim=1)[:, :k]


@torch.no_grad()
def clamp_weight(lin: nn.Module, max_val: Tensor, spec: ArchSpec, group_size: int | None) -> None:
    """Clamp a linear's [out, in] weight to ``[-max_val, max_val]`` per output row and group (llm-awq's ``apply_clip``).

    ``max_val`` is [out, ceil(in / group_size)]; ``group_size=None`` is per-channel (one column of ``max_val``).
    """
    w = linear_weight(lin, spec)
    k = w.shape[1]
    g = k if group_size is None else group_size
    if tuple(max_val.shape) != (w.shape[0], -(-k // g)):
        raise ValueError(f"clip values of shape {tuple(max_val.shape)} do not fit a [{w.shape[0]}, {k}] weight with "
                         f"group size {g}; apply them with the config they were searched with")
    mv = _expand_groups(max_val.to(w.dtype), k, g)
    w.copy_(torch.maximum(torch.minimum(w, mv), -mv))


# --------------------------------------------------------------------------------------------------
# search


def _flatten(xs: list[Tensor]) -> Tensor:
    """Per-batch [..., C] tensors as one [n_tokens, C] float32 tensor."""
    return torch.cat([x.reshape(-1, x.shape[-1]).float() for x in xs])


def act_mean(xs: list[Tensor]) -> Tensor:
    """Mean ``|x|`` per input channel over every token of every batch (llm-awq's ``get_act_scale``)."""
    total, n = None, 0
    for x in xs:
        a = x.reshape(-1, x.shape[-1]).abs().float()
        total = a.sum(0) if total is None else total + a.sum(0)
        n += a.shape[0]
    return total / n


def accepted_kwargs(module: nn.Module, kwargs: dict) -> dict:
    """The block kwargs ``module.forward`` accepts (all of them if it takes ``**kwargs``)."""
    params = pyinspect.signature(module.forward).parameters
    if any(p.kind == pyinspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _group_forward(block: nn.Module, group: ScaleGroup, x: Tensor, kwargs: dict) -> Tensor:
    """Output that scores a scale group: the ``inspect`` submodule's, or the linears' own (concatenated)."""
    if group.inspect:
        mod = block.get_submodule(group.inspect)
        return block_output(mod(x, **accepted_kwargs(mod, kwargs)))
    return torch.cat([block.get_submodule(n)(x) for n in group.linears], dim=-1)


def _same(a: Any, b: Any) -> bool:
    """True if two block arguments are equal (tensors by shape, dtype and value; containers walked)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype
                and torch.equal(a, b))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or (isinstance(a, (bool, int, float, str)) and a == b)


def _group_calls(block: nn.Module, group: ScaleGroup, xs: list[Tensor], kwargs_list: list[dict]) -> list[tuple[Tensor, dict]]:
    """``(input, kwargs)`` calls that score a group.

    Linears, or a module that takes no block kwargs (an MLP), are token-wise: one call on all tokens. Else batches are
    stacked, ``STACK_TOKENS`` at a time, when they have the same shape and the same kwargs (the usual case:
    unpadded windows of one length share mask and rotary tables), else one call per batch. Stacking changes
    how many matmuls run, not what each row computes.
    """
    mod = block.get_submodule(group.inspect) if group.inspect else None
    if mod is None or not any(accepted_kwargs(mod, kw) for kw in kwargs_list):
        return [(_flatten(xs).to(xs[0].dtype), {})]
    shape, kw0 = xs[0].shape, kwargs_list[0]
    if xs[0].dim() < 2 or shape[0] != 1 or any(x.shape != shape for x in xs) or not all(_same(kw, kw0) for kw in kwargs_list):
        return list(zip(xs, kwargs_list))
    per_call = max(1, STACK_TOKENS // shape[1])
    return [(torch.cat(xs[i : i + per_call]), kw0) for i in range(0, len(xs), per_call)]


def _output_loss(block: nn.Module, group: ScaleGroup, xs: list[Tensor], kwargs_list: list[dict],
                 mods: dict[str, nn.Module], spec: ArchSpec) -> Callable[[dict[str, Tensor]], float]:
    """``loss(weights)``: MSE of the scored output (``inspect`` module's, else the linears' own, concatenated) with
    ``weights`` ({name: [out, in]}) put into ``mods``, against the float output; the weights are put back after."""
    calls = _group_calls(block, group, xs, kwargs_list)
    org = [_group_forward(block, group, x, kw) for x, kw in calls]
    numel = sum(o.numel() for o in org)
    saved = {n: linear_weight(m, spec).detach().clone() for n, m in mods.items()}

    def loss(weights: dict[str, Tensor]) -> float:
        try:
            for n, w in weights.items():
                set_linear_weight(mods[n], w, spec)
            return sum((o - _group_forward(block, group, x, kw)).float().pow_(2).sum().item()
                       for o, (x, kw) in zip(org, calls)) / numel
        finally:
            for n, m in mods.items():
                set_linear_weight(m, saved[n], spec)
    return loss


def gram_pays(block: nn.Module, group: ScaleGroup, xs: list[Tensor], spec: ArchSpec, n_grid: int) -> bool:
    """True for a group scored on its linears' own outputs when the Gram route costs fewer multiply-adds.

    Per trial: ``n * k * out`` through the linears, ``out * k * k`` with the Gram matrix (plus ``n * k * k`` once,
    shared by the ``n_grid`` trials); the Gram route wins once the calibration set has more tokens than ~``k``.
    """
    if group.inspect:
        return False
    n = sum(x.numel() // x.shape[-1] for x in xs)
    k = xs[0].shape[-1]
    out = sum(linear_weight(block.get_submodule(name), spec).shape[0] for name in group.linears)
    return n * k * out > out * k * k + n * k * k / n_grid


def _gram_loss(block: nn.Module, group: ScaleGroup, xs: list[Tensor], mods: dict[str, nn.Module],
               spec: ArchSpec) -> Callable[[dict[str, Tensor]], float]:
    """``loss(weights)``: MSE of the group's linears' own outputs, from the Gram matrix of their shared input.

    ``sum_t |x_t (W - W')^T|^2 = sum((dW @ X^T X) * dW)``: the same loss in real arithmetic, but one
    [out, K] x [K, K] product per trial instead of an [n_tokens, K] x [K, out] one (n_tokens >> K).
    """
    x = _flatten(xs)
    gram = x.T @ x  # [K, K], once per group
    numel = x.shape[0] * sum(linear_weight(block.get_submodule(n), spec).shape[0] for n in group.linears)
    ref = {n: linear_weight(m, spec).detach().float() for n, m in mods.items()}

    def loss(weights: dict[str, Tensor]) -> float:
        total = 0.0
        for n, w in weights.items():
            dw = w.float() - ref[n]
            total += (dw @ gram).mul_(dw).sum().item()
        return total / numel
    return loss


@torch.no_grad()
def search_group_scale(block: nn.Module, group: ScaleGroup, xs: list[Tensor], kwargs_list: list[dict],
                       spec: ArchSpec, config: AWQConfig, quantized: list[str]) -> tuple[Tensor, dict]:
    """Best ``s`` for one scale group and the search record (ratios, losses, best ratio, loss at ratio 0).

    Only the linears in ``quantized`` are quantized in the trials; the block is left as it was. A group scored
    on an ``inspect`` module runs that module per trial; a group scored on its linears' own outputs uses the
    Gram matrix of their input when that is cheaper (``_gram_loss``: same loss, a fraction of the matmuls).
    """
    mods = {n: block.get_submodule(n) for n in quantized}
    loss_of = (_gram_loss(block, group, xs, mods, spec) if gram_pays(block, group, xs, spec, config.n_grid)
               else _output_loss(block, group, xs, kwargs_list, mods, spec))
    weights = {n: linear_weight(m, spec).detach().float() for n, m in mods.items()}
    x_mean = act_mean(xs)
    losses, best = [], (math.inf, None, None)
    for ratio, s in scale_candidates(x_mean, config.n_grid):
        row = s.view(1, -1)
        loss = loss_of({n: rtn_qdq(w * row, config) / row for n, w in weights.items()})
        losses.append(loss)
        if loss < best[0]:
            best = (loss, ratio, s)
    if best[2] is None:
        raise RuntimeError(f"AWQ scale search for {group.linears} found no finite loss (losses {losses}); "
                           "check the calibration data and weights for NaN/Inf")
    record = {"best_ratio": best[1], "loss_best": best[0], "loss_ratio0": losses[0], "losses": losses}
    return best[2], record


@torch.no_grad()
def search_clip(w: Tensor, x: Tensor, config: AWQConfig) -> Tensor:
    """Clip value per output row and group, ``max_val`` [out, G], minimising each group's partial-output MSE on ``x``.

    ``w`` is [out, in], ``x`` [n_tokens, in] (already subsampled); llm-awq's ``auto_clip_layer``.
    """
    w, x = w.detach().float(), x.float()
    k = w.shape[1]
    g = _group_width(k, config)
    n_groups = -(-k // g)
    pad = n_groups * g - k
    xg = F.pad(x, (0, pad)).reshape(-1, n_groups, g).transpose(0, 1)  # [G, n, g]
    best_all = []
    for r0 in range(0, w.shape[0], CLIP_ROW_CHUNK):
        wg = F.pad(w[r0 : r0 + CLIP_ROW_CHUNK], (0, pad)).reshape(-1, n_groups, g)  # [c, G, g]
        org_out = torch.einsum("gnk,cgk->cgn", xg, wg)
        org_max = wg.abs().amax(dim=-1, keepdim=True)  # [c, G, 1]
        best_max, min_err = org_max.clone(), torch.full_like(org_max, math.inf)
        for i in range(int(config.max_shrink * config.clip_grid)):
            max_val = org_max * (1 - i / config.clip_grid)
            q = _qdq_groups(torch.maximum(torch.minimum(wg, max_val), -max_val), config)
            err = (torch.einsum("gnk,cgk->cgn", xg, q) - org_out).pow(2).mean(dim=-1, keepdim=True)
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best_max = torch.where(better, max_val, best_max)
        best_all.append(best_max.squeeze(-1))
    return torch.cat(best_all)


def _subsample(xs: list[Tensor], n_tokens: int) -> Tensor:
    """Every ``n // n_tokens``-th token of all batches, as llm-awq's ``input_feat[:, 0::n // n_sample_token]``."""
    x = _flatten(xs)
    return x[:: max(1, x.shape[0] // n_tokens)]


def capture_linear_inputs(block: nn.Module, names: list[str], inputs: list[Tensor],
                           kwargs_list: list[dict]) -> tuple[dict[str, list[Tensor]], list[Tensor]]:
    """Run ``block`` on every batch: the inputs each named linear saw (per batch) and the block outputs."""
    feats: dict[str, list[Tensor]] = {n: [] for n in names}

    def hook_for(name: str):
        def hook(mod: nn.Module, args: tuple) -> None:
            feats[name].append(args[0].detach())
        return hook

    handles = [block.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        with torch.no_grad():
            outs = [block_output(block(x, **kw)).detach() for x, kw in zip(inputs, kwargs_list)]
    finally:
        for h in handles:
            h.remove()
    return feats, outs


def _selected(block_fqn: str, block: nn.Module, spec: ArchSpec, config: AWQConfig,
              filter_fn: FilterFn | None) -> list[str]:
    """Names (relative to the block) of the linears to quantize, after checking their shapes fit the group size."""
    names = []
    for n, mod in block_linears(block, spec).items():
        fqn = f"{block_fqn}.{n}"
        if filter_fn is not None and not filter_fn(mod, fqn):
            continue
        try:
            group_size_for(linear_weight(mod, spec), config.granularity, config.pad)
        except ValueError as e:
            raise ValueError(f"layer {fqn}: {e}") from e
        names.append(n)
    return names


def _data_meta(batches: list) -> dict:
    """Number of calibration batches and their sequence length(s), for the record."""
    lens = []
    for b in batches:
        t = b.get("input_ids") if isinstance(b, Mapping) else b
        if isinstance(t, Tensor) and t.dim() >= 1:
            lens.append(int(t.shape[-1]))
    return {"n_samples": len(batches), "seq_len": sorted(set(lens))[0] if len(set(lens)) == 1 else sorted(set(lens))}


def awq_search(model: nn.Module, calib_batches: Iterable, config: AWQConfig, filter_fn: FilterFn | None = None,
               progress: bool = True) -> AWQResult:
    """Search AWQ scales (and clips if ``config.clip``) block by block on ``calib_batches``; ``model`` is not modified.

    ``filter_fn(module, fqn)`` picks the block linears to quantize (default: every linear the arch table lists);
    a scale group none of whose linears is picked is skipped.
    """
    if not isinstance(config, AWQConfig):
        raise TypeError(f"config must be a qlib.methods.awq.AWQConfig, got {type(config).__name__}")
    spec = arch_of(model)
    batches = list(calib_batches) if calib_batches is not None else []
    if not batches:
        raise ValueError("AWQ needs calibration data but calib is empty; pass calib=[input_ids, ...], "
                         "e.g. qlib.methods.calib.calib_batches_from_text(tokenizer, text, 32, 512)")
    start = time.perf_counter()
    path, blocks = blocks_path(model, spec), get_blocks(model, spec)
    selected = [_selected(f"{path}.{i}", b, spec, config, filter_fn) for i, b in enumerate(blocks)]
    if not any(selected):
        raise ValueError(f"filter_fn selected none of the block linears of {type(model).__name__}; AWQ quantizes the "
                         f"linears inside {path} ({', '.join(spec.linears)})")
    inputs, _ = capture_block_inputs(model, batches, spec)
    kwargs_per_block = capture_block_kwargs(model, batches, spec)  # blocks may differ (Gemma-3 sliding windows)
    groups: list[AWQGroupScale] = []
    clips: dict[str, Tensor] = {}
    for i in tqdm(range(len(blocks)), desc=f"AWQ {config.tag}", disable=not progress):
        work = copy.deepcopy(blocks[i])  # searched and scaled on a copy: the model stays float and unscaled
        kwargs_list, picked = kwargs_per_block[i], selected[i]
        names = list(block_linears(work, spec))
        feats, outputs = capture_linear_inputs(work, names, inputs, kwargs_list)
        found = []
        for group in scale_groups_for(work, spec):
            quantized = [n for n in group.linears if n in picked]
            if not quantized:
                continue
            s, record = search_group_scale(work, group, feats[group.linears[0]], kwargs_list, spec, config, quantized)
            groups.append(AWQGroupScale(f"{path}.{i}.{group.prev}", tuple(f"{path}.{i}.{n}" for n in group.linears), s,
                                        record["best_ratio"], record["loss_best"], record["loss_ratio0"],
                                        tuple(record["losses"])))
            found.append((group, s))
        for group, s in found:  # apply after the whole block is searched, as llm-awq
            fold_scales(work.get_submodule(group.prev), [work.get_submodule(n) for n in group.linears], s, spec)
            scaled = [x / s.view(1, -1).to(x.dtype) for x in feats[group.linears[0]]]
            for n in group.linears:
                feats[n] = scaled
        if config.clip:
            for n in picked:
                if n.rsplit(".", 1)[-1] in NO_CLIP:
                    continue
                mod = work.get_submodule(n)
                clips[f"{path}.{i}.{n}"] = search_clip(linear_weight(mod, spec), _subsample(feats[n], config.n_clip_tokens),
                                                       config)
        inputs = outputs  # float outputs of the unmodified block (llm-awq)
        del feats, work
    meta = {
        "method": "awq", "config": asdict(config), "tag": config.tag, "family": spec.family,
        "model_class": type(model).__name__, **_data_meta(batches),
        "grid": [r for r, _ in scale_candidates(torch.ones(1), config.n_grid)],
        "linears": [f"{path}.{i}.{n}" for i, names in enumerate(selected) for n in names],
        "next_block_inputs": "float outputs of the unmodified block (as llm-awq)",
        "search_seconds": round(time.perf_counter() - start, 2),
    }
    return AWQResult(groups, clips, meta)


# --------------------------------------------------------------------------------------------------
# apply


def _check_result_config(result: AWQResult, config: AWQConfig) -> None:
    """Raise if ``config``'s quantizer differs from the one the result was searched for."""
    found = result.meta.get("config", {})
    keys = ("bits", "group_size", "symmetric", "pad")
    diff = {k: (found[k], getattr(config, k)) for k in keys if k in found and found[k] != getattr(config, k)}
    if diff:
        raise ValueError(f"the AWQ result was searched with a different quantizer ({', '.join(f'{k}: {a} vs {b}' for k, (a, b) in diff.items())}); "
                         "apply it with the config it was searched with, or search again")


@torch.no_grad()
def apply_scales(model: nn.Module, result: AWQResult, spec: ArchSpec | None = None) -> nn.Module:
    """Fold every scale of ``result`` into ``model`` (float, output-preserving), in the search's order; in place.

    The order matters only to float rounding (a linear can be both scaled and ``prev``), so it is fixed for
    bit-identical results after ``save`` / ``load``.
    """
    spec = spec or arch_of(model)
    for g in result.groups:
        fold_scales(model.get_submodule(g.prev), [model.get_submodule(n) for n in g.linears], g.scale, spec)
    return model


@torch.no_grad()
def apply_clips(model: nn.Module, result: AWQResult, spec: ArchSpec | None = None) -> nn.Module:
    """Clamp each clipped linear's weight to its searched ``[-max_val, max_val]``; in place (after ``apply_scales``)."""
    spec = spec or arch_of(model)
    group_size = result.meta.get("config", {}).get("group_size")
    for fqn, max_val in result.clips.items():
        clamp_weight(model.get_submodule(fqn), max_val, spec, group_size)
    return model


@torch.no_grad()
def awq_apply(model: nn.Module, result: AWQResult, config: AWQConfig, fqns: list[str] | None = None) -> nn.Module:
    """Scales, clips, then round to nearest on a fresh float ``model``, in place; ``model.qlib_awq_codes`` keeps the codes.

    ``fqns`` (default: the linears the search selected) become fake-quant weights; their ``(codes, QParams)``
    go to ``model.qlib_awq_codes`` for ``qlib.quant.kernels.pack_quantized``.
    """
    _check_result_config(result, config)
    spec = arch_of(model)
    apply_scales(model, result, spec)
    apply_clips(model, result, spec)
    codes = {}
    for f in fqns if fqns is not None else result.meta.get("linears", []):
        mod = model.get_submodule(f)
        w = linear_weight(mod, spec)
        q, qp = weight_codes(w, config)
        codes[f] = (q, qp)
        set_linear_weight(mod, dequantize(q, qp)[:, : w.shape[1]], spec)
    model.qlib_awq_codes = {**getattr(model, "qlib_awq_codes", {}), **codes}
    return model


@register(AWQConfig)
def quantize_awq(model: nn.Module, config: AWQConfig, fqns: list[str], calib: Iterable | None = None) -> nn.Module:
    """``quantize_``'s AWQ handler: search + apply on the selected block linears; RTN for selected linears outside blocks.

    Selected linears outside the blocks (e.g. ``lm_head``) have no AWQ scale: they get round-to-nearest at the
    same bits / group / symmetry, with a warning. The search result is kept in ``model.qlib_awq_result``.
    """
    if calib is None:
        raise ValueError("AWQ needs calibration data: pass calib=[input_ids, ...], "
                         "e.g. qlib.methods.calib.calib_batches_from_text(tokenizer, text, 32, 512)")
    spec = arch_of(model)
    path, blocks = blocks_path(model, spec), get_blocks(model, spec)
    in_blocks = {f"{path}.{i}.{n}" for i in range(len(blocks)) for n in spec.linears}
    chosen = set(fqns)
    result = awq_search(model, calib, config, filter_fn=lambda mod, fqn: fqn in chosen)
    awq_apply(model, result, config)
    model.qlib_awq_result = result
    rest = [f for f in fqns if f not in in_blocks]
    if rest:
        warnings.warn(f"{rest[:3]}{'...' if len(rest) > 3 else ''} lie outside the transformer blocks and have no AWQ "
                      "scale; they get plain round-to-nearest (exclude them with filter_fn to keep full precision)",
                      stacklevel=3)
        apply_rtn(model, RTNConfig(config.bits, config.group_size, config.symmetric, pad=config.pad), rest)
    return model
