"""Real low-bit execution on PyTorch's own CPU kernels: packed INT4 / INT8 weight-only linears, torch.ao dynamic INT8.

Speed and bytes figures in this repo come from here, never from fake-quant. Codes, scales and zeros come
from ``qlib.quant.primitives`` (round to nearest here, or GPTQ / AWQ elsewhere); this module only packs and runs
them, so a packed layer computes exactly ``dequantized_weight()``, which equals ``primitives.dequantize``
of its codes up to the rounding of scales and zeros to ``act_dtype``.

Kernel facts measured on torch 2.13.0 CPU (what the padding below is for):

- ``aten._weight_int8pack_mm(x, w_int8 [N, K], scales [N])``: symmetric per-output-channel int8 weights;
  ``x`` and ``scales`` share one dtype (bf16 or fp32). K must be a multiple of 16: other K read past the
  end of a row (garbage outputs or a segfault on AVX-512), so K is zero-padded. Any N works.
- ``aten._convert_weight_to_int4pack_for_cpu(q_int32 [N, K], inner_k_tiles)`` -> uint8 [N, K/2] and
  ``aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros [K/group, N, 2])`` computing
  ``x @ ((q - 8) * scale + zero).T`` per group. N must be a multiple of 16, K a multiple of the group, the
  group one of 32/64/128/256, and ``x`` and ``scales_and_zeros`` share one dtype. ``inner_k_tiles`` is
  ignored on CPU. The packed byte layout depends on the CPU capability torch dispatches to (AVX512,
  AVX2, DEFAULT pack the same codes differently), so a packed state dict is only valid on a CPU of the same
  capability: ``Int4WeightOnlyLinear`` records it and refuses to load a state dict packed for another.
- With fp32 activations the int4 kernel was slower than an fp32 matmul here; bf16 is the default.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from qlib.quant.modules import as_linear, is_linear, set_module, weight_out_in
from qlib.quant.primitives import QParams, qparams, quantize

INT4_GROUP_SIZES = (32, 64, 128, 256)  # the only groups _weight_int4pack_mm_for_cpu accepts
INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"
INT8_K_MULTIPLE = 16  # _weight_int8pack_mm reads past the row end unless K % 16 == 0 (segfault on AVX-512)
INT4_INNER_K_TILES = 2  # required argument; the CPU kernel ignores it (same bytes for 2, 4 and 8)
KERNEL_DTYPES = (torch.bfloat16, torch.float32, torch.float16)

FilterFn = Callable[[nn.Module, str], bool]
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# helpers: padding, per-row scale/zero tables


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``n``."""
    return -(-n // multiple) * multiple


def _check_act_dtype(act_dtype: torch.dtype) -> None:
    """Raise ValueError unless the kernels accept ``act_dtype``."""
    if act_dtype not in KERNEL_DTYPES:
        raise ValueError(f"act_dtype={act_dtype} is not supported by the packed kernels; use torch.bfloat16 (fastest) "
                         "or torch.float32")


def _row_tables(codes: Tensor, qp: QParams) -> tuple[Tensor, Tensor, int]:
    """``qp``'s scale and zero as float32 [N, G] tables plus the group size along K (per-tensor becomes per-channel)."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D [out_features, in_features] weight, got shape {tuple(codes.shape)}")
    n, k = codes.shape
    scale, zero = qp.scale.detach().float(), qp.zero.detach().float()
    if qp.group_size == -1:  # one scale: the same value on every row
        return scale.reshape(1, 1).expand(n, 1), zero.reshape(1, 1).expand(n, 1), k
    if k % qp.group_size != 0 or tuple(scale.shape) != (n, k // qp.group_size):
        raise ValueError(f"QParams (scale {tuple(scale.shape)}, group_size {qp.group_size}) do not match codes of shape "
                         f"{(n, k)}; pass the QParams that quantize() used for these codes")
    return scale, zero, qp.group_size


def _check_codes(codes: Tensor, qp: QParams) -> None:
    """Raise ValueError unless ``codes`` are integers in [0, qmax] as ``qlib.quant.primitives.quantize`` returns."""
    if codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"codes must be an integer tensor (uint8 from qlib.quant.primitives.quantize), got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > qp.qmax):
        raise ValueError(f"codes lie in [{int(codes.min())}, {int(codes.max())}] but {qp.bits}-bit codes must lie in "
                         f"[0, {qp.qmax}]; pass unsigned codes from qlib.quant.primitives.quantize")


def _check_padding_is_zero(codes: Tensor, scale: Tensor, zero: Tensor, group: int, in_features: int) -> None:
    """Raise ValueError unless the code columns beyond ``in_features`` dequantize to exactly 0 (code == zero point)."""
    if codes.shape[1] == in_features:
        return
    if codes.shape[1] < in_features:
        raise ValueError(f"codes have {codes.shape[1]} columns but the layer has {in_features} inputs; pass codes of the "
                         "whole weight")
    cols = torch.arange(in_features, codes.shape[1]) // group
    if ((codes[:, in_features:].float() - zero[:, cols]) * scale[:, cols]).abs().max() != 0:
        raise ValueError(f"code columns {in_features}..{codes.shape[1] - 1} are padding but do not dequantize to 0; "
                         "pad weights with zeros before quantizing (see weight_codes)")


def _as_bias(bias: Tensor | None, out_features: int) -> nn.Parameter | None:
    """A frozen bias parameter (kept in its own dtype), after a shape check."""
    if bias is None:
        return None
    if tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias has shape {tuple(bias.shape)} but the layer has {out_features} outputs")
    return nn.Parameter(bias.detach().clone(), requires_grad=False)


def weight_codes(weight: Tensor, bits: int = 4, group_size: int | None = 128, symmetric: bool = False,
                 observer: str = "minmax", **observer_kw: Any) -> tuple[Tensor, QParams]:
    """Round-to-nearest codes [N, K'] and QParams of a weight [N, K]; K is zero-padded to K' = a multiple of the group.

    ``group_size=None`` is per output channel. Zero padding changes no min-max scale (min-max ranges always
    include 0), so it acts as a shorter last group; padded codes dequantize to exactly 0.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size={group_size!r} is invalid; use a positive group size such as 128, or None "
                             "for per-channel")
        w = F.pad(w, (0, round_up(w.shape[1], group_size) - w.shape[1]))
    qp = qparams(w, bits, symmetric, "channel" if group_size is None else group_size, observer, name="weight",
                 **observer_kw)
    return quantize(w, qp), qp


# --------------------------------------------------------------------------------------------------
# INT8 weight-only


class Int8WeightOnlyLinear(nn.Module):
    """``y = x @ (w_int8 * scale).T + bias`` on ``aten._weight_int8pack_mm``: per-output-channel symmetric int8 weights.

    Inputs are cast to ``act_dtype`` (bf16 by default) for the kernel and the output back to the input dtype.
    Buffers ``weight_int8`` [N, K padded to 16] and ``scales`` [N] (``act_dtype``) hold the real bytes.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, act_dtype: torch.dtype = torch.bfloat16,
                 ) -> None:
        super().__init__()
        _check_act_dtype(act_dtype)
        self.in_features, self.out_features, self.act_dtype = in_features, out_features, act_dtype
        k_pad = round_up(in_features, INT8_K_MULTIPLE)
        self.register_buffer("weight_int8", torch.zeros(out_features, k_pad, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=act_dtype))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_codes(cls, codes: Tensor, qp: QParams, bias: Tensor | None = None, act_dtype: torch.dtype = torch.bfloat16,
                   in_features: int | None = None) -> Int8WeightOnlyLinear:
        """Pack per-channel (or per-tensor) codes whose ``codes - zero`` fit in int8 (symmetric 2..8-bit always do)."""
        _check_codes(codes, qp)
        scale, zero, group = _row_tables(codes, qp)
        n, k = codes.shape
        if group != k:
            raise ValueError(f"the int8 kernel has one scale per output channel, but these codes have groups of {group}; "
                             "quantize per channel (granularity='channel'), or use Int4WeightOnlyLinear for groups")
        if not torch.equal(zero, zero.round()):
            raise ValueError("the int8 kernel needs integer zero points (these are fractional); quantize symmetrically "
                             "with qlib.quant.primitives, or use Int4WeightOnlyLinear, which takes float zeros")
        w = codes.to(torch.int16) - zero.to(torch.int16)
        if w.numel() and (int(w.min()) < -128 or int(w.max()) > 127):
            raise ValueError("codes - zero do not fit in int8 (asymmetric 8-bit codes); quantize symmetrically "
                             "(symmetric=True) for the int8 kernel")
        in_features = k if in_features is None else in_features
        _check_padding_is_zero(codes, scale, zero, group, in_features)
        mod = cls(in_features, n, bias is not None, act_dtype)
        w = w[:, :in_features].to(torch.int8)
        mod.weight_int8.copy_(F.pad(w, (0, mod.weight_int8.shape[1] - in_features)))
        mod.scales.copy_(scale[:, 0].to(act_dtype))
        mod.bias = _as_bias(bias, n)
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_dtype: torch.dtype = torch.bfloat16) -> Int8WeightOnlyLinear:
        """Round-to-nearest symmetric per-channel int8 of ``linear.weight``, packed."""
        codes, qp = weight_codes(linear.weight, bits=8, group_size=None, symmetric=True)
        return cls.from_codes(codes, qp, linear.bias, act_dtype)

    def dequantized_weight(self) -> Tensor:
        """The float32 [N, K] weight the kernel multiplies by: ``w_int8 * scale`` with the stored scales."""
        return self.weight_int8[:, : self.in_features].float() * self.scales.float()[:, None]

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).to(self.act_dtype)
        pad = self.weight_int8.shape[1] - self.in_features
        if pad:
            x2 = F.pad(x2, (0, pad))
        y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.scales).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"act_dtype={self.act_dtype}, kernel=_weight_int8pack_mm")


# --------------------------------------------------------------------------------------------------
# INT4 weight-only (also runs 2- and 3-bit codes, stored in 4 bits)


def kernel_group(group: int, k: int, n: int) -> int:
    """The kernel group for a quantization group: itself if allowed, a divisor of it, or (per-channel) the cheapest."""
    if group in INT4_GROUP_SIZES:
        return group
    if group == k:  # per-channel: repeat the row's scale over kernel groups; pick the fewest bytes
        return min(INT4_GROUP_SIZES, key=lambda g: round_up(k, g) * n // 2 + round_up(k, g) // g * n * 4)
    fits = [g for g in INT4_GROUP_SIZES if group % g == 0]
    if not fits:
        raise ValueError(f"group size {group} cannot run on the int4 kernel, which needs groups of "
                         f"{'/'.join(map(str, INT4_GROUP_SIZES))} (or multiples of 32); re-quantize with one of those")
    return max(fits)


class Int4WeightOnlyLinear(nn.Module):
    """``y = x @ W.T + bias`` on ``aten._weight_int4pack_mm_for_cpu`` with group-wise 4-bit weights (sym or asym).

    For unsigned codes q with ``dequant = (q - z) * s`` the kernel's ``(q - 8) * s + zero_k`` needs
    ``zero_k = (8 - z) * s`` (= min + 8 * scale for asymmetric min-max). K is zero-padded to a multiple of
    the kernel group (padded codes = z, i.e. exactly 0.0, and the input is padded with zeros) and N to a
    multiple of 16 (sliced off the output). Zeros may be fractional (Q4_1 / HQQ-style float zero points,
    ``zero_k`` is a float anyway). Buffers: ``weight_packed`` uint8 [N', K'/2] in the kernel's
    CPU-specific layout and ``scales_and_zeros`` [K'/group, N', 2] in ``act_dtype``. 2- and 3-bit codes run
    here too, stored in 4 bits.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, bias: bool = False,
                 act_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        _check_act_dtype(act_dtype)
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"group_size={group_size} is not supported by the int4 kernel; use one of {INT4_GROUP_SIZES}")
        self.in_features, self.out_features, self.group_size, self.act_dtype = in_features, out_features, group_size, act_dtype
        self.cpu_capability = torch.backends.cpu.get_cpu_capability()  # the packed layout depends on it
        n_pad, k_pad = round_up(out_features, INT4_N_MULTIPLE), round_up(in_features, group_size)
        self.register_buffer("weight_packed", torch.zeros(n_pad, k_pad // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.zeros(k_pad // group_size, n_pad, 2, dtype=act_dtype))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_codes(cls, codes: Tensor, qp: QParams, bias: Tensor | None = None, act_dtype: torch.dtype = torch.bfloat16,
                   in_features: int | None = None) -> Int4WeightOnlyLinear:
        """Pack codes of 2..4 bits with their QParams (per-group, per-channel or per-tensor) without re-rounding.

        ``codes`` may be wider than ``in_features`` (zero-padded before quantizing, as ``weight_codes`` does).
        """
        if qp.bits > 4:
            raise ValueError(f"{qp.bits}-bit codes do not fit the int4 kernel; use Int8WeightOnlyLinear (per-channel "
                             "symmetric) or quantize to 4 bits or fewer")
        _check_codes(codes, qp)
        scale, zero, group = _row_tables(codes, qp)
        n, k = codes.shape
        in_features = k if in_features is None else in_features
        _check_padding_is_zero(codes, scale, zero, group, in_features)
        kg = kernel_group(group, k, n)
        mod = cls(in_features, n, kg, bias is not None, act_dtype)
        n_pad, k_pad = mod.weight_packed.shape[0], mod.weight_packed.shape[1] * 2
        # per kernel group: the quantization group's scale and zero (a group of g spans g / kg kernel groups)
        col = torch.arange(0, k_pad, kg) // group
        col = col.clamp(max=scale.shape[1] - 1)  # per-channel rows padded past K reuse the row's only group
        s, z = scale[:, col], zero[:, col]
        q = codes[:, :in_features].to(torch.int32)
        pad_codes = z.round().clamp(0, 15).repeat_interleave(kg, dim=1)[:, in_features:k_pad]  # = zero point: 0.0
        q = torch.cat([q, pad_codes.to(torch.int32)], dim=1)  # (the input is zero-padded too, so float zeros are safe)
        q = F.pad(q, (0, 0, 0, n_pad - n), value=8)  # padded rows: s = 0, zero_k = 0 -> all-zero outputs, sliced off
        zero_k = F.pad((8.0 - z) * s, (0, 0, 0, n_pad - n))
        s = F.pad(s, (0, 0, 0, n_pad - n))
        mod.weight_packed.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), INT4_INNER_K_TILES))
        mod.scales_and_zeros.copy_(torch.stack([s, zero_k], dim=-1).transpose(0, 1).to(act_dtype))
        mod.bias = _as_bias(bias, n)
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None = 128, symmetric: bool = False, bits: int = 4,
                    act_dtype: torch.dtype = torch.bfloat16) -> Int4WeightOnlyLinear:
        """Round-to-nearest ``bits``-bit (default 4) group-wise codes of ``linear.weight`` (K zero-padded), packed."""
        codes, qp = weight_codes(linear.weight, bits=bits, group_size=group_size, symmetric=symmetric)
        return cls.from_codes(codes, qp, linear.bias, act_dtype, in_features=linear.in_features)

    def _kernel(self, x2: Tensor) -> Tensor:
        """The raw kernel call on a padded [M, K'] input in ``act_dtype``: [M, N'] in ``act_dtype``."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight_packed, self.group_size, self.scales_and_zeros)

    def codes(self) -> Tensor:
        """The unsigned 4-bit codes [N', K'] (uint8) read back through the kernel itself, whatever its packed layout."""
        n_pad, k_pad = self.weight_packed.shape[0], self.weight_packed.shape[1] * 2
        unit = torch.zeros(k_pad // self.group_size, n_pad, 2, dtype=self.act_dtype)
        unit[..., 0], unit[..., 1] = 1.0, 8.0  # (q - 8) * 1 + 8 = q, exact in any float dtype
        eye = torch.eye(k_pad, dtype=self.act_dtype)
        q = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight_packed, self.group_size, unit)
        return q.t().round().to(torch.uint8)

    def dequantized_weight(self) -> Tensor:
        """The float32 [N, K] weight the kernel multiplies by: ``(q - 8) * scale + zero_k`` with the stored tables."""
        sz = self.scales_and_zeros.float().repeat_interleave(self.group_size, dim=0)  # [K', N', 2]
        w = (self.codes().float() - 8.0) * sz[..., 0].t() + sz[..., 1].t()
        return w[: self.out_features, : self.in_features]

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).to(self.act_dtype)
        pad = self.weight_packed.shape[1] * 2 - self.in_features
        if pad:
            x2 = F.pad(x2, (0, pad))
        y = self._kernel(x2)
        if y.shape[1] != self.out_features:
            y = y[:, : self.out_features]
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def get_extra_state(self) -> dict:
        """Saved with the state dict: the CPU capability whose packed layout ``weight_packed`` uses."""
        return {"cpu_capability": self.cpu_capability}

    def set_extra_state(self, state: dict) -> None:
        here = torch.backends.cpu.get_cpu_capability()
        if state.get("cpu_capability") != here:
            raise RuntimeError(f"this int4 state dict was packed for CPU capability {state.get('cpu_capability')!r} but "
                               f"torch here dispatches {here!r}, whose packed layout differs; re-pack from the float "
                               "model or from the codes (pack_quantized) on this machine")
        self.cpu_capability = here

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}, act_dtype={self.act_dtype}, kernel=_weight_int4pack_mm_for_cpu")


# --------------------------------------------------------------------------------------------------
# packed embeddings: lookups that read rows of a packed int8 / int4 weight (shared with a tied head)

_ROW_MAPS: dict[tuple, tuple[int, Tensor, Tensor, Tensor | None, Tensor | None]] = {}


def _probe_int4_layout(n: int, k_pad: int) -> tuple[Tensor, Tensor]:
    """Where ``_convert_weight_to_int4pack_for_cpu`` puts each code of an [n, k_pad] weight on this CPU capability:
    byte index (into the flat packed tensor) and nibble shift (0 or 4), both [n, k_pad], found by packing probes."""
    total = n * k_pad
    src = torch.arange(total, dtype=torch.int64).reshape(n, k_pad)
    position_of = torch.zeros(total, dtype=torch.int64)
    digits = max(1, -(-int(total - 1).bit_length() // 4))
    found = torch.zeros(total, dtype=torch.int64)  # source index held by each nibble slot (2 * byte + high)
    for d in range(digits):
        probe = ((src >> (4 * d)) & 15).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe.contiguous(), INT4_INNER_K_TILES).reshape(-1)
        nibbles = torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1).to(torch.int64)  # slot = 2 * byte + hi
        found |= nibbles << (4 * d)
    if not torch.equal(torch.sort(found).values, torch.arange(total, dtype=torch.int64)):
        raise RuntimeError("torch's int4 packing on this CPU is not a permutation of nibbles; pack the embedding with "
                           "embedding=False")
    position_of[found] = torch.arange(total, dtype=torch.int64)
    position_of = position_of.reshape(n, k_pad)
    return position_of // 2, (position_of % 2) * 4


def _int4_row_map(n_pad: int, k_pad: int) -> tuple[int, Tensor, Tensor, Tensor | None, Tensor | None]:
    """How to read row r of an [n_pad, k_pad] int4-packed weight: rows are packed in blocks of ``block`` rows, each
    block a contiguous run of ``block * k_pad / 2`` bytes; returns (block, byte [block, k_pad], shift [block, k_pad])
    for full blocks and (byte, shift) for a shorter last block (None when n_pad is a multiple of block). Found once
    per shape and CPU capability by probing torch's own packing function (its layout differs between AVX512, AVX2
    and DEFAULT), and checked: the probe of a full-size weight must follow the block rule."""
    key = (n_pad, k_pad, torch.backends.cpu.get_cpu_capability())
    if key in _ROW_MAPS:
        return _ROW_MAPS[key]
    probe_rows = 256  # a probe of its own shape: enough rows for any block size seen (64 on AVX512, 32 on AVX2)
    byte, shift = _probe_int4_layout(probe_rows, k_pad)
    half = k_pad // 2
    rows = torch.arange(probe_rows)
    block = next((b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256)
                  if torch.equal(byte - ((rows // b) * b * half)[:, None], byte[rows % b])
                  and torch.equal(shift, shift[rows % b])), None)
    if block is None:
        raise RuntimeError("torch's int4 packing on this CPU does not store rows in contiguous blocks; pack the "
                           "embedding with embedding=False")
    tail_byte = tail_shift = None
    tail = n_pad % block
    if tail:  # a shorter last block may be laid out differently: probe a weight that ends in one
        lead = block if n_pad > block else 0
        b2, s2 = _probe_int4_layout(lead + tail, k_pad)
        tail_byte, tail_shift = b2[lead:] - lead * half, s2[lead:]
    _ROW_MAPS[key] = (block, byte[:block].contiguous(), shift[:block].to(torch.uint8).contiguous(),
                      None if tail_byte is None else tail_byte.contiguous(),
                      None if tail_shift is None else tail_shift.to(torch.uint8).contiguous())
    return _ROW_MAPS[key]


def _int4_rows(layer: "Int4WeightOnlyLinear", ids: Tensor) -> Tensor:
    """Float32 rows ``ids`` (any shape) of an Int4WeightOnlyLinear's weight: [*ids.shape, in_features]."""
    n_pad, k_pad = layer.weight_packed.shape[0], layer.weight_packed.shape[1] * 2
    block, byte, shift, tail_byte, tail_shift = _int4_row_map(n_pad, k_pad)
    flat = ids.reshape(-1)
    half = k_pad // 2
    full = (n_pad // block) * block
    within = flat % block
    idx = ((flat // block) * block * half)[:, None] + byte[within]
    sh = shift[within]
    if tail_byte is not None and bool((flat >= full).any()):
        last = flat >= full
        t = flat[last] - full
        idx[last] = full * half + tail_byte[t]
        sh[last] = tail_shift[t]
    q = (layer.weight_packed.reshape(-1)[idx] >> sh) & 15  # [M, k_pad] uint8 codes
    sz = layer.scales_and_zeros[:, flat].float()  # [K'/group, M, 2]
    s = sz[..., 0].t().repeat_interleave(layer.group_size, dim=1)
    z = sz[..., 1].t().repeat_interleave(layer.group_size, dim=1)
    w = (q.float() - 8.0) * s + z
    return w[:, : layer.in_features].reshape(*ids.shape, layer.in_features)


class PackedEmbedding(nn.Module):
    """An embedding table stored as a packed weight-only layer, read row by row: ``forward(ids)`` dequantizes the rows.

    ``source`` is an ``Int8WeightOnlyLinear`` or ``Int4WeightOnlyLinear`` of shape [vocab, dim]. With ``tied=True``
    it is the model's packed output head itself (a tied embedding and head share one packed copy, as in the float
    model; the head owns the tensors and this module holds a reference outside the module tree); otherwise it is
    this module's own child ``source``. ``embed_scale`` multiplies the rows (Gemma-3 scales its embedding by
    sqrt(hidden)); rows come out in ``out_dtype``.
    """

    def __init__(self, source: nn.Module, tied: bool = False, embed_scale: float | None = None,
                 out_dtype: torch.dtype = torch.float32, padding_idx: int | None = None) -> None:
        super().__init__()
        if not isinstance(source, (Int4WeightOnlyLinear, Int8WeightOnlyLinear)):
            raise TypeError(f"source must be a packed Int4/Int8WeightOnlyLinear, got {type(source).__name__}")
        self.tied, self.embed_scale, self.out_dtype, self.padding_idx = tied, embed_scale, out_dtype, padding_idx
        self.num_embeddings, self.embedding_dim = source.out_features, source.in_features
        if tied:
            object.__setattr__(self, "_tied_source", source)  # not a child: the head's tensors are saved once
        else:
            self.source = source

    @property
    def packed(self) -> nn.Module:
        """The packed layer whose rows this embedding reads (the head, when tied)."""
        return self._tied_source if self.tied else self.source

    def rows(self, ids: Tensor) -> Tensor:
        """Float32 rows for ``ids`` (no ``embed_scale``)."""
        src = self.packed
        if isinstance(src, Int8WeightOnlyLinear):
            return src.weight_int8[ids, : src.in_features].float() * src.scales[ids].float()[..., None]
        return _int4_rows(src, ids)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"token ids must be an integer tensor, got {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise IndexError(f"token ids lie in [{int(ids.min())}, {int(ids.max())}] but the embedding has "
                             f"{self.num_embeddings} rows")
        w = self.rows(ids.long())
        if self.embed_scale is not None:
            w = w * self.embed_scale
        return w.to(self.out_dtype)

    def dequantized_weight(self) -> Tensor:
        """The whole float32 [vocab, dim] table the lookups read (without ``embed_scale``)."""
        return self.packed.dequantized_weight()

    def extra_repr(self) -> str:
        kind = "int4" if isinstance(self.packed, Int4WeightOnlyLinear) else "int8"
        return (f"{self.num_embeddings}, {self.embedding_dim}, {kind}, tied={self.tied}"
                + (f", embed_scale={self.embed_scale:.4g}" if self.embed_scale is not None else ""))


def _embed_scale(emb: nn.Module) -> float | None:
    """The factor a scaled embedding (Gemma-3's ``embed_scale``) multiplies its rows by, or None."""
    scale = getattr(emb, "embed_scale", None)
    if scale is None:
        return None
    return float(scale.item() if isinstance(scale, Tensor) else scale)


def _input_embedding_name(model: nn.Module) -> str | None:
    """Dotted name of the model's input token embedding (HF ``get_input_embeddings``), or None."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        return None
    return next((n for n, m in model.named_modules() if m is emb), None)


def _pack_embedding(model: nn.Module, bits: int, group_size: int | None, symmetric: bool, act_dtype: torch.dtype,
                    tied_head: str | None) -> str | None:
    """Replace the input embedding by a PackedEmbedding: reading the packed head ``tied_head`` when given, otherwise
    its own round-to-nearest packed copy. Returns the embedding's name (None when the model has none to pack)."""
    name = _input_embedding_name(model)
    if name is None:
        return None
    emb = model.get_submodule(name)
    if isinstance(emb, PackedEmbedding):
        return name
    if not isinstance(emb, nn.Embedding):
        log.info("input embedding %s is a %s, not an nn.Embedding: left in float", name, type(emb).__name__)
        return None
    out_dtype = emb.weight.dtype
    if tied_head is not None:
        new = PackedEmbedding(model.get_submodule(tied_head), tied=True, embed_scale=_embed_scale(emb),
                              out_dtype=out_dtype, padding_idx=emb.padding_idx)
    else:
        with torch.no_grad():
            if bits <= 4:
                codes, qp = weight_codes(emb.weight, bits, group_size, symmetric)
                src = Int4WeightOnlyLinear.from_codes(codes, qp, None, act_dtype, in_features=emb.embedding_dim)
            else:
                codes, qp = weight_codes(emb.weight, bits, None, True)
                src = Int8WeightOnlyLinear.from_codes(codes, qp, None, act_dtype)
        new = PackedEmbedding(src, tied=False, embed_scale=_embed_scale(emb), out_dtype=out_dtype,
                              padding_idx=emb.padding_idx)
    set_module(model, name, new)
    return name


# --------------------------------------------------------------------------------------------------
# whole models


def _output_embedding_name(model: nn.Module) -> str | None:
    """Dotted name of the model's output projection (HF ``get_output_embeddings``, else a child called lm_head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, mod in model.named_modules():
        if (head is not None and mod is head) or (head is None and name.split(".")[-1] == "lm_head"):
            return name
    return None


def _untie_config(model: nn.Module, fqns: list[str]) -> None:
    """Mark an HF model's embeddings untied when a packed layer held a weight shared with another module."""
    config = getattr(model, "config", None)
    if config is None:
        return
    for cfg in {id(c): c for c in (config, getattr(config, "get_text_config", lambda: config)())}.values():
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False  # so tie_weights() / save-load never re-tie the packed head to the embedding
            log.info("%s no longer tied by transformers: the input embedding reads the packed head's rows, or "
                     "stays in float when embedding=False", fqns)


def _tied_fqns(model: nn.Module, fqns: list[str]) -> list[str]:
    """The selected linears whose weight is also held by a module outside the selection (a tied lm_head)."""
    owners: dict[int, set[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(name)
    selected = set(fqns)
    return [f for f in fqns if owners.get(id(model.get_submodule(f).weight), set()) - selected]


def _linear_fqns(model: nn.Module, filter_fn: FilterFn | None, include_lm_head: bool) -> list[str]:
    """Names of the nn.Linear (and Conv1D) layers to pack: those ``filter_fn(module, fqn)`` accepts, minus the head if
    excluded."""
    head = None if include_lm_head else _output_embedding_name(model)
    return [n for n, m in model.named_modules()
            if is_linear(m) and n != head and (filter_fn is None or filter_fn(m, n))]


def _tied_head(model: nn.Module, fqns: list[str]) -> str | None:
    """The output head's name when it is among ``fqns`` and shares its weight with the input embedding."""
    head, emb = _output_embedding_name(model), _input_embedding_name(model)
    if head is None or emb is None or head not in fqns:
        return None
    w_head, w_emb = getattr(model.get_submodule(head), "weight", None), getattr(model.get_submodule(emb), "weight", None)
    return head if w_head is not None and w_head is w_emb else None


def _embedding_not_packed(model: nn.Module, head: str | None) -> None:
    raise ValueError(f"embedding=True packs the input embedding together with the output head, but the head "
                     f"{head!r} of {type(model).__name__} is not packed in this call; select it (include_lm_head=True "
                     "and a filter_fn that accepts it) or leave embedding=None")


def pack_model(model: nn.Module, bits: int = 4, group_size: int | None = 128, symmetric: bool | None = None,
               filter_fn: FilterFn | None = None, include_lm_head: bool = True, act_dtype: torch.dtype = torch.bfloat16,
               progress: bool = True, embedding: bool | None = None) -> nn.Module:
    """Replace the selected ``nn.Linear`` layers by round-to-nearest packed Int4/Int8WeightOnlyLinear, in place.

    ``bits`` 2..4 run on the int4 kernel (group-wise, ``group_size`` 32..256 or None = per-channel; default
    asymmetric); ``bits`` 5..8 on the int8 kernel (always per output channel and symmetric, ``group_size``
    ignored). ``symmetric=None`` means asymmetric for <= 4 bits and symmetric for more.
    ``filter_fn(module, fqn)`` chooses among the ``nn.Linear`` layers (default all); ``include_lm_head=False``
    keeps the output projection in float.

    ``embedding`` (default None: follow the head) packs the input token embedding when the output head is packed
    in this call: a head TIED to the embedding (SmolLM2, Gemma-3, GPT-2, OPT, Qwen2 tie them) keeps the tie, the
    embedding becoming a ``PackedEmbedding`` that reads the packed head's rows (one packed copy, as the float model
    has one copy); an untied embedding gets its own packed copy at the same bits. ``embedding=False`` keeps it in
    float (a tied head is then untied: the float table stays and the packed head is added to the bytes).
    ``config.tie_word_embeddings`` is set False either way, so transformers never re-ties a packed head. Returns
    ``model``.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits={bits!r} is not supported; use 2..4 (int4 kernel) or 5..8 (int8 kernel)")
    _check_act_dtype(act_dtype)
    symmetric = bits > 4 if symmetric is None else symmetric
    if bits > 4 and not symmetric:
        raise ValueError("the int8 kernel takes no zero points; use symmetric=True (or None) for 5..8 bits")
    fqns = _linear_fqns(model, filter_fn, include_lm_head)
    if not fqns:
        raise ValueError(f"no nn.Linear of {type(model).__name__} was selected; check filter_fn against "
                         "[n for n, _ in model.named_modules()]")
    tied = _tied_fqns(model, fqns)
    tied_head = _tied_head(model, fqns)
    with torch.no_grad():
        for f in tqdm(fqns, desc=f"pack int{4 if bits <= 4 else 8} ({bits}-bit codes)", disable=not progress):
            lin = as_linear(model.get_submodule(f))  # GPT-2's Conv1D as the nn.Linear it computes
            if bits <= 4:
                new = Int4WeightOnlyLinear.from_linear(lin, group_size, symmetric, bits, act_dtype)
            else:
                codes, qp = weight_codes(lin.weight, bits, None, True)
                new = Int8WeightOnlyLinear.from_codes(codes, qp, lin.bias, act_dtype)
            set_module(model, f, new)
    head = _output_embedding_name(model)
    if embedding is not False and head in fqns:
        _pack_embedding(model, bits, group_size, symmetric, act_dtype, tied_head)
    elif embedding:
        _embedding_not_packed(model, head)
    if tied:
        _untie_config(model, tied)
    _guard_save_pretrained(model)
    return model


def pack_quantized(model: nn.Module, quantized: dict[str, tuple[Tensor, QParams]],
                   act_dtype: torch.dtype = torch.bfloat16, progress: bool = True,
                   embedding: bool | None = None) -> nn.Module:
    """Pack weights already quantized elsewhere (GPTQ, AWQ: ``{fqn: (codes, QParams)}``) without re-rounding, in place.

    Codes of <= 4 bits go to Int4WeightOnlyLinear, wider per-channel symmetric codes to Int8WeightOnlyLinear;
    codes may be wider than the layer (K zero-padded before quantizing). The input embedding follows the head as
    in ``pack_model``: shared with a tied packed head, or (untied) its own round-to-nearest copy at the head's bits.
    Returns ``model``.
    """
    _check_act_dtype(act_dtype)
    for f, (codes, qp) in quantized.items():
        try:
            lin = model.get_submodule(f)
        except AttributeError as err:
            raise KeyError(f"{f!r} is not a module of {type(model).__name__}; use names from model.named_modules()") from err
        if not is_linear(lin):
            raise ValueError(f"{f!r} is a {type(lin).__name__}, not an nn.Linear; only linear layers can be packed")
        out_f, in_f = weight_out_in(lin).shape
        if codes.shape[0] != out_f or codes.shape[1] < in_f:
            raise ValueError(f"codes for {f!r} have shape {tuple(codes.shape)} but the layer weight is "
                             f"[{out_f}, {in_f}] as [out, in]; pass the codes of this layer")
    tied = _tied_fqns(model, list(quantized))
    tied_head = _tied_head(model, list(quantized))
    with torch.no_grad():
        for f, (codes, qp) in tqdm(quantized.items(), desc="pack quantized", disable=not progress):
            lin = model.get_submodule(f)
            cls = Int4WeightOnlyLinear if qp.bits <= 4 else Int8WeightOnlyLinear
            set_module(model, f, cls.from_codes(codes, qp, lin.bias, act_dtype, in_features=weight_out_in(lin).shape[1]))
    head = _output_embedding_name(model)
    if embedding is not False and head in quantized:
        qp = quantized[head][1]
        group = qp.group_size if qp.group_size in INT4_GROUP_SIZES else 128
        _pack_embedding(model, qp.bits, group, qp.symmetric, act_dtype, tied_head)
    elif embedding:
        _embedding_not_packed(model, head)
    if tied:
        _untie_config(model, tied)
    _guard_save_pretrained(model)
    return model


# --------------------------------------------------------------------------------------------------
# saving and loading packed models

PACKED_FILE = "qlib_packed.pt"  # state dict (torch.save; loaded with weights_only=True)
PACKED_INDEX = "qlib_packed.json"  # which modules are packed, how, and the model class
_DTYPES = {str(d).removeprefix("torch."): d for d in KERNEL_DTYPES}


def packed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The Int4/Int8WeightOnlyLinear modules of ``model`` by dotted name (not the storage of packed embeddings)."""
    embeddings = tuple(f"{n}." for n in packed_embeddings(model))
    return {n: m for n, m in model.named_modules() if isinstance(m, (Int4WeightOnlyLinear, Int8WeightOnlyLinear))
            and not n.startswith(embeddings)}


def packed_embeddings(model: nn.Module) -> dict[str, PackedEmbedding]:
    """The PackedEmbedding modules of ``model`` by dotted name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedEmbedding)}


def _refuse_save_pretrained(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("this model has qlib packed layers: save it with qlib.quant.kernels.save_packed(model, folder) and "
                       "load it with qlib.quant.kernels.load_packed(folder). transformers' save_pretrained would write the "
                       "folder, but from_pretrained would rebuild plain nn.Linear layers with newly initialized weights "
                       "and compute something else")


def _guard_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` (a Hugging Face model's) raise a clear error instead of writing a folder that
    reloads into float layers with random weights; ``save_packed`` is the way to save a packed model."""
    if callable(getattr(model, "save_pretrained", None)):
        object.__setattr__(model, "save_pretrained", _refuse_save_pretrained)


def save_packed(model: nn.Module, folder: str | Path) -> Path:
    """Write a packed model to ``folder``: its state dict (packed codes, scales, zeros and every float tensor) with
    ``torch.save``, an index of the packed layers (``qlib_packed.json``) and, for a Hugging Face model, its config.

    ``load_packed(folder)`` rebuilds it. The int4 layout depends on the CPU capability torch dispatches to (recorded;
    loading on another capability raises). Returns the folder.
    """
    import json

    layers, embeddings = packed_layers(model), packed_embeddings(model)
    if not layers and not embeddings:
        raise ValueError(f"{type(model).__name__} has no packed layers; pack it first (pack_model / pack_quantized), "
                         "or save a float model the usual way")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = {"format": 1, "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
             "model_class": f"{type(model).__module__}.{type(model).__qualname__}", "layers": {}}
    for name, m in layers.items():
        entry = {"kind": "int4" if isinstance(m, Int4WeightOnlyLinear) else "int8", "in_features": m.in_features,
                 "out_features": m.out_features, "bias": m.bias is not None,
                 "act_dtype": str(m.act_dtype).removeprefix("torch.")}
        if isinstance(m, Int4WeightOnlyLinear):
            entry["group_size"] = m.group_size
        index["layers"][name] = entry
    names = {id(m): n for n, m in layers.items()}
    index["embeddings"] = {}
    for name, e in embeddings.items():
        src = e.packed
        entry = {"kind": "int4" if isinstance(src, Int4WeightOnlyLinear) else "int8",
                 "num_embeddings": e.num_embeddings, "embedding_dim": e.embedding_dim,
                 "act_dtype": str(src.act_dtype).removeprefix("torch."), "out_dtype": str(e.out_dtype).removeprefix("torch."),
                 "embed_scale": e.embed_scale, "padding_idx": e.padding_idx,
                 "tied_to": names.get(id(src)) if e.tied else None}
        if e.tied and entry["tied_to"] is None:
            raise ValueError(f"the packed embedding {name!r} reads a head that is not a packed layer of this model")
        if isinstance(src, Int4WeightOnlyLinear):
            entry["group_size"] = src.group_size
        index["embeddings"][name] = entry
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(str(folder))
    torch.save(model.state_dict(), folder / PACKED_FILE)
    (folder / PACKED_INDEX).write_text(json.dumps(index, indent=1))
    return folder


def load_packed(folder: str | Path, base: nn.Module | None = None) -> nn.Module:
    """Rebuild a model written by :func:`save_packed`; returns it in eval mode.

    ``base``: a float model of the same architecture to load into (changed in place), needed for models that are
    not Hugging Face models; by default the architecture comes from the saved config and model class (weights are
    initialized and then overwritten, so this costs one model construction).
    """
    import importlib
    import json

    folder = Path(folder)
    if not (folder / PACKED_INDEX).is_file():
        raise FileNotFoundError(f"{folder} has no {PACKED_INDEX}; it was not written by qlib.quant.kernels.save_packed")
    index = json.loads((folder / PACKED_INDEX).read_text())
    if index.get("format") != 1:
        raise ValueError(f"{folder / PACKED_INDEX} has format {index.get('format')!r}; this qlib reads format 1")
    if base is None:
        if not (folder / "config.json").is_file():
            raise ValueError(f"{folder} holds no config.json (the model was not a Hugging Face model); pass base=, a "
                             "float model of the same architecture")
        from transformers import AutoConfig

        module_name, _, cls_name = index["model_class"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), cls_name)
        config = AutoConfig.from_pretrained(str(folder))
        base = cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
    def empty(kind: str, k: int, n: int, group: int | None, bias: bool, dtype: torch.dtype) -> nn.Module:
        if kind == "int4":
            return Int4WeightOnlyLinear(k, n, group, bias, dtype)
        return Int8WeightOnlyLinear(k, n, bias, dtype)

    embeddings = index.get("embeddings", {})
    for name, e in index["layers"].items():
        set_module(base, name, empty(e["kind"], e["in_features"], e["out_features"], e.get("group_size"), e["bias"],
                                     _DTYPES[e["act_dtype"]]))
    for name, e in embeddings.items():
        if e["tied_to"] is not None:
            src = base.get_submodule(e["tied_to"])
        else:
            src = empty(e["kind"], e["embedding_dim"], e["num_embeddings"], e.get("group_size"), False,
                        _DTYPES[e["act_dtype"]])
        out_dtype = getattr(torch, e["out_dtype"])
        set_module(base, name, PackedEmbedding(src, tied=e["tied_to"] is not None, embed_scale=e["embed_scale"],
                                               out_dtype=out_dtype, padding_idx=e["padding_idx"]))
    state = torch.load(folder / PACKED_FILE, map_location="cpu", weights_only=True)
    base.load_state_dict(state, strict=True)  # int4 layers check the CPU capability here
    _guard_save_pretrained(base)
    return base.eval()


# --------------------------------------------------------------------------------------------------
# torch.ao dynamic INT8


def torch_dynamic_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with ``nn.Linear`` and ``nn.LSTM`` under ``torch.ao.quantization.quantize_dynamic`` (qint8).

    Weights int8 per tensor, activations quantized per tensor at run time (fbgemm/x86). torch.ao's eager
    quantization is deprecated: its DeprecationWarning is silenced here and logged once at INFO level; the
    successor is torchao (``torchao.quantization.quantize_(model, Int8DynamicActivationInt8WeightConfig())``).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear, nn.LSTM}, dtype=torch.qint8, inplace=False)
    for w in caught:
        if issubclass(w.category, DeprecationWarning) and "torch.ao.quantization" in str(w.message):
            log.info("torch.ao.quantization.quantize_dynamic is deprecated (torchao replaces it): %s",
                     str(w.message).splitlines()[0])
            break
    for w in caught:  # pass on anything else
        if not (issubclass(w.category, DeprecationWarning) or "quantized tensor creation" in str(w.message)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return quantized


# --------------------------------------------------------------------------------------------------
# bytes


def _tensors_in(value: Any) -> list[Tensor]:
    """Plain tensors whose bytes store ``value``: quantized tensors as int data + scales/zero points, packed
    torch.ao params (ScriptObjects) through their ``__getstate__``, tuples and lists item by item."""
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors_in(item)]
    if isinstance(value, torch.ScriptObject):
        return _tensors_in(value.__getstate__()) if hasattr(value, "__getstate__") else []
    if not isinstance(value, Tensor):
        return []
    if value.is_quantized:
        if value.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            return [value.int_repr(), torch.tensor([value.q_scale()]), torch.tensor([value.q_zero_point()])]
        return [value.int_repr(), value.q_per_channel_scales(), value.q_per_channel_zero_points()]
    return [value]


def packed_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer in ``model``'s state dict, packed weights, scales and zeros included.

    Tied tensors count once; torch.ao dynamic modules count their packed int8 weights, scales and biases.
    This is the tensor payload a state-dict file holds (safetensors adds a small header).
    """
    seen: set[tuple] = set()
    alive: list[Tensor] = []  # keep every counted tensor referenced: a freed temporary's address can be reused,
    total = 0                 # and an address-based key would then wrongly count a new tensor as already seen
    for value in model.state_dict(keep_vars=True).values():
        for t in _tensors_in(value):
            alive.append(t)
            try:
                key: tuple = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            except (RuntimeError, NotImplementedError):
                key = ("id", id(t))
            if t.numel() and key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def embedding_only_bytes(model: nn.Module) -> int:
    """Bytes held by the input token embedding alone (not shared with the head): what a decoded token does not read
    in full, since a lookup reads one row. 0 for an embedding tied to the head (float, or a PackedEmbedding reading
    the packed head); the packed copy's bytes for an untied PackedEmbedding; the float table's otherwise."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        return 0
    if isinstance(emb, PackedEmbedding):
        return 0 if emb.tied else packed_bytes(emb.source)
    weight = getattr(emb, "weight", None)
    if weight is None:
        return 0
    shared = any(p is weight for n, m in model.named_modules() if m is not emb for p in m.parameters(recurse=False))
    return 0 if shared else weight.numel() * weight.element_size()
