"""Calibration plumbing: sample calibration windows, capture what enters the first block, run blocks one by one.

GPTQ and AWQ quantize a model block by block (peak memory ~ one block plus the model): the calibration
batches are pushed through the embeddings once, the hidden states entering block 0 are kept together with
the keyword arguments the model passes to its blocks (attention mask, rotary position embeddings, position
ids; cache disabled), and from then on each block is run on its own with ``run_block``.
"""
from __future__ import annotations

import inspect
import random
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from qlib.lab.eval import tokenize_text
from qlib.methods.arch import ArchSpec, get_blocks
from qlib.quant.modules import batch_length, check_context, run_batch


class StopForward(Exception):
    """Raised by a hook to end the model's forward once the block inputs are captured."""


def calib_batches_from_text(tokenizer: Any, text: str, n_samples: int, seq_len: int, seed: int = 0) -> list[Tensor]:
    """GPTQ-paper calibration: ``n_samples`` random ``seq_len``-token windows of the tokenized text, each [1, seq_len].

    As the reference ``datautils.get_wikitext2``: one token stream, window starts drawn with
    ``random.seed(seed); random.randint(0, n_tokens - seq_len - 1)``.
    """
    if n_samples < 1 or seq_len < 1:
        raise ValueError(f"n_samples and seq_len must be >= 1 (got {n_samples}, {seq_len})")
    ids = tokenize_text(tokenizer, text)
    if ids.numel() <= seq_len:
        raise ValueError(f"the calibration text has {ids.numel()} tokens, not more than seq_len={seq_len}; "
                         "pass more text or a shorter seq_len")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seq_len - 1) for _ in range(n_samples)]
    return [ids[i : i + seq_len].unsqueeze(0).clone() for i in starts]


def _detach(value: Any) -> Any:
    """``value`` with every tensor detached (tuples/lists/dicts walked)."""
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def _block_call(block: nn.Module, args: tuple, kwargs: dict) -> tuple[Tensor, dict]:
    """Split a block call into (hidden states, every other argument by name), with the KV cache disabled.

    Positional extras (BERT and GPT-2 pass the attention mask positionally) are bound to their parameter names.
    """
    sig = inspect.signature(type(block).forward)  # the class's forward: capture_block_kwargs stubs the instance's
    bound = sig.bind(block, *args, **kwargs)
    self_name, first = list(sig.parameters)[:2]
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if name == self_name:
            continue
        kind = sig.parameters[name].kind
        if kind == inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise ValueError(f"{type(block).__name__} was called with extra positional arguments; "
                                 "qlib.methods.calib cannot replay such a block, call it with keyword arguments")
            continue
        if kind == inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    hidden = named.pop(first)
    if "past_key_values" in named or "past_key_value" in named:
        named.pop("past_key_value", None)
        named["past_key_values"] = None
    if "use_cache" in named:
        named["use_cache"] = False
    if not isinstance(hidden, Tensor):
        raise ValueError(f"the first argument of {type(block).__name__} is a {type(hidden).__name__}, not the hidden "
                         "states tensor; qlib.methods.calib needs blocks called as block(hidden_states, ...)")
    return hidden.detach(), _detach(named)


def _run_calib(model: nn.Module, calib_batches: Iterable) -> int:
    """Run every batch through ``model`` in eval mode, stopping quietly at ``StopForward``; return the batch count."""
    was_training, n = model.training, 0
    model.eval()
    try:
        with torch.no_grad():
            for batch in calib_batches:
                check_context(model, batch_length(batch), "the calibration seq_len (the notebooks' CALIB_LEN)")
                try:
                    run_batch(model, batch, use_cache=False)  # no KV cache: only the block inputs are wanted
                except StopForward:
                    pass
                n += 1
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("calib_batches is empty; pass at least one calibration batch")
    return n


def capture_block_inputs(model: nn.Module, calib_batches: Iterable, spec: ArchSpec) -> tuple[list[Tensor], list[dict]]:
    """Hidden states entering block 0 for each batch, and the other arguments block 0 was called with (by name).

    A forward pre-hook on block 0 records them and raises a sentinel, so nothing after the embeddings runs.
    """
    blocks = get_blocks(model, spec)
    inputs: list[Tensor] = []
    kwargs_list: list[dict] = []

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden, named = _block_call(mod, args, kwargs)
        inputs.append(hidden)
        kwargs_list.append(named)
        raise StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        n = _run_calib(model, calib_batches)
    finally:
        handle.remove()
    if len(inputs) != n:
        raise RuntimeError(f"block 0 saw {len(inputs)} of {n} calibration batches; the model did not call its first "
                           "block for every batch")
    return inputs, kwargs_list


def capture_block_kwargs(model: nn.Module, calib_batches: Iterable, spec: ArchSpec) -> list[list[dict]]:
    """Arguments (besides hidden states) each block is called with, per batch: ``[block][batch] -> dict``.

    Needed where blocks differ (Gemma-3 alternates sliding-window and global attention, with their own mask and
    rotary embeddings). Every block is swapped for a pass-through stub while the batches run, so this costs
    about one embedding pass; tensors shared between blocks stay shared (no extra memory).
    """
    blocks = get_blocks(model, spec)
    per_block: list[list[dict]] = [[] for _ in blocks]

    def hook_for(i: int):
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            per_block[i].append(_block_call(mod, args, kwargs)[1])
            if i == len(blocks) - 1:
                raise StopForward
        return hook

    def passthrough(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states

    handles = [b.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, b in enumerate(blocks)]
    for b in blocks:
        b.forward = passthrough  # instance attribute shadows the class's forward; removed below
    try:
        n = _run_calib(model, calib_batches)
    finally:
        for b in blocks:
            del b.forward
        for h in handles:
            h.remove()
    if any(len(kw) != n for kw in per_block):
        raise RuntimeError("not every block was called once per calibration batch; the model skips or repeats blocks")
    return per_block


def block_output(out: Any) -> Tensor:
    """The hidden states of a block's output (a tensor, or the first element of a tuple)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise ValueError(f"block returned {type(out).__name__}; expected a tensor or a tuple starting with one")


def run_block(block: nn.Module, inputs: list[Tensor], kwargs_list: list[dict]) -> list[Tensor]:
    """Outputs (hidden states) of ``block`` for every captured batch, without gradients."""
    if len(inputs) != len(kwargs_list):
        raise ValueError(f"{len(inputs)} inputs but {len(kwargs_list)} kwargs dicts; pass the pair capture_block_inputs returned")
    with torch.no_grad():
        return [block_output(block(x, **kw)).detach() for x, kw in zip(inputs, kwargs_list)]
