"""One entry point, ``quantize_(model, config, filter_fn, calib)``, dispatching to a registry of handlers.

A handler is ``fn(model, config, fqns, calib) -> model`` registered for a config class with
``@register(ConfigClass)``, next to the method it runs (GPTQ in ``qlib.methods.gptq``, QAT in ``qlib.methods.qat``,
...); ``fqns`` are the names of the modules the filter selected among ``config.targets`` (``nn.Linear`` unless
the config says otherwise: QAT and CNN configs also take ``nn.Conv2d``). transformers' ``Conv1D`` (GPT-2) counts as
an ``nn.Linear``: handlers quantize its weight as [out, in] (``qlib.quant.modules.weight_out_in``), so the same
configs apply; it is recognised by type name, so quant needs neither transformers nor the architecture table.
``quantize_`` works in place, returns the model and records what it did in ``model.qlib_quantized``
(``{fqn: config}``, merged over calls so different layers can get different configs).

What the built-in handlers do (all fake-quant, for ACCURACY; speed and bytes on disk come from the
packed weights and real kernels in ``qlib.quant.kernels``, never from these):

- ``RTNConfig``: each selected weight is replaced by its round-to-nearest quant-dequant values, in place
  (``pad=True``: a group size that does not divide the input dimension gets a shorter last group).
  A weight tied to a module that was not selected (a tied ``lm_head`` and token embedding) is untied
  first, with a warning, so the unselected module keeps its full-precision weight.
- ``W8A8Config``: each selected ``nn.Linear`` becomes a ``qlib.quant.fakequant.QuantLinear`` (weights quant-
  dequantized once, inputs quant-dequantized on every call). ``static`` mode first runs ``calib`` through
  the float model, with forward pre-hooks recording each selected layer's input range, then freezes it.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from qlib.quant.config import QuantConfig, RTNConfig, W8A8Config
from qlib.quant.fakequant import ActRangeObserver, QuantLinear
from qlib.quant.modules import (as_linear, batch_length, check_context, is_conv1d, model_device, run_batch, set_module,
                                weight_out_in)
from qlib.quant.primitives import check_finite, group_size_for, qparams, quant_dequant

FilterFn = Callable[[nn.Module, str], bool]
Handler = Callable[[nn.Module, QuantConfig, list[str], Any], nn.Module]

_HANDLERS: dict[type, Handler] = {}  # config class -> handler; filled by @register at import time


def register(config_cls: type) -> Callable[[Handler], Handler]:
    """Decorator registering ``fn(model, config, fqns, calib) -> model`` as the handler of ``config_cls``."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, QuantConfig)):
        raise TypeError(f"{config_cls!r} is not a QuantConfig subclass; derive configs from qlib.quant.config.QuantConfig")

    def deco(fn: Handler) -> Handler:
        _HANDLERS[config_cls] = fn
        return fn

    return deco


def _handler_for(config: QuantConfig) -> Handler:
    """The handler registered for ``config``'s class or its nearest registered base class."""
    for cls in type(config).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    raise ValueError(f"no handler is registered for {type(config).__name__}; register one with @qlib.quant.api.register({type(config).__name__})")


def default_filter(module: nn.Module, fqn: str) -> bool:
    """Select every ``nn.Linear`` (and transformers' ``Conv1D``, GPT-2's linear layer)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def select_linears(model: nn.Module, filter_fn: FilterFn | None = None) -> list[str]:
    """Names of the ``nn.Linear`` (and ``Conv1D``) modules of ``model`` that ``filter_fn(module, fqn)`` accepts."""
    return select_modules(model, filter_fn, (nn.Linear,))


def select_modules(model: nn.Module, filter_fn: FilterFn | None, types: tuple[type[nn.Module], ...]) -> list[str]:
    """Names of the modules of ``types`` (subclasses included) that ``filter_fn(module, fqn)`` accepts (default: all).

    ``nn.Linear`` in ``types`` also takes transformers' ``Conv1D`` (GPT-2), a linear layer with an [in, out] weight.
    """
    return [n for n, m in model.named_modules() if _is_target(m, types) and (filter_fn is None or filter_fn(m, n))]


def _is_target(module: nn.Module, types: tuple[type[nn.Module], ...]) -> bool:
    """True if ``module`` is one of ``types``, counting a ``Conv1D`` as an ``nn.Linear``."""
    return isinstance(module, types) or (nn.Linear in types and is_conv1d(module))


def quantize_(model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None = None, calib: Iterable | None = None) -> nn.Module:
    """Quantize the selected layers of ``model`` in place with ``config``; return ``model``.

    ``filter_fn(module, fqn)`` is called on modules of ``config.targets`` only (``nn.Linear`` for most configs;
    default: all of them). ``calib`` is
    an iterable of model inputs (dicts -> ``model(**b)``, tensors -> ``model(b)``),
    needed by configs that calibrate (W8A8 static) and ignored by the others.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a qlib.quant.config.QuantConfig, got {type(config).__name__}; e.g. RTNConfig(bits=4)")
    handler = _handler_for(config)
    fqns = select_modules(model, filter_fn, config.targets)
    if not fqns:
        kinds = " or ".join(f"nn.{t.__name__}" for t in config.targets)  # Conv1D counts as nn.Linear
        n_lin = sum(_is_target(m, config.targets) for m in model.modules())
        raise ValueError(f"filter_fn matched no {kinds} in {type(model).__name__} ({n_lin} present); "
                         "check the names it tests against [n for n, _ in model.named_modules()]")
    model = handler(model, config, fqns, calib)
    done = dict(getattr(model, "qlib_quantized", {}))
    done.update({f: config for f in fqns})
    model.qlib_quantized = done
    return model


# --------------------------------------------------------------------------------------------------
# helpers shared by handlers


def _param_owners(model: nn.Module) -> dict[int, list[str]]:
    """For each parameter (by id), the names of every module that holds it directly (shows tied weights)."""
    owners: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    return owners


def check_weights(model: nn.Module, fqns: list[str], granularity: Any, pad: bool = False) -> None:
    """Validate every selected weight (group size divides unless ``pad``, finite) before anything is changed."""
    for f in fqns:
        w = weight_out_in(model.get_submodule(f))
        try:
            group_size_for(w, granularity, pad)
            check_finite(w.detach(), f"{f}.weight")
        except ValueError as e:
            raise ValueError(f"layer {f}: {e}") from e


def calibrate_act_ranges(model: nn.Module, fqns: list[str], calib: Iterable, bits: int, symmetric: bool,
                         observer: str = "minmax", progress: bool = True) -> dict[str, ActRangeObserver]:
    """Run ``calib`` through ``model`` and return, per selected layer, an observer of its input range."""
    if calib is None:
        raise ValueError("static activation quantization needs calibration data: pass calib=[batch, ...]")
    obs = {f: ActRangeObserver(bits, symmetric, observer) for f in fqns}

    def hook_for(f: str):
        def hook(mod: nn.Module, args: tuple) -> None:
            obs[f].update(args[0], name=f"input of {f}")
        return hook

    hooks = [model.get_submodule(f).register_forward_pre_hook(hook_for(f)) for f in fqns]
    device = model_device(model)
    was_training, n = model.training, 0
    model.eval()
    try:
        with torch.inference_mode():
            total = len(calib) if hasattr(calib, "__len__") else None
            for batch in tqdm(calib, total=total, desc="calibrate", disable=not progress):
                check_context(model, batch_length(batch), "the calibration seq_len")
                run_batch(model, batch, device)
                n += 1
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if n == 0:
        raise ValueError("calib is empty; pass at least one calibration batch")
    unseen = [f for f, o in obs.items() if o.lo is None]
    if unseen:
        raise ValueError(f"layers {unseen[:5]} saw no input during calibration; make sure calib batches run through "
                         "them, or leave them out with filter_fn")
    return obs


# --------------------------------------------------------------------------------------------------
# handlers


@register(RTNConfig)
def apply_rtn(model: nn.Module, config: RTNConfig, fqns: list[str], calib: Any = None) -> nn.Module:
    """Replace the weight of each linear in ``fqns`` by its round-to-nearest quant-dequant values, in place (fake-quant)."""
    check_weights(model, fqns, config.granularity, config.pad)
    owners, selected, done = _param_owners(model), set(fqns), set()
    with torch.no_grad():
        for f in tqdm(fqns, desc=f"RTN {config.tag}", disable=len(fqns) < 8):
            mod = model.get_submodule(f)
            w, w_oi = mod.weight, weight_out_in(mod)  # Conv1D: [in, out] stored, quantized as [out, in]
            if id(w) in done:  # shared by two selected layers: quantize once
                continue
            wq = quant_dequant(w_oi, qparams(w_oi, config.bits, config.symmetric, config.granularity, config.observer,
                                             pad=config.pad, name=f"{f}.weight"))
            others = [o for o in owners.get(id(w), []) if o not in selected]
            if others:
                warnings.warn(f"{f}.weight is tied to {others}; untying it so they keep full precision", stacklevel=3)
                mod.weight = nn.Parameter(wq.t().contiguous() if is_conv1d(mod) else wq, requires_grad=w.requires_grad)
            else:
                w_oi.copy_(wq)
            done.add(id(w))
    return model


@register(W8A8Config)
def _w8a8(model: nn.Module, config: W8A8Config, fqns: list[str], calib: Any = None) -> nn.Module:
    """Swap each selected linear for a QuantLinear; static mode calibrates input ranges first."""
    check_weights(model, fqns, config.weight_granularity)
    act_qp = {}
    if config.act_mode == "static":
        if calib is None:
            raise ValueError("W8A8 static needs calibration data: pass calib=[batch, ...] (or use act_mode='dynamic')")
        obs = calibrate_act_ranges(model, fqns, calib, config.act_bits, config.act_symmetric, config.act_observer)
        act_qp = {f: o.qparams() for f, o in obs.items()}
    for f in fqns:
        lin = model.get_submodule(f)
        ql = QuantLinear(as_linear(lin), config.weight_bits, config.weight_symmetric, config.weight_granularity,
                         config.act_bits, config.act_symmetric, config.act_granularity, act_qp.get(f))
        set_module(model, f, ql.to(lin.weight.device))
    return model
