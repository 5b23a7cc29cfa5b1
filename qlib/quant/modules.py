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


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored as [in, out]."""
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), torch.Tensor) \
        and module.weight.dim() == 2


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` (subclasses included) and transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """A linear layer's weight as [out, in]: ``nn.Linear``'s own, a transposed view of ``Conv1D``'s [in, out]."""
    return module.weight.t() if is_conv1d(module) else module.weight


def as_linear(module: nn.Module) -> nn.Linear:
    """``module`` itself for an ``nn.Linear``; for a ``Conv1D``, an equivalent ``nn.Linear`` holding its transposed weight."""
    if not is_conv1d(module):
        return module
    in_f, out_f = module.weight.shape
    lin = nn.Linear(in_f, out_f, bias=module.bias is not None, device=module.weight.device, dtype=module.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(module.weight.t())
        if module.bias is not None:
            lin.bias.copy_(module.bias)
    return lin


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "n_ctx", "seq_length")  # first found wins


def _context(model: nn.Module) -> tuple[int, str] | tuple[None, None]:
    """(positions, config field) of a model's context limit, or (None, None)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in CONTEXT_KEYS:
        n = getattr(config, key, None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            pad = getattr(config, "pad_token_id", None)
            if getattr(config, "model_type", "") in ("roberta", "xlm-roberta") and isinstance(pad, int):
                n -= pad + 1  # RoBERTa's position ids start after the padding index
            return n, key
    return None, None


def context_length(model: nn.Module) -> int | None:
    """The longest sequence ``model`` takes, from its (text) config's position count; None when unknown or unbounded."""
    return _context(model)[0]


def batch_length(batch: Any) -> int | None:
    """Sequence length of a batch of token ids (a tensor [..., seq] or a mapping with ``input_ids``); None otherwise."""
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
    return int(ids.shape[-1]) if isinstance(ids, torch.Tensor) and ids.dim() >= 1 else None


def check_context(model: nn.Module, length: int | None, what: str) -> None:
    """Raise ValueError when a ``length``-token sequence is longer than ``model``'s context; ``what`` names the knob."""
    limit, key = _context(model)
    if limit is not None and length is not None and length > limit:
        raise ValueError(f"{what} is {length} tokens but {type(model).__name__} takes at most {limit} positions "
                         f"(config.{key}); lower it to {limit} or less")
