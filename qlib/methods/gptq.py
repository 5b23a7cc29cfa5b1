"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022), faithful to the IST-DASLab reference ``gptq.py``.

One ``GPTQ`` object per linear layer, in the paper's order:

1. ``add_batch``: the layer-wise Hessian of ``||W X - W_q X||^2``, ``H = 2/n sum_i x_i x_i^T``, as the
   reference's running average (``n`` counts calibration sequences; tokens within one are summed).
2. ``quantize``: dead columns (``H_ii = 0``) -> ``H_ii = 1``, ``W[:, i] = 0``; optional act-order (columns by
   descending ``diag H``); damping ``percdamp * mean(diag H)``; ``Hinv`` = upper Cholesky factor of
   ``H^-1``; then columns are quantized one at a time, each one's error ``(w - q) / Hinv_ii`` spread over the
   columns not yet quantized, lazily in blocks of ``block_size`` columns (the paper's Algorithm 1).

``gptq_quantize_model`` runs it block by block over a transformer (``qlib.methods.arch`` says where the blocks and
linears are): hooks collect each true-sequential group's inputs, the group is quantized and written back,
and the next block's inputs come from the QUANTIZED block, as the reference does. What it writes into the
model is fake-quant (dequantized fp32 weights, for accuracy); the codes and qparams it returns go to
``qlib.quant.kernels.pack_quantized`` (via ``packable``) for real INT4 speed and bytes.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qlib.lab.bench import num_threads
from qlib.methods.arch import arch_of, blocks_path, get_blocks, linear_weight, set_linear_weight
from qlib.methods.calib import StopForward, capture_block_inputs, capture_block_kwargs, run_block
from qlib.quant.api import register
from qlib.quant.config import WeightOnlyConfig, check_flags, check_int, granularity_of, group_tag
from qlib.quant.primitives import QParams, check_bits, check_finite, group_size_for, qparams

DAMP_ESCALATION = 10.0  # damping grows x10 per failed Cholesky ...
MAX_DAMP_RATIO = 10.0  # ... up to 10 x mean(diag H); past that the layer falls back to round-to-nearest


@dataclass(frozen=True)
class GPTQConfig(WeightOnlyConfig):
    """GPTQ (Frantar et al. 2022) weight-only quantization of the linears inside transformer blocks; needs ``calib``.

    ``percdamp`` is the damping added to the Hessian diagonal as a fraction of its mean; ``block_size`` is the
    lazy-update column block; ``act_order`` quantizes columns by descending Hessian diagonal; ``static_groups``
    fixes each group's qparams up front from the unpermuted weight (so act_order keeps contiguous groups).
    ``observer="mse"`` is the reference's --mse grid search.
    """

    pad: bool = True  # group size not dividing K: a shorter last group, as the reference does
    act_order: bool = False
    static_groups: bool = False
    percdamp: float = 0.01
    block_size: int = 128
    true_sequential: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_flags(self, "act_order", "static_groups", "true_sequential")
        if isinstance(self.percdamp, bool) or not isinstance(self.percdamp, (int, float)) or not 0 <= self.percdamp <= 1:
            raise ValueError(f"percdamp={self.percdamp!r} must be a fraction in [0, 1]; 0.01 is the paper's choice")
        check_int(self.block_size, "block_size", 1, "128 is the paper's choice")
        if self.static_groups and (self.group_size is None or self.group_size == -1):
            raise ValueError("static_groups=True needs a positive group_size (e.g. 128); per-channel and per-tensor "
                             "qparams are static already")

    @property
    def tag(self) -> str:
        """E.g. ``gptq.w4.g128.sym`` (``.act`` for act_order, ``.static`` for static groups, then the observer)."""
        extra = (".act" if self.act_order else "") + (".static" if self.static_groups else "")
        obs = "" if self.observer == "minmax" else f".{self.observer}"
        return f"gptq.w{self.bits}.{group_tag(self.group_size)}.{'sym' if self.symmetric else 'asym'}{extra}{obs}"


@dataclass(frozen=True)
class GPTQResult:
    """What GPTQ did to one layer: codes and qparams (original column order), dequantized weight, diagnostics."""

    codes: Tensor  # uint8 [out, in]
    qparams: QParams  # per group of the original column order (per column, group_size 1, for act_order without static groups)
    weight_dq: Tensor  # float32 [out, in]: (codes - zero) * scale
    loss: float  # the reference's sum of (w - q)^2 / Hinv_ii^2 / 2: the estimated increase of the layer objective
    damp_used: float  # absolute damping added to diag H
    dead_columns: int  # input channels that were always zero
    notes: list[str]  # what was done beyond the plain algorithm (damping escalated, fallbacks)
    g_idx: Tensor | None = None  # group of each column (act_order without static groups only), as gptqmodel's g_idx


# --------------------------------------------------------------------------------------------------
# Hessian inverse with damping


def _inverse_cholesky(H: Tensor, percdamp: float, notes: list[str]) -> tuple[Tensor, float]:
    """Upper Cholesky factor of ``(H + damp I)^-1`` and the damp used; damping escalates x10 if Cholesky fails."""
    mean_diag = torch.diag(H).mean().item()
    damp = percdamp * mean_diag
    while True:
        Hd = H.clone()
        Hd.diagonal().add_(damp)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info.item() == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info.item() == 0 and torch.isfinite(U).all():
                if damp != percdamp * mean_diag:
                    notes.append(f"Cholesky failed at percdamp={percdamp:g}; damping escalated to "
                                 f"{damp / mean_diag:g} x mean(diag H) = {damp:.4g}")
                return U, damp
        next_damp = damp * DAMP_ESCALATION if damp > 0 else 0.01 * mean_diag
        if next_damp > MAX_DAMP_RATIO * mean_diag:
            notes.append(f"Cholesky failed even with damping {damp:.4g} ({damp / mean_diag:g} x mean(diag H)); "
                         "used an identity Hessian inverse, i.e. round-to-nearest for this layer")
            return torch.eye(H.shape[0], dtype=H.dtype, device=H.device), damp
        damp = next_damp


def _column_qparams(W: Tensor, bits: int, symmetric: bool, observer: str) -> tuple[Tensor, Tensor]:
    """Per-row (scale, zero), each [rows], of the columns ``W`` [rows, g] (the reference's ``find_params``)."""
    qp = qparams(W, bits, symmetric, "channel", observer, name="weight group")
    return qp.scale[:, 0], qp.zero[:, 0]


class GPTQ:
    """GPTQ for one linear layer: accumulate the Hessian with ``add_batch``, then ``quantize``."""

    def __init__(self, weight: Tensor) -> None:
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
        self.weight = weight.detach().float().clone()
        self.rows, self.columns = self.weight.shape
        self.H = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=self.weight.device)
        self.nsamples = 0  # sequences seen (the reference's count)
        self.ntokens = 0  # rows of X seen: fewer than ``columns`` means a rank-deficient H

    def add_batch(self, inp: Tensor) -> None:
        """Fold the layer inputs ``inp`` ([tokens, in] or [batch, tokens, in]) into ``H = 2/n sum x x^T``."""
        if inp.shape[-1] != self.columns:
            raise ValueError(f"inputs have {inp.shape[-1]} features but the layer has {self.columns} input columns; "
                             "pass the inputs of this layer")
        inp = inp.detach()
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        inp = inp.reshape(-1, self.columns).t().float()
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        self.ntokens += inp.shape[1]
        inp = math.sqrt(2 / self.nsamples) * inp
        self.H += inp.matmul(inp.t())

    def quantize(self, bits: int = 4, group_size: int | None = 128, symmetric: bool = True, act_order: bool = False,
                 static_groups: bool = False, percdamp: float = 0.01, block_size: int = 128, pad: bool = True,
                 observer: str = "minmax") -> GPTQResult:
        """Quantize the weight column by column with GPTQ (the reference's ``fasterquant``); the layer is not modified.

        ``group_size``: None per-channel, -1 per-tensor, g per group (recomputed at each group start from the
        error-updated weights, as the reference; ``static_groups`` computes them all up front instead).
        """
        # one intra-op thread: the solve's thousands of tiny column ops lose more to thread sync than they gain
        # (measured on the shared 2-core CPU here: a 576 x 576 solve took 0.10 s on one thread and 4.1 s on two)
        with num_threads(1):
            return self._quantize(bits, group_size, symmetric, act_order, static_groups, percdamp, block_size, pad, observer)

    def _quantize(self, bits: int, group_size: int | None, symmetric: bool, act_order: bool, static_groups: bool,
                  percdamp: float, block_size: int, pad: bool, observer: str) -> GPTQResult:
        """The body of ``quantize``, top to bottom in the paper's order."""
        check_bits(bits)
        if self.nsamples == 0:
            raise ValueError("GPTQ has seen no inputs; call add_batch with calibration activations before quantize")
        check_finite(self.H, "Hessian")
        if static_groups and (group_size is None or group_size == -1):
            raise ValueError("static_groups=True needs a positive group_size; per-channel and per-tensor qparams are static already")
        W = self.weight.clone()
        K, qmax, notes = self.columns, 2**bits - 1, []
        gs = group_size_for(W, granularity_of(group_size), pad)  # -1, K or g
        grouped = group_size is not None and group_size != -1
        if not grouped:  # one set of qparams for the whole weight, from it before dead columns are zeroed (as the reference)
            whole = qparams(W, bits, symmetric, granularity_of(group_size), observer, name="weight")
            scale_all = whole.scale.reshape(-1).expand(self.rows).clone()
            zero_all = whole.zero.reshape(-1).expand(self.rows).clone()

        # 1. dead inputs: a column whose input is always zero does not matter; zero it and make H invertible there
        H = self.H.clone()
        dead = torch.diag(H) == 0
        n_dead = int(dead.sum())
        H[dead, dead] = 1
        W[:, dead] = 0
        if n_dead:
            notes.append(f"{n_dead} dead input columns (H_ii = 0): set H_ii = 1 and their weights to 0")
        if self.ntokens < K:
            notes.append(f"Hessian from {self.ntokens} tokens for {K} columns is rank-deficient; damping makes it invertible")

        static = [_column_qparams(W[:, i:i + gs], bits, symmetric, observer) for i in range(0, K, gs)] if static_groups else []

        # 2. act-order: quantize the columns with the largest Hessian diagonal (most input energy) first
        perm = None
        if act_order:
            perm = torch.argsort(torch.diag(H), descending=True)
            W, H = W[:, perm], H[perm][:, perm]

        # 3. damping and the Cholesky form of the inverse Hessian
        Hinv, damp = _inverse_cholesky(H, percdamp, notes)
        del H

        # 4. column-by-column quantization with lazy block updates (Algorithm 1)
        Q = torch.zeros_like(W)
        codes = torch.zeros_like(W)
        Losses = torch.zeros_like(W)
        col_scale, col_zero = torch.zeros_like(W), torch.zeros_like(W)  # per column, in quantization order
        for i1 in range(0, K, block_size):
            i2 = min(i1 + block_size, K)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1, C1, Err1, Losses1 = (torch.zeros_like(W1) for _ in range(4))
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(count):
                w, d = W1[:, i], Hinv1[i, i]
                if not grouped:
                    s, z = scale_all, zero_all
                elif static_groups:
                    idx = int(perm[i1 + i]) if act_order else i1 + i
                    s, z = static[idx // gs]
                elif (i1 + i) % gs == 0:  # as the reference: W (updated up to this block's start; exact when groups start blocks)
                    s, z = _column_qparams(W[:, i1 + i:i1 + i + gs], bits, symmetric, observer)
                q = torch.clamp(torch.round(w / s) + z, 0, qmax)
                dq = (q - z) * s
                C1[:, i], Q1[:, i] = q, dq
                col_scale[:, i1 + i], col_zero[:, i1 + i] = s, z
                Losses1[:, i] = (w - dq) ** 2 / d**2
                err1 = (w - dq) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1
            Q[:, i1:i2], codes[:, i1:i2] = Q1, C1
            Losses[:, i1:i2] = Losses1 / 2
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])  # the lazy update of every later block at once

        # back to the original column order; qparams per group of that order
        g_idx = None
        if act_order:
            invperm = torch.argsort(perm)
            Q, codes = Q[:, invperm], codes[:, invperm]
            col_scale, col_zero = col_scale[:, invperm], col_zero[:, invperm]
            if grouped and not static_groups:  # groups follow the permuted order: one qparam per column, plus g_idx
                g_idx = (torch.arange(K, device=W.device) // gs)[invperm]
                notes.append("act_order without static_groups: groups follow the permuted column order, so qparams are "
                             "stored per column (group_size 1) with g_idx; use static_groups=True for packable groups")
        qp = self._result_qparams(col_scale, col_zero, bits, symmetric, gs, grouped, g_idx is not None)
        return GPTQResult(codes.to(torch.uint8), qp, Q, float(Losses.sum().item()), float(damp), n_dead, notes, g_idx)

    def _result_qparams(self, col_scale: Tensor, col_zero: Tensor, bits: int, symmetric: bool, gs: int,
                        grouped: bool, per_column: bool) -> QParams:
        """QParams in the original column order from the per-column scale/zero tables [out, K]."""
        K = self.columns
        if per_column:
            return QParams(col_scale.contiguous(), col_zero.contiguous(), bits, symmetric, 1, K)
        if not grouped and gs == -1:
            return QParams(col_scale[0, 0].clone(), col_zero[0, 0].clone(), bits, symmetric, -1, None)
        starts = torch.arange(0, K, gs if grouped else K, device=col_scale.device)
        return QParams(col_scale[:, starts].contiguous(), col_zero[:, starts].contiguous(), bits, symmetric,
                       gs if grouped else K, K)


# --------------------------------------------------------------------------------------------------
# whole models, block by block


def _accumulate_hessians(block: nn.Module, chosen: dict[str, nn.Module], solvers: dict[str, GPTQ],
                         inputs: list[Tensor], kwargs_list: list[dict]) -> None:
    """Run the block on every batch with hooks feeding each chosen linear's input to its GPTQ, stopping early.

    The forward stops once every chosen linear has seen the batch (the rest of the block is not needed).
    Linears fed the very same tensor (q/k/v, gate/up) share one Hessian: it is accumulated once and copied,
    which gives exactly the H of accumulating it per layer, with a third of the work for q/k/v.
    """
    seen: dict[str, Tensor] = {}  # this batch: layer -> the input tensor it got
    alias: dict[str, str] = {}  # layer -> the layer whose identical input it shares (same on every batch)

    def hook_for(name: str):
        def hook(mod: nn.Module, args: tuple) -> None:
            owner = next((n for n, t in seen.items() if t is args[0] and n not in alias), None)
            if owner is None:
                if name in alias:
                    raise RuntimeError(f"{name} shared its input with {alias[name]} on an earlier batch but not now")
                solvers[name].add_batch(args[0])
            else:
                if alias.get(name, owner) != owner or (name not in alias and solvers[name].nsamples):
                    raise RuntimeError(f"{name} shares its input with {owner} on some batches only; cannot share its Hessian")
                alias[name] = owner
            seen[name] = args[0]
            if len(seen) == len(chosen):
                raise StopForward
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in chosen.items()]
    try:
        with torch.no_grad():
            for x, kw in zip(inputs, kwargs_list):
                seen.clear()
                try:
                    block(x, **kw)
                except StopForward:
                    pass
                if len(seen) != len(chosen):
                    raise RuntimeError(f"layers {sorted(set(chosen) - set(seen))} were not called by their block; check "
                                       "the sequential groups in qlib.methods.arch for this model")
    finally:
        seen.clear()
        for h in handles:
            h.remove()
    for name, owner in alias.items():
        src = solvers[owner]
        solvers[name].H, solvers[name].nsamples, solvers[name].ntokens = src.H, src.nsamples, src.ntokens  # quantize() copies H


def _quantize_kwargs(config: GPTQConfig) -> dict[str, Any]:
    """Keyword arguments of ``GPTQ.quantize`` from a config."""
    return dict(bits=config.bits, group_size=config.group_size, symmetric=config.symmetric, act_order=config.act_order,
                static_groups=config.static_groups, percdamp=config.percdamp, block_size=config.block_size,
                pad=config.pad, observer=config.observer)


def gptq_quantize_model(model: nn.Module, calib_batches: Iterable, config: GPTQConfig,
                        filter_fn: Callable[[nn.Module, str], bool] | None = None,
                        progress: bool = True, layer_configs: Mapping[str, GPTQConfig] | None = None,
                        ) -> dict[str, GPTQResult]:
    """GPTQ every linear inside the blocks of ``model`` (in place, fake-quant) and return ``{fqn: GPTQResult}``.

    ``calib_batches``: tensors of input ids [batch, seq] or dicts of model inputs. ``filter_fn(module, fqn)``
    picks layers among the block linears (default: all). Layers outside the blocks (``lm_head``) are left
    alone, as in the reference. Each result's ``weight_dq`` is a view of the layer's new weight (no copy).
    ``layer_configs`` ``{fqn: GPTQConfig}`` gives some layers their own bits / group / solver settings (mixed
    precision, ``qlib.methods.mixed``); the others, and the block-level choice ``true_sequential``, follow ``config``.
    """
    if not isinstance(config, GPTQConfig):
        raise TypeError(f"config must be a GPTQConfig, got {type(config).__name__}")
    layer_configs = dict(layer_configs or {})
    bad = [f for f, c in layer_configs.items() if not isinstance(c, GPTQConfig)]
    if bad:
        raise TypeError(f"layer_configs[{bad[0]!r}] is a {type(layer_configs[bad[0]]).__name__}; pass GPTQConfig values")
    calib = list(calib_batches) if calib_batches is not None else []
    if not calib:
        raise ValueError("GPTQ needs calibration data: pass calib=[batch, ...] (e.g. qlib.methods.calib.calib_batches_from_text)")
    spec = arch_of(model)
    path, blocks = blocks_path(model, spec), get_blocks(model, spec)
    unknown = sorted(set(layer_configs) - {f"{path}.{b}.{n}" for b in range(len(blocks)) for n in spec.linears})
    if unknown:
        raise ValueError(f"layer_configs names {unknown[:3]}, which are not linears inside the blocks {path}.*; "
                         "use names like f'{path}.0.{spec.linears[0]}'")
    groups = spec.sequential if config.true_sequential else (spec.linears,)
    was_training = model.training
    model.eval()
    try:
        inputs, _ = capture_block_inputs(model, calib, spec)
        kwargs_by_block = capture_block_kwargs(model, calib, spec)  # Gemma-3 blocks get different masks/rotaries
        results: dict[str, GPTQResult] = {}
        for b, block in enumerate(tqdm(blocks, desc=f"GPTQ {config.tag}", disable=not progress)):
            kws = kwargs_by_block[b]
            for names in groups:
                chosen = {n: block.get_submodule(n) for n in names}
                if filter_fn is not None:
                    chosen = {n: m for n, m in chosen.items() if filter_fn(m, f"{path}.{b}.{n}")}
                if not chosen:
                    continue
                solvers = {n: GPTQ(linear_weight(m, spec)) for n, m in chosen.items()}
                _accumulate_hessians(block, chosen, solvers, inputs, kws)
                for n, m in chosen.items():
                    res = solvers.pop(n).quantize(**_quantize_kwargs(layer_configs.get(f"{path}.{b}.{n}", config)))
                    set_linear_weight(m, res.weight_dq, spec)
                    results[f"{path}.{b}.{n}"] = dataclasses.replace(res, weight_dq=linear_weight(m, spec).detach())
            inputs = run_block(block, inputs, kws)  # the next block sees the quantized block's outputs
    finally:
        model.train(was_training)
    return results


def packable(result: GPTQResult) -> tuple[Tensor, QParams]:
    """``(codes, qparams)`` for ``qlib.quant.kernels.pack_quantized``: a shorter last group zero-padded to a full one.

    Padded columns get the zero point as their code, so they dequantize to exactly 0.
    """
    qp, codes = result.qparams, result.codes
    if qp.group_size == 1 and result.g_idx is not None:
        raise ValueError("act_order without static_groups has per-column qparams that the int4 kernel cannot run; "
                         "quantize with static_groups=True")
    k = codes.shape[1]
    if qp.group_size in (-1, k) or k % qp.group_size == 0:
        return codes, qp
    k_pad = qp.scale.shape[-1] * qp.group_size
    pad_codes = qp.zero[:, -1:].expand(-1, k_pad - k).to(torch.uint8)
    return torch.cat([codes, pad_codes], dim=1), QParams(qp.scale, qp.zero, qp.bits, qp.symmetric, qp.group_size, k_pad)


@register(GPTQConfig)
def _gptq(model: nn.Module, config: GPTQConfig, fqns: list[str], calib: Any = None) -> nn.Module:
    """``quantize_`` handler: GPTQ on the selected linears inside the blocks; results kept in ``model.qlib_gptq``."""
    if calib is None:
        raise ValueError("GPTQ needs calibration data: call quantize_(model, GPTQConfig(...), calib=[batch, ...])")
    selected = set(fqns)
    results = gptq_quantize_model(model, calib, config, filter_fn=lambda m, f: f in selected)
    if not results:
        raise ValueError("none of the selected layers lies inside the model's transformer blocks; GPTQ quantizes block "
                         "linears only, so select some of them with filter_fn")
    outside = sorted(selected - set(results))
    if outside:
        warnings.warn(f"GPTQ quantizes the linears inside transformer blocks only; {len(outside)} selected layers "
                      f"({', '.join(outside[:3])}{', ...' if len(outside) > 3 else ''}) stay in full precision",
                      stacklevel=3)
    model.qlib_gptq = {**getattr(model, "qlib_gptq", {}), **results}
    return model
