"""Speed and size: latency percentiles, throughput, decode tokens/s, peak memory, bytes on disk, parameters.

Read every timing as a ratio between variants measured in the same run, with the same threads: the
machines this repo runs on are shared, so absolute milliseconds move with whatever else is running and
are noise from one run to the next. Record the threads (``set_threads``) and the CPU (``cpu_info``) with
every result.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from qlib.lab.machine import available_cores, cpu_info  # noqa: F401  cpu_info: recorded next to every timing

def set_threads(n: int | None = None) -> int:
    """Pin torch's intra-op threads to ``n`` (default: the CPUs this process may run on) and return the number set."""
    if n is None:
        n = available_cores()
    if n < 1:
        raise ValueError(f"thread count must be >= 1 (got {n})")
    torch.set_num_threads(n)
    return torch.get_num_threads()


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` intra-op threads, then restore the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def latency(
    fn: Callable[[], Any], warmup: int = 3, reps: int = 20, min_reps: int = 5, max_seconds: float | None = None
) -> dict:
    """Wall-clock latency of ``fn()`` over up to ``reps`` timed calls after ``warmup`` untimed ones.

    ``max_seconds`` stops timing early once that much time is spent, but never before ``min_reps`` calls.
    """
    if reps < 1 or warmup < 0:
        raise ValueError(f"need reps >= 1 and warmup >= 0 (got reps={reps}, warmup={warmup})")
    for _ in range(warmup):
        fn()
    times: list[float] = []
    began = time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if max_seconds is not None and len(times) >= min_reps and time.perf_counter() - began >= max_seconds:
            break
    ms = np.asarray(times) * 1e3
    return {
        "median_ms": float(np.median(ms)),
        "p90_ms": float(np.percentile(ms, 90)),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "reps": len(times),
    }


def throughput(
    make_fn: Callable[[int, int], Callable[[], Any]],
    batch_sizes: tuple[int, ...] = (1, 8),
    seq_lens: tuple[int, ...] = (128,),
    **latency_kw: Any,
) -> list[dict]:
    """Latency and items/s over a grid of batch sizes and sequence lengths; ``make_fn(batch, seq)`` builds the call."""
    rows = []
    for batch in batch_sizes:
        for seq in seq_lens:
            stats = latency(make_fn(batch, seq), **latency_kw)
            rows.append(
                {
                    "batch": batch,
                    "seq": seq,
                    "median_ms": stats["median_ms"],
                    "p90_ms": stats["p90_ms"],
                    "items_per_s": batch / (stats["median_ms"] / 1e3),
                }
            )
    return rows


def decode_tokens_per_s(
    model: nn.Module, input_ids: torch.Tensor, new_tokens: int = 32, warmup: int = 1, reps: int = 3
) -> dict:
    """Greedy decoding speed with the KV cache: exactly ``new_tokens`` tokens per sequence (EOS suppressed).

    ``tokens_per_s`` is the median over reps of ``batch * new_tokens / generate time`` (prefill included,
    as gpt-fast reports it); ``ms_per_token`` is the median generate time per decoding step; ``prefill_ms``
    is the median time of one forward pass over the prompt; ``decode_ms_per_token`` estimates a step
    without the prefill, ``(generate_ms - prefill_ms) / (new_tokens - 1)``.
    """
    if not hasattr(model, "generate"):
        raise TypeError(f"{type(model).__name__} has no .generate(); pass an HF causal LM (GenerationMixin)")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, prompt_len] (got shape {tuple(input_ids.shape)})")
    if new_tokens < 1 or reps < 1:
        raise ValueError(f"need new_tokens >= 1 and reps >= 1 (got {new_tokens}, {reps})")
    model.eval()
    device = next(iter(model.parameters()), torch.empty(0)).device
    ids = input_ids.to(device)
    mask = torch.ones_like(ids)
    gen_cfg = getattr(model, "generation_config", None)
    pad = getattr(gen_cfg, "pad_token_id", None)
    if pad is None:
        eos = getattr(gen_cfg, "eos_token_id", None)
        pad = (eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else 0
    kwargs = dict(
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        use_cache=True,
        pad_token_id=pad,
    )

    def generate() -> torch.Tensor:
        return model.generate(ids, **kwargs)

    def prefill() -> None:
        model(input_ids=ids, attention_mask=mask, use_cache=True)

    with torch.inference_mode():
        out = generate()
        generated = out.shape[1] - ids.shape[1]
        if generated != new_tokens:
            raise RuntimeError(f"generate produced {generated} tokens instead of {new_tokens}; check the model's generation_config")
        gen = latency(generate, warmup=max(warmup - 1, 0), reps=reps, min_reps=reps)
        pre = latency(prefill, warmup=1, reps=reps, min_reps=reps)
    batch = ids.shape[0]
    gen_ms, pre_ms = gen["median_ms"], pre["median_ms"]
    return {
        "tokens_per_s": batch * new_tokens / (gen_ms / 1e3),
        "ms_per_token": gen_ms / new_tokens,
        "prefill_ms": pre_ms,
        "decode_ms_per_token": max(gen_ms - pre_ms, 0.0) / (new_tokens - 1) if new_tokens > 1 else None,
        "generate_ms": gen_ms,
        "generate_p90_ms": gen["p90_ms"],
        "batch": batch,
        "prompt_len": ids.shape[1],
        "new_tokens": new_tokens,
        "reps": gen["reps"],
    }


def timed_rounds(fns: dict[str, Callable[[], Any]], rounds: int = 3, reps: int = 5, warmup: int = 1,
                 clock: str = "wall") -> dict[str, float]:
    """Median seconds per call of each function, the functions interleaved in ``rounds`` (a shared machine drifts).

    ``clock="cpu"`` times the process's CPU seconds instead of wall seconds: with one thread that is the compute
    itself, without the time spent waiting for a core on a machine shared with other jobs."""
    if rounds < 1 or reps < 1:
        raise ValueError(f"rounds={rounds} and reps={reps} must both be >= 1.")
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu' (got {clock!r}).")
    now = time.perf_counter if clock == "wall" else time.process_time
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            for _ in range(reps):
                t0 = now()
                fn()
                times[k].append(now() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def _rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn: Callable[[], Any], interval_s: float = 0.001) -> dict:
    """Peak process RSS while ``fn()`` runs, sampled by a background thread every ``interval_s``.

    This is the whole process's resident memory (Linux only), so it also sees other threads, and memory
    the allocator had cached before ``fn`` and reuses does not show as growth; peaks shorter than the
    interval can be missed.
    """
    if not Path("/proc/self/statm").exists():
        raise RuntimeError("peak_memory reads /proc/self/statm, which only Linux has; measure memory another way here")
    before = _rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        fn()
    finally:
        seconds = time.perf_counter() - t0
        peak[0] = max(peak[0], _rss_bytes())
        done.set()
        sampler.join()
    return {"peak_rss_delta_bytes": peak[0] - before, "rss_before_bytes": before, "peak_rss_bytes": peak[0], "seconds": seconds}


def _flat_tensors(name: str, value: Any) -> dict[str, torch.Tensor]:
    """Plain tensors that would store ``value``: quantized tensors as int data + scales, tensor subclasses by their inner tensors, tuples item by item."""
    if isinstance(value, (tuple, list)):
        out: dict[str, torch.Tensor] = {}
        for i, item in enumerate(value):
            out.update(_flat_tensors(f"{name}.{i}", item))
        return out
    if not isinstance(value, torch.Tensor):
        return {}  # dtypes, ints and other small metadata: not tensor bytes
    if value.is_quantized:
        if value.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            params = {"scale": torch.tensor([value.q_scale()]), "zero_point": torch.tensor([value.q_zero_point()])}
        else:
            params = {"scale": value.q_per_channel_scales(), "zero_point": value.q_per_channel_zero_points()}
        return {f"{name}.int_repr": value.int_repr(), **{f"{name}.{k}": v for k, v in params.items()}}
    if type(value) not in (torch.Tensor, nn.Parameter) and hasattr(value, "__tensor_flatten__"):
        inner, _ = value.__tensor_flatten__()
        out = {}
        for attr in inner:
            out.update(_flat_tensors(f"{name}.{attr}", getattr(value, attr)))
        return out
    return {name: value}


def _storage_key(t: torch.Tensor) -> tuple:
    """Identifies a view of memory: two tensors with the same key hold the same bytes (tied weights)."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):  # wrapper subclasses without storage
        return ("id", id(t))
    return (t.device.type, ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _unique_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state's tensors, contiguous on CPU, each view of the same memory kept once (tied weights)."""
    flat: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        flat.update(_flat_tensors(name, value))
    seen: set[tuple] = set()
    unique: dict[str, torch.Tensor] = {}
    for name, t in flat.items():
        t = t.detach()
        key = _storage_key(t)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        t = t.cpu().contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view into a larger storage: safetensors refuses tensors that share memory
        unique[name] = t
    return unique


def serialized_bytes(model_or_state_dict: nn.Module | dict) -> int:
    """Size in bytes of the state dict saved as one safetensors file (tied tensors stored once)."""
    from safetensors.torch import save_file

    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    if not isinstance(state, dict):
        raise TypeError(f"expected an nn.Module or a state dict, got {type(model_or_state_dict).__name__}")
    tensors = _unique_tensors(state)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.safetensors")
        save_file(tensors, path)
        return os.path.getsize(path)


def param_count(model: nn.Module, include_buffers: bool = False) -> int:
    """Number of unique parameters (tied or shared weights counted once); buffers only if asked.

    Weights a quantized model keeps as packed buffers are parameters no more: use ``serialized_bytes``
    for size, or ``include_buffers=True``.
    """
    tensors = list(model.parameters()) + (list(model.buffers()) if include_buffers else [])
    seen: set[tuple] = set()
    total = 0
    for t in tensors:
        key = _storage_key(t)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        total += t.numel()
    return total

