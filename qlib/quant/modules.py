"""Small helpers about ``nn.Module``s that every part of qlib needs: replace a submodule, find the device, run a batch,
take the logits out of an output. They live here, at the bottom of the package, so quant, methods and lab share one copy.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def set_module(model: nn.Module, fqn: str, new: nn.Module) -> None:
    """Replace the submodule at dotted name ``fqn`` by ``new``."""
    parent, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a model with neither)."""
    t = next(model.parameters(), None)
    if t is None:
        t = next(model.buffers(), None)
    return t.device if t is not None else torch.device("cpu")


def run_batch(model: nn.Module, batch: Any, device: torch.device | None = None, *, use_cache: bool | None = None) -> Any:
    """``model`` on one batch moved to ``device`` (default: the model's): a mapping -> ``**kwargs``, a tensor -> one argument.

    ``use_cache`` is passed only to models whose ``forward`` takes it (``False`` keeps an LM from building a KV cache).
    """
    device = model_device(model) if device is None else device
    extra = {}
    if use_cache is not None and "use_cache" in inspect.signature(model.forward).parameters:
        extra["use_cache"] = use_cache
    if isinstance(batch, Mapping):
        return model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}, **extra)
    if isinstance(batch, torch.Tensor):
        return model(batch.to(device), **extra)
    raise ValueError(f"a batch of type {type(batch).__name__} is not supported; pass model inputs only, as dicts of "
                     "tensors or tensors (e.g. calib=[x for x, _ in loader])")


def logits_of(out: Any) -> torch.Tensor:
    """Logits from a model output: an HF output with ``.logits``, a tensor, or a tuple led by the logits."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}; return a tensor or an object with .logits")
