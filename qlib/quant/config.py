"""Quantization configs: frozen dataclasses that validate themselves, one per method (pytorch/ao style).

Every config derives from ``QuantConfig``; ``qlib.quant.api.quantize_`` dispatches on the config's class to the
handler registered for it. ``tag`` names a config in file names (gpt-fast style: ``rtn.w4.g128.sym``).
"""
from __future__ import annotations

from dataclasses import dataclass

from qlib.quant.primitives import MAX_BITS, MIN_BITS, OBSERVERS, Granularity, check_bits


def _check_group_size(group_size: int | None, what: str = "group_size") -> None:
    """Raise ValueError unless ``group_size`` is None (per-channel), -1 (per-tensor) or a positive int."""
    ok = group_size is None or (isinstance(group_size, int) and not isinstance(group_size, bool)
                                and (group_size == -1 or group_size > 0))
    if not ok:
        raise ValueError(f"{what}={group_size!r} is invalid; use None for per-channel, -1 for per-tensor, "
                         "or a positive group size such as 128")


def _check_observer(observer: str, what: str = "observer") -> None:
    """Raise ValueError unless ``observer`` is a known observer name."""
    if observer not in OBSERVERS:
        raise ValueError(f"{what}={observer!r} is unknown; use one of {', '.join(OBSERVERS)}")


def granularity_of(group_size: int | None) -> Granularity:
    """Primitives' granularity for a config group size: None -> 'channel', -1 -> 'tensor', g -> g."""
    return "channel" if group_size is None else ("tensor" if group_size == -1 else group_size)


def _group_tag(group_size: int | None) -> str:
    """Short file-name tag of a group size: 'ch', 't' or 'g128'."""
    return "ch" if group_size is None else ("t" if group_size == -1 else f"g{group_size}")


@dataclass(frozen=True)
class QuantConfig:
    """Base class of every quantization config; subclasses validate in ``__post_init__`` and have a handler."""

    @property
    def tag(self) -> str:
        """Short name for file names."""
        return type(self).__name__.removesuffix("Config").lower()


@dataclass(frozen=True)
class RTNConfig(QuantConfig):
    """Weight-only round-to-nearest fake-quant (accuracy only; real packed kernels live in ``qlib.quant.kernels``)."""

    bits: int = 4
    group_size: int | None = 128  # None = per-channel, -1 = per-tensor
    symmetric: bool = True
    observer: str = "minmax"
    pad: bool = False  # allow a group size not dividing K: a shorter last group (576 = 4 x 128 + 64), as GPTQ does

    def __post_init__(self) -> None:
        check_bits(self.bits)
        _check_group_size(self.group_size)
        _check_observer(self.observer)
        if not isinstance(self.pad, bool):
            raise ValueError(f"pad={self.pad!r} is invalid; use True (shorter last group) or False")

    @property
    def granularity(self) -> Granularity:
        """Granularity in ``qlib.quant.primitives`` terms."""
        return granularity_of(self.group_size)

    @property
    def tag(self) -> str:
        """E.g. ``rtn.w4.g128.sym`` (observer added when not min-max)."""
        obs = "" if self.observer == "minmax" else f".{self.observer}"
        return f"rtn.w{self.bits}.{_group_tag(self.group_size)}.{'sym' if self.symmetric else 'asym'}{obs}"


ACT_MODES = ("dynamic", "static")
ACT_GRANULARITIES = ("tensor", "token")


@dataclass(frozen=True)
class W8A8Config(QuantConfig):
    """Weights and input activations of each linear fake-quantized to integers (accuracy only, not speed).

    Weights: quant-dequantized once (default per-channel symmetric 8-bit). Activations: ``dynamic`` computes
    min-max qparams on every call (per-tensor or per-token); ``static`` freezes per-tensor qparams observed on
    calibration data (``act_observer``), so ``quantize_`` needs ``calib``.
    """

    act_mode: str = "dynamic"
    act_symmetric: bool = False
    act_granularity: str = "tensor"
    weight_bits: int = 8
    weight_symmetric: bool = True
    weight_group_size: int | None = None  # None = per-channel, -1 = per-tensor
    act_bits: int = 8
    act_observer: str = "minmax"

    def __post_init__(self) -> None:
        if self.act_mode not in ACT_MODES:
            raise ValueError(f"act_mode={self.act_mode!r} is unknown; use 'dynamic' or 'static'")
        if self.act_granularity not in ACT_GRANULARITIES:
            raise ValueError(f"act_granularity={self.act_granularity!r} is unknown; use 'tensor' or 'token'")
        if self.act_mode == "static" and self.act_granularity == "token":
            raise ValueError("static activation scales cannot be per-token (tokens differ at run time); "
                             "use act_granularity='tensor' or act_mode='dynamic'")
        _check_observer(self.act_observer, "act_observer")
        if self.act_mode == "dynamic" and self.act_observer != "minmax":
            raise ValueError(f"act_observer={self.act_observer!r} only applies to static calibration; "
                             "dynamic mode uses min-max on every call, so leave act_observer='minmax'")
        for name in ("weight_bits", "act_bits"):
            bits = getattr(self, name)
            if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
                raise ValueError(f"{name}={bits!r} is outside the supported range {MIN_BITS}..{MAX_BITS}; "
                                 f"pick an integer from {MIN_BITS} to {MAX_BITS}")
        _check_group_size(self.weight_group_size, "weight_group_size")

    @property
    def weight_granularity(self) -> Granularity:
        """Weight granularity in ``qlib.quant.primitives`` terms."""
        return granularity_of(self.weight_group_size)

    @property
    def tag(self) -> str:
        """E.g. ``w8a8.dynamic.t.asym`` (weight/activation bits in the name when not 8)."""
        act = f"{self.act_mode}.{'tok' if self.act_granularity == 'token' else 't'}.{'sym' if self.act_symmetric else 'asym'}"
        obs = "" if self.act_observer == "minmax" else f".{self.act_observer}"
        wg = "" if self.weight_group_size is None else f".{_group_tag(self.weight_group_size)}"
        return f"w{self.weight_bits}a{self.act_bits}.{act}{obs}{wg}{'' if self.weight_symmetric else '.wasym'}"


@dataclass(frozen=True)
class GPTQConfig(QuantConfig):
    """GPTQ (Frantar et al. 2022) weight-only quantization of the linears inside transformer blocks; needs ``calib``.

    ``percdamp`` is the damping added to the Hessian diagonal as a fraction of its mean; ``block_size`` is the
    lazy-update column block; ``act_order`` quantizes columns by descending Hessian diagonal; ``static_groups``
    fixes each group's qparams up front from the unpermuted weight (so act_order keeps contiguous groups).
    """

    bits: int = 4
    group_size: int | None = 128  # None = per-channel, -1 = per-tensor
    symmetric: bool = True
    act_order: bool = False
    static_groups: bool = False
    percdamp: float = 0.01
    block_size: int = 128
    true_sequential: bool = True
    pad: bool = True  # group size not dividing K: a shorter last group, as the reference does
    observer: str = "minmax"  # "mse" is the reference's --mse grid search

    def __post_init__(self) -> None:
        check_bits(self.bits)
        _check_group_size(self.group_size)
        _check_observer(self.observer)
        for name in ("symmetric", "act_order", "static_groups", "true_sequential", "pad"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; use True or False")
        if isinstance(self.percdamp, bool) or not isinstance(self.percdamp, (int, float)) or not 0 <= self.percdamp <= 1:
            raise ValueError(f"percdamp={self.percdamp!r} must be a fraction in [0, 1]; 0.01 is the paper's choice")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size={self.block_size!r} must be a positive int; 128 is the paper's choice")
        if self.static_groups and (self.group_size is None or self.group_size == -1):
            raise ValueError("static_groups=True needs a positive group_size (e.g. 128); per-channel and per-tensor "
                             "qparams are static already")

    @property
    def granularity(self) -> Granularity:
        """Granularity in ``qlib.quant.primitives`` terms."""
        return granularity_of(self.group_size)

    @property
    def tag(self) -> str:
        """E.g. ``gptq.w4.g128.sym`` (``.act`` for act_order, ``.static`` for static groups)."""
        extra = (".act" if self.act_order else "") + (".static" if self.static_groups else "")
        obs = "" if self.observer == "minmax" else f".{self.observer}"
        return f"gptq.w{self.bits}.{_group_tag(self.group_size)}.{'sym' if self.symmetric else 'asym'}{extra}{obs}"


def _check_int(value: int, name: str, low: int, hint: str) -> None:
    """Raise ValueError unless ``value`` is an int >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}; {hint}")


@dataclass(frozen=True)
class AWQConfig(QuantConfig):
    """AWQ (Lin et al. 2023) weight-only quantization of the linears inside transformer blocks; needs ``calib``.

    ``n_grid`` scale ratios in [0, 1); ``clip`` searches a clip value per output row and group over
    ``int(max_shrink * clip_grid)`` shrink steps on ``n_clip_tokens`` tokens (llm-awq's defaults throughout).
    """

    bits: int = 4
    group_size: int | None = 128  # None = per-channel (per-tensor is not supported)
    symmetric: bool = False  # AWQ's default: zero-point quantization
    n_grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    pad: bool = True  # group size not dividing K: a shorter last group
    n_clip_tokens: int = 512

    def __post_init__(self) -> None:
        check_bits(self.bits)
        _check_group_size(self.group_size)
        if self.group_size == -1:
            raise ValueError("AWQ quantizes per group or per channel, not per tensor; use group_size=128 or None")
        for name in ("symmetric", "clip", "pad"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; use True or False")
        _check_int(self.n_grid, "n_grid", 1, "20 is llm-awq's grid (1 gives ratio 0 only: plain RTN)")
        _check_int(self.clip_grid, "clip_grid", 1, "20 is llm-awq's grid")
        _check_int(self.n_clip_tokens, "n_clip_tokens", 1, "512 is llm-awq's choice")
        if isinstance(self.max_shrink, bool) or not isinstance(self.max_shrink, (int, float)) or not 0 <= self.max_shrink < 1:
            raise ValueError(f"max_shrink={self.max_shrink!r} must lie in [0, 1); 0.5 is llm-awq's choice")

    @property
    def granularity(self) -> Granularity:
        """Granularity in ``qlib.quant.primitives`` terms."""
        return granularity_of(self.group_size)

    @property
    def tag(self) -> str:
        """E.g. ``awq.w4.g128.asym`` (``.noclip`` without the clip search)."""
        return f"awq.w{self.bits}.{_group_tag(self.group_size)}.{'sym' if self.symmetric else 'asym'}{'' if self.clip else '.noclip'}"
