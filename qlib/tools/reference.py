"""The reference libraries' GPTQ and AWQ, run on exactly qlib's model, calibration windows and evaluation.

Each wrapper takes a local Hugging Face folder (``zoo_model_dir("smollm2-135m")``) and the calibration
windows qlib uses (``qlib.methods.calib.calib_batches_from_text``: LongTensors [1, seq_len]), hands the windows to
the library untouched (no re-tokenisation, no shuffling, no extra samples), times the library's quantize
call only, and returns ``(model, info)``: a plain float32 transformers model whose block linears hold the
library's DEQUANTIZED weights (unpacked here from its packed ``qweight/qzeros/scales`` or read from its
fake-quant state), so ``qlib.lab.eval.perplexity`` scores every method with the same code. Everything the
library changed besides those linears (AWQ folds its scales into the norms) is copied over too.

``info``: ``library``, ``version``, ``wall_s`` (what exactly is timed is in ``timed``), the exact
``settings`` passed, ``check`` (the unpacked model against the library's own quantized model on the first
calibration window, and how many grid values each weight group uses) and ``notes``: every difference from
qlib's GPTQ / AWQ found in the library's source (gptqmodel 7.6.0, llm-compressor 0.14.0.1). The options
are set to match qlib and the GPTQ / llm-awq references where the library allows it; the notes say what
could not be matched.

* ``gptqmodel_gptq`` — GPTQModel's GPTQ (the IST-DASLab loop, qparams recomputed at each group start).
* ``llmcompressor_gptq`` — llm-compressor's ``GPTQModifier`` (qparams fixed from the original weight).
* ``gptqmodel_awq`` — GPTQModel's AWQ; on CPU it only packs into ``AwqTorchLinear``, which accepts fp16 /
  bf16 models only, so it runs in bfloat16 (see ``GPTQMODEL_AWQ_CPU``).
* ``llmcompressor_awq`` — llm-compressor's ``AWQModifier`` (scale search only, no clip search) followed
  by its ``QuantizationModifier`` (round-to-nearest on the scaled weights).
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from qlib.quant.modules import is_linear, weight_out_in

GPTQMODEL_AWQ_CPU = ("gptqmodel 7.6.0 AWQ on CPU: the default AWQ backend (AWQ_GEMM, AwqGEMMLinear) raises 'AWQ: CUDA is "
                     "not available'; the only CPU kernel that can pack AWQ weights, AwqTorchLinear (BACKEND.AWQ_TORCH), "
                     "declares SUPPORTS_DTYPES = [float16, bfloat16] and fails at packing time on a float32 model; "
                     "AWQ_TORCH_FUSED cannot pack the GEMM format and AWQ_TORCH_INT8 is a load-only target. So the model "
                     "is loaded in bfloat16 and the whole AWQ search runs in bfloat16")
GPTQMODEL_CPU_WORKERS = "2"  # gptqmodel 7.6.0 asks for 2 'model_loader:cpu' workers but gives the cpu pool (cores+1)//2


# --------------------------------------------------------------------------------------------------
# inputs, versions, the float model we hand back


def zoo_model_dir(key: str = "smollm2-135m") -> Path:
    """The local HF folder (config.json, model.safetensors, tokenizer) of a zoo causal LM, built if needed."""
    from qlib.lab import models

    return models.lm_folder(key)


def _check_inputs(model_dir: str | Path, calib: list[Tensor]) -> Path:
    """Validate the model folder and the calibration windows; return the folder as a Path."""
    path = Path(model_dir).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json; pass a local HF model folder such as "
                                "qlib.tools.reference.zoo_model_dir('smollm2-135m')")
    if not isinstance(calib, (list, tuple)) or not calib:
        raise ValueError("calib must be a non-empty list of LongTensor windows [1, seq_len] "
                         "(qlib.methods.calib.calib_batches_from_text)")
    for i, w in enumerate(calib):
        if not isinstance(w, Tensor) or w.dtype != torch.long or w.dim() != 2 or w.shape[0] != 1:
            got = f"{w.dtype} {tuple(w.shape)}" if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(f"calib[{i}] is {got}; every window must be a LongTensor [1, seq_len] "
                             "(qlib.methods.calib.calib_batches_from_text)")
    return path


def _version(dist: str) -> str:
    """Installed version of a distribution, with a clear error when it is missing."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(f"{dist} is not installed; the reference wrappers need it (`pip install {dist}`)") from None


def _load_float(model_dir: Path) -> nn.Module:
    """The float32 HF causal LM of ``model_dir`` in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def _transplant(model_dir: Path, source: nn.Module, weights: dict[str, Tensor]) -> nn.Module:
    """A fresh float32 model of ``model_dir``: linear ``weights`` {fqn: [out, in]} set, every other tensor copied from ``source``.

    Copying the rest matters for AWQ, whose scales are folded into the norms of the library's model. A tensor the
    library only rounded to its lower-precision dtype (gptqmodel's bf16 AWQ) keeps its float32 original.
    """
    model = _load_float(model_dir)
    src = dict(source.named_parameters()) | dict(source.named_buffers())
    targets = {f"{fqn}.weight" for fqn in weights}
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name in targets or name not in src or src[name].shape != t.shape or not src[name].is_floating_point():
                continue
            if src[name].dtype != t.dtype and torch.equal(t.to(src[name].dtype), src[name]):
                continue  # only rounded to the library's dtype (bf16 embeddings, lm_head): keep the float32 original
            t.copy_(src[name].to(torch.float32))
        mods = dict(model.named_modules())
        for fqn, w in weights.items():
            lin = mods.get(fqn)
            if lin is None or not is_linear(lin) or tuple(weight_out_in(lin).shape) != tuple(w.shape):
                raise RuntimeError(f"cannot put the dequantized {fqn} {tuple(w.shape)} into the float model; "
                                   "the library's module names do not match the HF model's")
            weight_out_in(lin).copy_(w.to(torch.float32))  # GPT-2's Conv1D: a transposed view of its [in, out] weight
    return model


# --------------------------------------------------------------------------------------------------
# pure unpacking and grid checks


def unpack_int32(packed: Tensor, bits: int, dim: int) -> Tensor:
    """Split each int32 of ``packed`` into ``32 // bits`` codes along ``dim`` (code j at bits j*bits), as int64."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed must be int32 words, got {packed.dtype}")
    if bits not in (2, 4, 8):
        raise ValueError(f"unpack_int32 handles 2, 4 or 8 bits (whole codes per word), got {bits}")
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64, device=packed.device) * bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    if dim == 0:  # [R, C] -> [R * per, C]
        codes = (words.unsqueeze(1) >> shifts.view(1, -1, 1)) & (2**bits - 1)
        return codes.reshape(-1, packed.shape[1])
    if dim == 1:  # [R, C] -> [R, C * per]
        codes = (words.unsqueeze(-1) >> shifts) & (2**bits - 1)
        return codes.reshape(packed.shape[0], -1)
    raise ValueError(f"dim must be 0 or 1, got {dim}")


def dequant_gptq_v1(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int,
                    in_features: int, out_features: int, zero_offset: int = 1) -> Tensor:
    """Float32 weight [out, in] of a GPTQ-format linear: ``scales[g] * (code - (zero + offset))``.

    ``qweight`` [in * bits / 32, out] packs the input axis, ``qzeros`` [groups, out * bits / 32] the output
    axis, ``scales`` [groups, out]; GPTQ "v1" checkpoints store ``zero - 1`` (``zero_offset=1``), v2 ``zero``.
    """
    codes = unpack_int32(qweight, bits, 0)[:in_features]  # [in, out]
    zeros = unpack_int32(qzeros, bits, 1)[:, :out_features] + zero_offset  # [groups, out]
    g = g_idx.to(torch.long)
    assert codes.shape == (in_features, out_features) and g.shape == (in_features,), (codes.shape, g.shape)
    w = scales.to(torch.float32)[g] * (codes - zeros[g]).to(torch.float32)
    return w.t().contiguous()


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ GEMM int4 layout: nibble p of a word holds column AWQ_ORDER[p] of its 8


def dequant_awq_gemm(qweight: Tensor, qzeros: Tensor, scales: Tensor, group_size: int, bits: int = 4) -> Tensor:
    """Float32 weight [out, in] of an AWQ GEMM-format linear: ``scales[g] * (code - zero)``.

    ``qweight`` [in, out / 8] and ``qzeros`` [groups, out / 8] pack the output axis with the AWQ_ORDER
    interleave; ``scales`` [groups, out]; the zero is stored as is.
    """
    if bits != 4:
        raise ValueError(f"the AWQ GEMM layout here is 4-bit only, got {bits}")
    inv = torch.argsort(torch.tensor(AWQ_ORDER))

    def natural(packed: Tensor) -> Tensor:
        nib = unpack_int32(packed, 4, 1)  # [R, out] in packed order
        return nib.view(nib.shape[0], -1, 8)[..., inv].reshape(nib.shape[0], -1)

    codes, zeros = natural(qweight), natural(qzeros)  # [in, out], [groups, out]
    g = torch.arange(codes.shape[0], device=codes.device) // group_size
    assert zeros.shape[0] == scales.shape[0] > int(g.max()), (zeros.shape, scales.shape)
    w = scales.to(torch.float32)[g] * (codes - zeros[g]).to(torch.float32)
    return w.t().contiguous()


def grid_levels(weight: Tensor, group_size: int | None) -> int:
    """Most distinct values any (row, group) of ``weight`` [out, in] takes: at most 2**bits on a bits-wide grid.

    ``group_size`` None (or -1) means one group per row.
    """
    out, k = weight.shape
    group_size = k if group_size is None or group_size < 1 else group_size
    most = 0
    for start in range(0, k, group_size):
        g = weight[:, start:start + group_size]
        most = max(most, int(max(len(torch.unique(r)) for r in g)))
    return most


def _block_linears(model: nn.Module) -> list[str]:
    """FQNs of the linear layers inside the transformer blocks (what both libraries quantize; GPT-2's Conv1D too)."""
    from qlib.methods.arch import arch_of, blocks_path

    path = blocks_path(model, arch_of(model))
    return sorted(n for n, m in model.named_modules() if is_linear(m) and n.startswith(path + "."))


def _linear_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """{fqn: (out_features, in_features)} of the block linears, from a meta-device model (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    mods = dict(model.named_modules())
    return {n: tuple(weight_out_in(mods[n]).shape) for n in _block_linears(model)}


def _check_divisible(model_dir: Path, group_size: int | None, library: str) -> None:
    """Raise ValueError when a block linear's in_features is not a multiple of ``group_size`` (the library needs it)."""
    if group_size is None or group_size < 1:
        return
    widths = {k for _, k in _linear_shapes(model_dir).values()}
    bad = sorted(k for k in widths if k % group_size)
    if bad:
        raise ValueError(f"{library} needs in_features % group_size == 0, but this model has in_features {bad} and "
                         f"group_size={group_size}; pick a group size dividing {math.gcd(*widths)}")


def _logit_check(ours: nn.Module, library: nn.Module, window: Tensor, dtype: torch.dtype = torch.float32) -> dict:
    """Max |logit difference| between our unpacked model and the library's quantized model on one window."""
    from qlib.lab.eval import lm_logits

    with torch.inference_mode():
        ref = lm_logits(ours, window).float()
        lib = lm_logits(library, window).float()
    return {"max_abs_logit_diff": float((ref - lib).abs().max()), "max_abs_logit": float(ref.abs().max()),
            "library_dtype": str(dtype).removeprefix("torch.")}


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and its wall time in seconds."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# gptqmodel


def gptqmodel_prepare() -> None:
    """Import gptqmodel with the CPU worker pool it needs on a <= 2-core machine, and build its packing extension.

    The packing extension is a C++ JIT build (~50 s once per machine); building it here keeps it out of
    the timed quantize call.
    """
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", GPTQMODEL_CPU_WORKERS)
    if int(os.environ["GPTQMODEL_CPU_WORKERS"]) < 2:
        raise RuntimeError("GPTQMODEL_CPU_WORKERS must be >= 2: gptqmodel 7.6.0 reserves 2 'model_loader:cpu' workers "
                           "inside the cpu pool and fails to start otherwise; unset it or set it to 2")
    import gptqmodel  # noqa: F401
    from gptqmodel.utils.cpp import load_pack_block_extension

    load_pack_block_extension()


def _gptqmodel_calib(calib: list[Tensor]) -> list[dict[str, Tensor]]:
    """The windows as gptqmodel rows: input_ids [1, L] and an all-ones attention mask."""
    return [{"input_ids": w.clone(), "attention_mask": torch.ones_like(w)} for w in calib]


def _gptqmodel_run(path: Path, qcfg: Any, calib: list[Tensor], dtype: torch.dtype, backend: Any) -> tuple[Any, float]:
    """Load with gptqmodel, quantize the windows in their given order; return (gptqmodel model, seconds of quantize)."""
    from gptqmodel import GPTQModel

    lengths = {w.shape[1] for w in calib}
    qm = GPTQModel.load(str(path), qcfg, dtype=dtype)
    max_pos = getattr(qm.model.config, "max_position_embeddings", None)
    if max_pos is not None and max(lengths) > max_pos:
        raise ValueError(f"windows of {max(lengths)} tokens exceed max_position_embeddings={max_pos}; gptqmodel would "
                         "truncate them, so pass shorter windows")
    rows = _gptqmodel_calib(calib)
    _, wall = _timed(lambda: qm.quantize(rows, calibration_sort=None, batch_size=1, backend=backend,
                                         calibration_data_min_length=0))
    return qm, wall


def _gptqmodel_settings(qcfg: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    """The config values that matter, read back from the library's config object."""
    out = {}
    for f in fields:
        v = getattr(qcfg, f, None)
        out[f] = v.value if hasattr(v, "value") else (str(v) if not isinstance(v, (int, float, bool, str, type(None))) else v)
    return out


GPTQMODEL_GPTQ_NOTES = (
    "algorithm: the IST-DASLab loop (gptqmodel/quantization/gptq.py GPTQ.quantize): dead columns H_ii=0 -> 1 and W=0, "
    "damp = damp_percent * mean(diag H), Hinv = upper Cholesky of (H + damp I)^-1, lazy blocks of 128, qparams "
    "recomputed from the error-updated W at each group start (the Quantizer is the reference's find_params: symmetric "
    "scale = 2 max|w| / 15, zero = 8, as qlib) — the same steps as qlib.methods.gptq",
    "Hessian: H = 2 / n_tokens * sum x x^T (normalised by tokens, qlib and the reference by sequences); with equal-length "
    "windows the two differ by a constant factor, which GPTQ is invariant to (damping is relative to mean(diag H))",
    "damping: library default damp_percent=0.05 with damp_auto_increment=0.01 (raise damp in +0.01 steps on a failed "
    "Cholesky, then diagonal floors); here damp_percent=percdamp and damp_auto_increment=0, so a failed Cholesky goes "
    "straight to diagonal floors (+1e-6 max|diag|, x10 per try), where qlib multiplies the damp by 10 up to 10 x mean",
    "act_group_aware: library default True for GPTQ (a group-local activation reordering); set False here, as qlib",
    "desc_act (act_order) default False, static_groups False, mse 0.0 (min-max), true_sequential True (q/k/v, o, "
    "gate/up, down as qlib's groups), lm_head False, embeddings not quantized: all as qlib",
    "fallback: library default Fallback(RTN, threshold='0.5%' of calibration tokens) quantizes a module by RTN if it "
    "saw too few tokens (MoE); never triggers on a dense model fed every window",
    "propagation: each layer is replayed after quantization, so the next layer sees the quantized layer's outputs, as qlib",
    "q/k/v (and gate/up) share one Hessian through HessianInputDedup, as qlib",
    "calibration: rows passed as {input_ids, attention_mask=1}, calibration_sort=None (library default 'desc' sorts by "
    "length), batch_size 1; the library warns for < 256 samples or < 256 tokens per sample but uses them all",
    "storage: scales are stored in float16 in the packed checkpoint (codes are computed against the fp32 scales), so "
    "the dequantized weights carry the fp16 rounding of each scale (relative error <= 2^-11) that qlib does not have",
    "in_features and out_features must be multiples of 32 for the packer (576, 192, 1536 are)",
    "a group size not dividing K gives a shorter last group (576 = 4 x 128 + 64), as qlib's pad=True",
    "bug found: right after quantize() the in-memory model is wrong: the packer converts qzeros to the v1 format (zero - 1) "
    "but TorchLinear dequantizes them as v2, so every weight is one step off until the model is saved and reloaded; the "
    "check below converts the live modules back to v2 with the library's own convert_gptq_v1_to_v2_format_module first",
    "threads: gptqmodel runs modules on its own worker threads (GPTQMODEL_CPU_WORKERS=2 is needed on this 2-core machine); "
    "torch intra-op threads are whatever torch.get_num_threads() is when called",
)


def gptqmodel_gptq(model_dir: str | Path, calib: list[Tensor], bits: int = 4, group_size: int = 128,
                   symmetric: bool = True, act_order: bool = False, percdamp: float = 0.01, block_size: int = 128,
                   true_sequential: bool = True, check: bool = True) -> tuple[nn.Module, dict]:
    """GPTQ with gptqmodel on ``calib``; returns the float32 model with its dequantized weights, and info.

    ``wall_s`` times ``GPTQModel.quantize`` only: block-input capture, per-layer forwards with Hessian hooks, the
    GPTQ solves, the replay of each quantized layer, and packing into TorchLinear (qweight/qzeros/scales).
    """
    path = _check_inputs(model_dir, calib)
    if block_size != 128:
        raise ValueError("gptqmodel's model-level quantize always uses 128-column lazy blocks; pass block_size=128")
    gptqmodel_prepare()
    from gptqmodel import BACKEND
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from gptqmodel.quantization.config import GPTQConfig as GMConfig

    qcfg = GMConfig(bits=bits, group_size=group_size if group_size is not None else -1, sym=symmetric,
                    desc_act=act_order, act_group_aware=False, static_groups=False, damp_percent=percdamp,
                    damp_auto_increment=0.0, mse=0.0, true_sequential=true_sequential, lm_head=False,
                    device="cpu", offload_to_disk=False)
    qm, wall = _gptqmodel_run(path, qcfg, calib, torch.float32, BACKEND.TORCH)
    qmods = {n: m for n, m in qm.model.named_modules() if isinstance(m, BaseQuantLinear)}
    if not qmods:
        raise RuntimeError("gptqmodel produced no quantized linears; nothing to unpack")
    weights = {}
    for name, m in qmods.items():
        offset = 1 if m.qzero_format() == 1 else 0
        weights[name] = dequant_gptq_v1(m.qweight, m.qzeros, m.scales, m.g_idx, bits, m.in_features,
                                        m.out_features, offset)
    model = _transplant(path, qm.model, weights)
    info = {"library": "gptqmodel", "version": _version("gptqmodel"), "method": "gptq", "wall_s": wall,
            "timed": "GPTQModel.quantize(rows, calibration_sort=None, batch_size=1): capture, Hessians, GPTQ solves, "
                     "replay, packing; excludes loading, the one-time C++ packer build and our unpacking",
            "settings": {**_gptqmodel_settings(qcfg, ("bits", "group_size", "sym", "desc_act", "act_group_aware",
                                                      "static_groups", "damp_percent", "damp_auto_increment", "mse",
                                                      "true_sequential", "lm_head", "format", "device")),
                         "blocksize": 128, "backend": "torch", "dtype": "float32", "calibration_sort": None,
                         "batch_size": 1, "n_windows": len(calib), "seq_len": int(calib[0].shape[1])},
            "quantized_layers": sorted(qmods), "same_layers_as_qlib": sorted(qmods) == _block_linears(model),
            "torch_threads": torch.get_num_threads(),
            "notes": list(GPTQMODEL_GPTQ_NOTES)}
    if check:
        info["check"] = _gptqmodel_gptq_check(model, qm.model, qmods, weights, calib[0], group_size)
    return model, info


def _gptqmodel_gptq_check(model: nn.Module, lib: nn.Module, qmods: dict[str, nn.Module], weights: dict[str, Tensor],
                          window: Tensor, group_size: int | None) -> dict:
    """Our unpacking against the library's own dequantization and forward (after fixing its qzeros format)."""
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

    lib.eval()
    for m in qmods.values():
        if m.qzero_format() == 1:
            convert_gptq_v1_to_v2_format_module(m, bits=m.bits, pack_dtype=m.pack_dtype)
            m._stream_reset_cache()
            m.clear_weight_cache()
    weight_diff = max(float((m.dequantize_weight().t().float() - weights[n]).abs().max()) for n, m in qmods.items())
    return {"max_abs_weight_diff_vs_library_dequant": weight_diff,
            **_logit_check(model, lib, window),
            "max_grid_levels_per_group": max(grid_levels(w, group_size) for w in weights.values())}


GPTQMODEL_AWQ_NOTES = (
    GPTQMODEL_AWQ_CPU,
    "scale search (looper/awq_processor.py _compute_best_scale): duo_scaling=True, s = x_mean^r / (w_mean^(1-r) + 1e-4) "
    "with w_mean the mean of |W| normalised per group (AutoAWQ); llm-awq and qlib use s = x_mean^r. The processor "
    "hard-codes duo_scaling=True, n_grid=20 (r = i/20, i < 20), s normalised by sqrt(max s * min s), loss = mean squared "
    "error of the inspected module's output; x_mean = mean |x| over all calibration tokens, as qlib",
    "a previous group's scale can rescale w_mean (prev_scale_hint); qlib has no such coupling",
    "clip search (_compute_best_clip): n_grid=20, max_shrink=0.5, 512 sampled tokens, q/k skipped, symmetric clamp "
    "[-max, max] even for zero-point quantization: as llm-awq and qlib (not configurable)",
    "quantizer (pseudo_quantize_tensor): asymmetric scale = max(max - min, 1e-5) / 15, zero = clamp(-round(min / scale)); "
    "min / max are NOT widened to include 0 (llm-awq's rule; qlib's asymmetric range always contains 0). Symmetric uses "
    "codes -8..7 with scale = max|w| / 7 (qlib: 2 max|w| / 15)",
    "it asserts in_features % group_size == 0: a shorter last group (qlib's pad=True) is not supported, so SmolLM2-135M "
    "(in_features 576 = 4.5 x 128) cannot use group 128 (64 works). The clip search asserts out_features % 64 == 0",
    "a failed assertion inside gptqmodel's worker threads ends the whole Python process (no exception reaches the caller); "
    "the wrapper checks both conditions first",
    "propagation: each layer is replayed after quantization (fwd_replay_after_process=True), so the next layer sees the "
    "QUANTIZED layer's outputs; llm-awq and qlib pass on the float outputs of the scaled block",
    "scale groups: input_layernorm -> q/k/v (inspect self_attn), v -> o only when shapes match (skipped under GQA), "
    "post_attention_layernorm -> gate/up (inspect mlp), up -> down: the llm-awq table, as qlib.methods.arch",
    "computation in bfloat16 (model dtype): inputs, outputs and the scaled weights of the search are bf16 (sums of x in "
    "fp32); qlib's search is fp32. Scales are stored in bf16 (relative rounding <= 2^-9) and the codes are computed "
    "against those bf16 scales",
    "calibration: rows {input_ids, attention_mask=1}, calibration_sort=None, batch_size 1, all windows used",
)


def gptqmodel_awq(model_dir: str | Path, calib: list[Tensor], bits: int = 4, group_size: int = 128,
                  symmetric: bool = False, dtype: torch.dtype = torch.bfloat16, check: bool = True) -> tuple[nn.Module, dict]:
    """AWQ with gptqmodel on ``calib`` (bfloat16 on CPU, see GPTQMODEL_AWQ_CPU); returns the float32 model and info.

    ``wall_s`` times ``GPTQModel.quantize`` only: capture, scale and clip searches, quantization, replay and packing
    into AwqTorchLinear.
    """
    path = _check_inputs(model_dir, calib)
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"dtype={dtype} cannot work: {GPTQMODEL_AWQ_CPU}; pass torch.bfloat16 or torch.float16")
    if bits != 4:
        raise ValueError(f"gptqmodel's AWQ GEMM format (the one AwqTorchLinear packs) is 4-bit only; got bits={bits}")
    _check_divisible(path, group_size, "gptqmodel's AWQ (pseudo_quantize_tensor asserts it)")
    clipped = {n: o for n, (o, _) in _linear_shapes(path).items() if not any(t in n.rsplit(".", 1)[-1] for t in ("q_", "k_"))}
    bad = sorted(n for n, o in clipped.items() if o % 64)
    if bad:
        raise ValueError(f"gptqmodel's AWQ clip search asserts out_features % 64 == 0 (it kills the process otherwise), "
                         f"but {bad[0]} has {clipped[bad[0]]}; use a model whose v/o/MLP widths are multiples of 64")
    gptqmodel_prepare()
    from gptqmodel import BACKEND
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from gptqmodel.quantization.config import AWQConfig as GMAWQConfig

    qcfg = GMAWQConfig(bits=bits, group_size=group_size if group_size is not None else -1, sym=symmetric,
                       device="cpu", offload_to_disk=False)
    qm, wall = _gptqmodel_run(path, qcfg, calib, dtype, BACKEND.AWQ_TORCH)
    qmods = {n: m for n, m in qm.model.named_modules() if isinstance(m, BaseQuantLinear)}
    if not qmods:
        raise RuntimeError("gptqmodel produced no quantized linears; nothing to unpack")
    weights = {n: dequant_awq_gemm(m.qweight, m.qzeros, m.scales, m.group_size, bits) for n, m in qmods.items()}
    model = _transplant(path, qm.model, weights)
    info = {"library": "gptqmodel", "version": _version("gptqmodel"), "method": "awq", "wall_s": wall,
            "timed": "GPTQModel.quantize(rows, calibration_sort=None, batch_size=1, backend=AWQ_TORCH): capture, scale "
                     "and clip searches, quantization, replay, packing; excludes loading and our unpacking",
            "settings": {**_gptqmodel_settings(qcfg, ("bits", "group_size", "sym", "format", "lm_head", "true_sequential",
                                                      "device", "scale_search_chunked_activations")),
                         "duo_scaling": True, "n_grid": 20, "apply_clip": True, "backend": "awq_torch",
                         "dtype": str(dtype).removeprefix("torch."), "calibration_sort": None, "batch_size": 1,
                         "n_windows": len(calib), "seq_len": int(calib[0].shape[1])},
            "quantized_layers": sorted(qmods), "same_layers_as_qlib": sorted(qmods) == _block_linears(model),
            "torch_threads": torch.get_num_threads(),
            "notes": list(GPTQMODEL_AWQ_NOTES)}
    if check:
        lib = qm.model.eval()
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

        weight_diff = max(float((dequantize_gemm(m.qweight, m.qzeros, m.scales.float(), m.bits, m.group_size).t()
                                 - weights[n]).abs().max()) for n, m in qmods.items())  # fp32 scales: exact
        ours_lowp = _transplant(path, qm.model, weights).to(dtype)  # the library computes in dtype: compare like with like
        info["check"] = {"max_abs_weight_diff_vs_library_dequant": weight_diff,
                         **_logit_check(ours_lowp, lib, calib[0], dtype),
                         "max_abs_logit_diff_fp32_vs_library": _logit_check(model, lib, calib[0], dtype)["max_abs_logit_diff"],
                         "max_grid_levels_per_group": max(grid_levels(w, group_size) for w in weights.values())}
    return model, info


# --------------------------------------------------------------------------------------------------
# llm-compressor


def _llmc_loader(calib: list[Tensor]) -> Any:
    """A DataLoader yielding the windows as {input_ids, attention_mask} in order (llm-compressor uses it as is)."""
    from torch.utils.data import DataLoader

    rows = [{"input_ids": w.clone(), "attention_mask": torch.ones_like(w)} for w in calib]
    return DataLoader(rows, batch_size=None, shuffle=False)


def _llmc_scheme(bits: int, group_size: int | None, symmetric: bool, actorder: Any = None) -> Any:
    """compressed-tensors weight-only integer scheme on every Linear (lm_head ignored by the caller)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    strategy = "channel" if group_size is None else "group"
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                            group_size=group_size, actorder=actorder, observer="memoryless_minmax", dynamic=False)
    return QuantizationScheme(targets=["Linear"], weights=args)


def _llmc_run(model: nn.Module, calib: list[Tensor], recipe: list[Any]) -> float:
    """Run ``oneshot`` with the sequential pipeline on the windows; return its wall seconds."""
    from llmcompressor import oneshot

    loader = _llmc_loader(calib)
    _, wall = _timed(lambda: oneshot(model=model, dataset=loader, recipe=recipe, pipeline="sequential",
                                     save_compressed=False, output_dir=None))
    return wall


def _llmc_dequant(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Dequantized weights {fqn: [out, in]} of the llm-compressor model, read through compressed-tensors' own fake_quantize.

    Also returns the worst on-grid residual: every weight must equal (round(w / s) + zp - zp) * s exactly.
    """
    from compressed_tensors.quantization import fake_quantize
    from compressed_tensors.quantization.utils import calculate_range

    weights, worst_residual, worst_code = {}, 0.0, True
    for name, m in model.named_modules():
        args = getattr(getattr(m, "quantization_scheme", None), "weights", None)
        if not isinstance(m, nn.Linear) or args is None or not hasattr(m, "weight_scale"):
            continue
        with torch.no_grad():
            w = fake_quantize(m.weight.float(), m.weight_scale.float(), m.weight_zero_point, args)
        s, zp = m.weight_scale.float(), m.weight_zero_point.float()
        g = w.shape[1] if args.group_size is None else args.group_size
        idx = torch.arange(w.shape[1]) // g
        se, ze = s[:, idx], zp[:, idx]
        codes = torch.round(w / se) + ze
        lo, hi = calculate_range(args, "cpu")
        worst_code = worst_code and bool((codes >= lo).all() and (codes <= hi).all())
        worst_residual = max(worst_residual, float(((codes - ze) * se - w).abs().max()))
        weights[name] = w
    return weights, {"max_abs_grid_residual": worst_residual, "codes_in_range": worst_code}


LLMC_GPTQ_NOTES = (
    "qparams are FIXED before the solve: the weight observer (memoryless min-max) sees the ORIGINAL weight of every "
    "group once (on_sequential_epoch_end -> observe), and the GPTQ loop quantizes each column with those scales. The "
    "reference and qlib recompute a group's qparams from the error-updated weights at the group's first column; this is "
    "qlib's static_groups=True instead",
    "not true-sequential: the sequential pipeline calibrates one decoder layer per pass, so o_proj, gate/up and down_proj "
    "get Hessians from inputs computed with the layer's still-unquantized q/k/v and attention (qlib true_sequential=False "
    "is the matching setting); each layer is then re-run quantized to feed the next (propagate_error=True), as qlib",
    "actorder: library default 'static' (act-order with static groups); set to None here unless act_order=True",
    "Hessian: H = 2/n sum x x^T with n counting sequences (batch rows), as qlib; fp32 (GPTQ_PRECISION)",
    "dead columns H_ii=0 -> 1 and W=0; damp = dampening_frac * mean(diag H); a failed Cholesky falls back to an identity "
    "inverse (round-to-nearest) at once, with no damping escalation (qlib escalates x10 first)",
    "grid: compressed-tensors symmetric int4 is codes -8..7 with scale = max|w| / 7.5 and zero point 0, the same grid as "
    "qlib's 2 max|w| / 15 with zero 8; asymmetric: scale = (max - min) / 15 over a range widened to include 0, zero = "
    "round(-8 - min / scale) in signed codes; a zero scale becomes eps",
    "lm_head ignored (ignore=['lm_head']), embeddings not quantized (GPTQModifier skips nn.Embedding)",
    "group quantization needs in_features % group_size == 0 (the observer does value.unflatten(-1, (-1, group_size)); "
    "bypass_divisibility_checks only skips the up-front check): SmolLM2-135M (576 = 4.5 x 128) cannot use group 128; "
    "qlib pads a shorter last group",
    "the quantized weights are written back into module.weight (fake-quant, model dtype float32) with weight_scale and "
    "weight_zero_point; read here through compressed-tensors' fake_quantize",
    "calibration: a DataLoader of {input_ids, attention_mask=1} batches in order is used as is (no tokenisation, "
    "no shuffling, no num_calibration_samples cut); lm_head outputs are skipped during calibration",
)


def llmcompressor_gptq(model_dir: str | Path, calib: list[Tensor], bits: int = 4, group_size: int = 128,
                       symmetric: bool = True, act_order: bool = False, percdamp: float = 0.01, block_size: int = 128,
                       check: bool = True) -> tuple[nn.Module, dict]:
    """GPTQ with llm-compressor's GPTQModifier on ``calib``; returns the float32 model with its dequantized weights, and info.

    ``wall_s`` times ``oneshot`` only: tracing the model into per-layer subgraphs, the calibration and propagation
    passes, the GPTQ solves.
    """
    path = _check_inputs(model_dir, calib)
    _version("llmcompressor")
    _check_divisible(path, group_size, "llm-compressor's group quantization (its observer reshapes rows into groups)")
    from llmcompressor.modifiers.gptq import GPTQModifier

    actorder = "static" if act_order else None
    scheme = _llmc_scheme(bits, group_size, symmetric, actorder)
    modifier = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], block_size=block_size,
                            dampening_frac=percdamp, actorder=actorder)
    lib = _load_float(path)
    wall = _llmc_run(lib, calib, [modifier])
    weights, grid = _llmc_dequant(lib)
    if not weights:
        raise RuntimeError("llm-compressor quantized no linears; nothing to read back")
    model = _transplant(path, lib, weights)
    info = {"library": "llmcompressor", "version": _version("llmcompressor"), "method": "gptq", "wall_s": wall,
            "timed": "oneshot(model, DataLoader, [GPTQModifier], pipeline='sequential'): tracing, calibration and "
                     "propagation passes, GPTQ solves; excludes loading",
            "settings": {"scheme": scheme.weights.model_dump(mode="json"), "ignore": ["lm_head"], "block_size": block_size,
                         "dampening_frac": percdamp, "actorder": actorder, "pipeline": "sequential",
                         "n_windows": len(calib), "seq_len": int(calib[0].shape[1])},
            "quantized_layers": sorted(weights), "same_layers_as_qlib": sorted(weights) == _block_linears(model),
            "torch_threads": torch.get_num_threads(),
            "notes": list(LLMC_GPTQ_NOTES)}
    if check:
        info["check"] = {**grid, **_logit_check(model, lib, calib[0]),
                         "max_grid_levels_per_group": max(grid_levels(w, group_size) for w in weights.values())}
    return model, info


LLMC_AWQ_CPU = ("llm-compressor 0.14.0.1 AWQModifier on a CPU-only torch: _apply_smoothing pins every cached activation "
                "(IntermediatesCache.pin_memory -> Tensor.pin_memory()), which raises 'Cannot access accelerator device when "
                "none is available'; pinning only speeds host-to-device copies, so it is made a no-op for the call")


@contextlib.contextmanager
def _no_pinning() -> Iterator[None]:
    """Make llm-compressor's activation pinning a no-op when there is no accelerator (see LLMC_AWQ_CPU)."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


LLMC_AWQ_NOTES = (
    LLMC_AWQ_CPU,
    "AWQModifier (llmcompressor.modifiers.transform.awq) only searches and folds the per-channel scales; the weights "
    "are then quantized by round-to-nearest with QuantizationModifier (memoryless min-max per group)",
    "NO clip search: llm-awq and qlib (clip=True) also search a per-group clip value; llm-compressor has none",
    "grid: n_grid=20 ratios r = i / 19 for i = 0..19 (duo_scaling=False; 1.0 included), llm-awq and qlib r = i / 20, "
    "i < 20; the library default duo_scaling=True uses x_mean^r / (w_mean^(1-r) + 1e-4) as AutoAWQ; set False here",
    "loss: mean squared error of the parent module's output summed over batches / elements, as llm-awq",
    "asymmetric grid: compressed-tensors widens the range to include 0, as qlib (llm-awq does not); in_features must be "
    "a multiple of group_size (no shorter last group)",
    "mappings: llm-compressor's default Llama mappings (input_layernorm -> q/k/v, v -> o, post_attention_layernorm -> "
    "gate/up, up -> down), v -> o skipped when shapes differ",
    "pipeline: sequential per decoder layer; the next layer sees the layer's outputs after smoothing and quantization "
    "(propagate_error=True); llm-awq and qlib pass on float outputs",
    "the weights keep their float values plus weight_scale / weight_zero_point; the dequantized weights are read here "
    "through compressed-tensors' fake_quantize, exactly what the library's forward applies",
)


def llmcompressor_awq(model_dir: str | Path, calib: list[Tensor], bits: int = 4, group_size: int = 128,
                      symmetric: bool = False, n_grid: int = 20, duo_scaling: bool = False,
                      check: bool = True) -> tuple[nn.Module, dict]:
    """AWQ with llm-compressor (AWQModifier + QuantizationModifier) on ``calib``; returns the float32 model and info.

    ``wall_s`` times ``oneshot`` only: tracing, the calibration passes, the scale search and folding, the quantization.
    """
    path = _check_inputs(model_dir, calib)
    _version("llmcompressor")
    _check_divisible(path, group_size, "llm-compressor's group quantization (its observer reshapes rows into groups)")
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    scheme = _llmc_scheme(bits, group_size, symmetric)
    recipe = [AWQModifier(duo_scaling=duo_scaling, n_grid=n_grid),
              QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])]
    lib = _load_float(path)
    with _no_pinning():
        wall = _llmc_run(lib, calib, recipe)
    weights, grid = _llmc_dequant(lib)
    if not weights:
        raise RuntimeError("llm-compressor quantized no linears; nothing to read back")
    model = _transplant(path, lib, weights)
    info = {"library": "llmcompressor", "version": _version("llmcompressor"), "method": "awq", "wall_s": wall,
            "timed": "oneshot(model, DataLoader, [AWQModifier, QuantizationModifier], pipeline='sequential'): tracing, "
                     "calibration passes, scale search and folding, quantization; excludes loading",
            "settings": {"scheme": scheme.weights.model_dump(mode="json"), "ignore": ["lm_head"], "n_grid": n_grid,
                         "duo_scaling": duo_scaling, "pipeline": "sequential", "n_windows": len(calib),
                         "seq_len": int(calib[0].shape[1])},
            "quantized_layers": sorted(weights), "same_layers_as_qlib": sorted(weights) == _block_linears(model),
            "torch_threads": torch.get_num_threads(),
            "notes": list(LLMC_AWQ_NOTES)}
    if check:
        info["check"] = {**grid, **_logit_check(model, lib, calib[0]),
                         "max_grid_levels_per_group": max(grid_levels(w, group_size) for w in weights.values())}
    return model, info
