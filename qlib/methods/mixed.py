"""Per-layer sensitivity and mixed precision: which layers can take fewer bits, under a budget of REAL bytes.

The steps, each testable on its own:

1. ``LayerOption``: one way to store a linear (bits, group size, symmetry) on the packed CPU kernels of
   ``qlib.quant.kernels``; ``packed_linear_bytes`` is the exact byte count of the module those kernels build (padding
   included: SmolLM2's 576-wide inputs pad to 640 at group 128, so W4 g128 costs more than W4 g64 there).
   ``prune_dominated`` drops an option that costs at least as many bytes as a finer grid of the same bits.
2. ``layer_sensitivity``: quantize ONE layer at a time (round to nearest), run the model on a few windows and
   measure KL(FP32 || model) with ``qlib.lab.eval.kl_top1``. To keep it cheap, blocks before the layer's block are
   not re-run: their FP32 output is cached once and fed in (exact, since they are unchanged). Resumable: pass
   what was measured before as ``done``.
3. ``output_errors`` + ``transfer_losses``: KL is measured at one reference option per layer; the other
   options' losses are that KL scaled by the ratio of the layer's output error ``||(W - Q(W)) X||^2`` on the same
   windows (a second-order view: a small output perturbation moves KL quadratically, so KL scales with the
   squared output error of the same layer). ``notebooks/12`` checks the transfer against direct measurements.
4. ``allocate``: the exact dynamic programme (a multiple-choice knapsack) that picks one option per layer to
   minimise the summed loss with the summed bytes within the budget.
5. ``rtn_apply`` / ``gptq_layer_configs`` + ``qlib.methods.gptq.gptq_quantize_model(layer_configs=...)``: the plan
   applied, codes kept for ``qlib.quant.kernels.pack_quantized`` (real bytes, real kernels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qlib.lab.eval import kl_top1
from qlib.methods.gptq import GPTQConfig
from qlib.quant.kernels import INT4_N_MULTIPLE, INT8_K_MULTIPLE, kernel_group, round_up, weight_codes
from qlib.quant.modules import is_linear, logits_of, weight_out_in
from qlib.quant.primitives import QParams, check_bits, dequantize


# --------------------------------------------------------------------------------------------------
# 1. options and their real bytes


@dataclass(frozen=True)
class LayerOption:
    """How one linear is stored: ``bits`` 2..4 on the int4 kernel (group-wise), 5..8 on the int8 kernel (per channel)."""

    bits: int
    group_size: int | None = 128  # None = per output channel
    symmetric: bool = False

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size < 1):
            raise ValueError(f"group_size={self.group_size!r} is invalid; use a positive group size or None (per-channel)")
        if self.bits > 4 and (self.group_size is not None or not self.symmetric):
            raise ValueError(f"{self.bits}-bit weights run on the int8 kernel, which is per-channel and symmetric; "
                             "use LayerOption(8, None, True)")

    @property
    def tag(self) -> str:
        """E.g. ``w4g128`` (asymmetric), ``w8ch.sym``."""
        g = "ch" if self.group_size is None else f"g{self.group_size}"
        return f"w{self.bits}{g}{'.sym' if self.symmetric else ''}"


W8 = LayerOption(8, None, True)
DEFAULT_OPTIONS = (LayerOption(4, 32), LayerOption(4, 64), LayerOption(4, 128), LayerOption(4, 256), W8)


def option_from_tag(tag: str, options: Iterable[LayerOption] = DEFAULT_OPTIONS) -> LayerOption:
    """The option among ``options`` whose ``tag`` is ``tag``."""
    for o in options:
        if o.tag == tag:
            return o
    raise KeyError(f"no option is tagged {tag!r}; known: {', '.join(o.tag for o in options)}")


def packed_linear_bytes(out_features: int, in_features: int, option: LayerOption, bias: bool = False,
                        act_dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the packed module ``qlib.quant.kernels`` builds for this layer and option (equal to ``packed_bytes``).

    int4 kernel: codes [N padded to 16, K padded to the kernel group] at 4 bits (2- and 3-bit codes too), plus a
    scale and a zero per kernel group and row in ``act_dtype``; int8 kernel: int8 codes [N, K padded to 16] plus
    one scale per row. A float32 bias adds 4 bytes per output.
    """
    el = torch.empty((), dtype=act_dtype).element_size()
    extra = 4 * out_features if bias else 0
    if option.bits > 4:
        return out_features * round_up(in_features, INT8_K_MULTIPLE) + out_features * el + extra
    g = option.group_size
    k_codes = in_features if g is None else round_up(in_features, g)
    kg = kernel_group(k_codes if g is None else g, k_codes, out_features)
    n_pad, k_pad = round_up(out_features, INT4_N_MULTIPLE), round_up(in_features, kg)
    return n_pad * k_pad // 2 + (k_pad // kg) * n_pad * 2 * el + extra


def linear_shapes(model: nn.Module, fqns: Iterable[str]) -> dict[str, tuple[int, int, bool]]:
    """``{fqn: (out_features, in_features, has_bias)}`` of the named ``nn.Linear`` (or ``Conv1D``) layers."""
    out = {}
    for f in fqns:
        m = model.get_submodule(f)
        if not is_linear(m):
            raise ValueError(f"{f} is a {type(m).__name__}, not an nn.Linear; pass linear layers only")
        n, k = weight_out_in(m).shape
        out[f] = (int(n), int(k), m.bias is not None)
    return out


def option_costs(shapes: Mapping[str, tuple[int, int, bool]], options: Iterable[LayerOption]) -> dict[str, dict[str, int]]:
    """``{fqn: {option tag: packed bytes}}`` for every layer and option."""
    options = list(options)
    return {f: {o.tag: packed_linear_bytes(n, k, o, b) for o in options} for f, (n, k, b) in shapes.items()}


def plan_bytes(shapes: Mapping[str, tuple[int, int, bool]], plan: Mapping[str, LayerOption]) -> int:
    """Packed bytes of the layers of ``plan`` stored as planned."""
    return sum(packed_linear_bytes(shapes[f][0], shapes[f][1], o, shapes[f][2]) for f, o in plan.items())


def _finer_or_equal(a: LayerOption, b: LayerOption, in_features: int) -> bool:
    """``a``'s grid is at least as fine as ``b``'s: same bits and symmetry, group no wider."""
    ga = in_features if a.group_size is None else min(a.group_size, in_features)
    gb = in_features if b.group_size is None else min(b.group_size, in_features)
    return a.bits == b.bits and a.symmetric == b.symmetric and ga <= gb


def prune_dominated(shapes: Mapping[str, tuple[int, int, bool]], options: Iterable[LayerOption]
                    ) -> dict[str, list[LayerOption]]:
    """Per layer, the options no finer grid of the same bits stores in as few bytes.

    Assumes a finer grid never loses accuracy at the same bits (true on average for min-max rounding); e.g.
    on a 576-wide input W4 g128 pads to 640 columns and costs more than W4 g64, so g128 is dropped there.
    """
    options = list(dict.fromkeys(options))
    kept = {}
    for f, (n, k, b) in shapes.items():
        cost = {o: packed_linear_bytes(n, k, o, b) for o in options}

        def beats(p: LayerOption, o: LayerOption) -> bool:  # p at least as fine, no more bytes; ties go to the first listed
            if p == o or not _finer_or_equal(p, o, k) or cost[p] > cost[o]:
                return False
            return cost[p] < cost[o] or not _finer_or_equal(o, p, k) or options.index(p) < options.index(o)

        kept[f] = [o for o in options if not any(beats(p, o) for p in options)]
    return kept


# --------------------------------------------------------------------------------------------------
# 2. one layer at a time


def rtn_codes(weight: Tensor, option: LayerOption) -> tuple[Tensor, QParams]:
    """Round-to-nearest codes and QParams (K zero-padded to the group, ``pack_quantized``'s layout)."""
    return weight_codes(weight, option.bits, option.group_size, option.symmetric)


def rtn_weight(weight: Tensor, option: LayerOption) -> Tensor:
    """The round-to-nearest quant-dequantized weight for ``option`` (a shorter last group where the group does not divide K)."""
    q, qp = rtn_codes(weight, option)
    return dequantize(q, qp)[:, : weight.shape[1]].to(weight.dtype)


def _blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """Dotted path and ModuleList of the model's transformer blocks, if ``qlib.methods.arch`` knows the family."""
    from qlib.methods.arch import arch_of, blocks_path, get_blocks

    try:
        spec = arch_of(model)
    except ValueError:
        return None
    return blocks_path(model, spec), get_blocks(model, spec)


class _SkipPrefix:
    """While active, blocks ``< start`` are not run: block ``start - 1`` returns its cached FP32 output.

    Exact as long as those blocks are unchanged (only layers of block >= ``start`` are being quantized).
    """

    def __init__(self, blocks: nn.ModuleList, cached: list[list[Tensor]], window: int, start: int) -> None:
        self.blocks, self.cached, self.window, self.start = blocks, cached, window, start

    def __enter__(self) -> None:
        out = self.cached[self.start - 1][self.window] if self.start > 0 else None

        def passthrough(hidden_states: Tensor, *args, **kwargs) -> Tensor:
            return hidden_states

        def cached(hidden_states: Tensor, *args, **kwargs) -> Tensor:
            return out

        for i in range(self.start):
            self.blocks[i].forward = cached if i == self.start - 1 else passthrough

    def __exit__(self, *exc) -> None:
        for i in range(self.start):
            del self.blocks[i].forward


def _block_outputs(model: nn.Module, blocks: nn.ModuleList, windows: Tensor) -> list[list[Tensor]]:
    """FP32 output of every block for every window: ``[block][window]``."""
    outs: list[list[Tensor]] = [[] for _ in blocks]

    def hook_for(i: int):
        def hook(mod, args, out):
            outs[i].append((out[0] if isinstance(out, (tuple, list)) else out).detach().clone())
        return hook

    handles = [b.register_forward_hook(hook_for(i)) for i, b in enumerate(blocks)]
    try:
        with torch.inference_mode():
            for w in windows:
                model(w[None])
    finally:
        for h in handles:
            h.remove()
    return outs


def layer_sensitivity(model: nn.Module, windows: Tensor, options: Mapping[str, Iterable[LayerOption]],
                      ref_logits: list[Tensor] | None = None, done: Mapping[str, Mapping[str, float]] | None = None,
                      on_layer: Callable[[str, dict[str, float]], None] | None = None,
                      progress: bool = True) -> dict[str, dict[str, float]]:
    """KL(FP32 || model) with ONE layer round-to-nearest quantized, per layer and option: ``{fqn: {tag: kl}}``.

    ``windows`` [n, T] token ids; ``options`` ``{fqn: [LayerOption, ...]}``; ``ref_logits`` the FP32 logits per
    window (computed if None); ``done`` earlier results to reuse (resume); ``on_layer(fqn, row)`` is called after
    each layer (to save partial results). The layer's weight is restored after each measurement.
    """
    if windows.dim() != 2:
        raise ValueError(f"windows must be [n, T] token ids (got shape {tuple(windows.shape)}); see qlib.lab.eval.lm_windows")
    was_training = model.training
    model.eval()
    found = _blocks(model)
    results: dict[str, dict[str, float]] = {f: dict(v) for f, v in (done or {}).items()}
    try:
        with torch.inference_mode():
            if ref_logits is None:
                ref_logits = [logits_of(model(w[None])).float() for w in windows]
            cached = _block_outputs(model, found[1], windows) if found else None
            todo = [(f, list(opts)) for f, opts in options.items()
                    if any(o.tag not in results.get(f, {}) for o in opts)]
            for f, opts in tqdm(todo, desc="sensitivity", disable=not progress):
                lin = model.get_submodule(f)
                start = 0
                if found and f.startswith(found[0] + "."):
                    start = int(f[len(found[0]) + 1:].split(".")[0])
                w_oi = weight_out_in(lin)  # [out, in] (a transposed view for GPT-2's Conv1D)
                original = w_oi.detach().clone()
                row = results.setdefault(f, {})
                try:
                    for o in opts:
                        if o.tag in row:
                            continue
                        w_oi.copy_(rtn_weight(original, o))
                        kl = 0.0
                        for i, w in enumerate(windows):
                            if cached is not None and start > 0:
                                with _SkipPrefix(found[1], cached, i, start):
                                    logits = logits_of(model(w[None])).float()
                            else:
                                logits = logits_of(model(w[None])).float()
                            kl += kl_top1(ref_logits[i], logits)["kl"]
                        row[o.tag] = kl / len(windows)
                finally:
                    w_oi.copy_(original)
                if on_layer is not None:
                    on_layer(f, dict(row))
    finally:
        model.train(was_training)
    return results


# --------------------------------------------------------------------------------------------------
# 3. transfer one measured KL to the other options


def capture_inputs(model: nn.Module, fqns: Iterable[str], windows: Tensor, max_tokens: int = 512) -> dict[str, Tensor]:
    """Inputs of each named linear on ``windows`` (FP32 model), at most ``max_tokens`` rows each: ``{fqn: [T, in]}``.

    Layers fed the same tensor (q/k/v) share one stored tensor.
    """
    fqns = list(fqns)
    got: dict[str, list[Tensor]] = {f: [] for f in fqns}
    by_id: dict[int, tuple[Tensor, Tensor]] = {}

    def hook_for(f: str):
        def hook(mod, args):
            key = id(args[0])
            if key not in by_id or by_id[key][0] is not args[0]:  # the tensor itself is kept, so its id is not reused
                by_id[key] = (args[0], args[0].detach().reshape(-1, args[0].shape[-1]).float().clone())
            got[f].append(by_id[key][1])
        return hook

    handles = [model.get_submodule(f).register_forward_pre_hook(hook_for(f)) for f in fqns]
    try:
        with torch.inference_mode():
            for w in windows:
                by_id.clear()
                model(w[None])
    finally:
        for h in handles:
            h.remove()
    out = {}
    for f, xs in got.items():
        if not xs:
            raise ValueError(f"{f} saw no input; pass layers the model calls on these windows")
        x = torch.cat(xs)
        out[f] = x[:: max(1, math.ceil(len(x) / max_tokens))]
    return out


def output_errors(model: nn.Module, inputs: Mapping[str, Tensor], options: Mapping[str, Iterable[LayerOption]]
                  ) -> dict[str, dict[str, float]]:
    """``||X (W - Q(W))^T||^2 / tokens`` per layer and option (the layer objective GPTQ minimises), round to nearest."""
    out = {}
    with torch.no_grad():
        for f, opts in options.items():
            w = weight_out_in(model.get_submodule(f)).detach().float()
            x = inputs[f]
            out[f] = {o.tag: float(((x @ (w - rtn_weight(w, o)).t()) ** 2).sum() / len(x)) for o in opts}
    return out


def transfer_losses(measured: Mapping[str, Mapping[str, float]], errors: Mapping[str, Mapping[str, float]],
                    ref_tag: str, floor: float = 0.0) -> dict[str, dict[str, float]]:
    """Loss per layer and option: measured KL where measured, else ``KL(ref) * error(option) / error(ref)``.

    ``floor`` clips measured KLs from below (a one-layer KL can be ~0 or noise-negative on few tokens).
    """
    out = {}
    for f, errs in errors.items():
        m = measured.get(f, {})
        if ref_tag not in m:
            raise KeyError(f"layer {f} has no KL measured at the reference option {ref_tag}; measure it first")
        ref_kl, ref_err = max(m[ref_tag], floor), errs[ref_tag]
        out[f] = {t: max(m[t], floor) if t in m else (ref_kl * e / ref_err if ref_err > 0 else 0.0)
                  for t, e in errs.items()}
    return out


# --------------------------------------------------------------------------------------------------
# 4. the allocation


@dataclass(frozen=True)
class Allocation:
    """The chosen option tag per layer, its real bytes, its summed loss, the budget, and whether the DP was exact."""

    plan: dict[str, str]
    bytes: int
    loss: float
    budget: int
    exact: bool

    def counts(self) -> dict[str, int]:
        """How many layers got each option."""
        c: dict[str, int] = {}
        for t in self.plan.values():
            c[t] = c.get(t, 0) + 1
        return dict(sorted(c.items()))


def allocate(losses: Mapping[str, Mapping[str, float]], costs: Mapping[str, Mapping[str, int]], budget: int,
             max_states: int = 200_000) -> Allocation:
    """One option per layer minimising the summed loss with the summed bytes <= ``budget`` (exact DP).

    A multiple-choice knapsack solved by dynamic programming over the bytes spent beyond each layer's cheapest
    option, in units of the gcd of those extra costs (exact). If that needs more than ``max_states`` states, the
    unit grows and extra costs are rounded UP (the budget still holds; ``exact`` is then False).
    Options missing from ``losses`` for a layer are not considered.
    """
    layers = list(losses)
    if not layers:
        raise ValueError("no layers to allocate; pass losses for at least one layer")
    opts = {f: [t for t in losses[f] if t in costs.get(f, {})] for f in layers}
    empty = [f for f in layers if not opts[f]]
    if empty:
        raise ValueError(f"layers {empty[:3]} have no option with both a loss and a cost; check the tags")
    base = {f: min(costs[f][t] for t in opts[f]) for f in layers}
    slack = budget - sum(base.values())
    if slack < 0:
        raise ValueError(f"budget {budget} bytes is below the cheapest plan ({sum(base.values())} bytes); "
                         "raise the budget or add cheaper options")
    extras = [costs[f][t] - base[f] for f in layers for t in opts[f]]
    unit = math.gcd(*[e for e in extras if e > 0]) if any(e > 0 for e in extras) else 1
    exact = True
    if slack // unit + 1 > max_states:
        unit, exact = math.ceil(slack / (max_states - 1)), False
    cap = slack // unit
    best = np.zeros(cap + 1)  # best[s]: least loss of the layers so far using <= s extra units
    choice = np.zeros((len(layers), cap + 1), dtype=np.int32)
    for li, f in enumerate(layers):
        new = np.full(cap + 1, np.inf)
        pick = np.zeros(cap + 1, dtype=np.int32)
        for oi, t in enumerate(opts[f]):
            w = -(-(costs[f][t] - base[f]) // unit)  # ceil: never under-count bytes
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = best[: cap + 1 - w] + float(losses[f][t])
            better = cand < new
            new[better], pick[better] = cand[better], oi
        best, choice[li] = new, pick
    s = int(np.argmin(best))  # best is non-increasing in s; argmin gives the fewest units at the least loss
    plan: dict[str, str] = {}
    for li in range(len(layers) - 1, -1, -1):
        f = layers[li]
        t = opts[f][choice[li, s]]
        plan[f] = t
        s -= -(-(costs[f][t] - base[f]) // unit)
    plan = {f: plan[f] for f in layers}
    total = sum(costs[f][t] for f, t in plan.items())
    assert total <= budget, (total, budget)
    return Allocation(plan, total, float(sum(losses[f][t] for f, t in plan.items())), budget, exact)


def uniform_plan(fqns: Iterable[str], option: LayerOption) -> dict[str, LayerOption]:
    """The same option for every layer."""
    return {f: option for f in fqns}


def plan_options(allocation: Allocation, options: Iterable[LayerOption] = DEFAULT_OPTIONS) -> dict[str, LayerOption]:
    """``{fqn: LayerOption}`` of an allocation."""
    options = list(options)
    return {f: option_from_tag(t, options) for f, t in allocation.plan.items()}


# --------------------------------------------------------------------------------------------------
# 5. apply


def rtn_apply(model: nn.Module, plan: Mapping[str, LayerOption]) -> dict[str, tuple[Tensor, QParams]]:
    """Round each planned layer to its option, in place (fake-quant); return ``{fqn: (codes, QParams)}`` for packing."""
    codes = {}
    with torch.no_grad():
        for f, o in plan.items():
            w = weight_out_in(model.get_submodule(f))
            q, qp = rtn_codes(w, o)
            w.copy_(dequantize(q, qp)[:, : w.shape[1]].to(w.dtype))
            codes[f] = (q, qp)
    return codes


def gptq_layer_configs(plan: Mapping[str, LayerOption], base: GPTQConfig) -> dict[str, GPTQConfig]:
    """A GPTQConfig per layer: ``base`` with the layer's bits, group and symmetry (static groups only where grouped)."""
    import dataclasses

    out = {}
    for f, o in plan.items():
        grouped = o.group_size is not None
        out[f] = dataclasses.replace(base, bits=o.bits, group_size=o.group_size, symmetric=o.symmetric,
                                     static_groups=base.static_groups and grouped)
    return out


def mean_bits(shapes: Mapping[str, tuple[int, int, bool]], total_bytes: int) -> float:
    """Real bits per weight: ``8 * bytes / weights`` (padding, scales and zeros included)."""
    n = sum(o * i for o, i, _ in shapes.values())
    return 8 * total_bytes / n
