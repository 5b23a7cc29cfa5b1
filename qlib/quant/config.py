"""Quantization configs: frozen dataclasses that validate themselves, one per method (pytorch/ao style).

Every config derives from ``QuantConfig``; ``qlib.quant.api.quantize_`` dispatches on the config's class to the
handler registered for it. ``tag`` names a config in file names (gpt-fast style: ``rtn.w4.g128.sym``).

Configs that share a grid share a base: ``WeightOnlyConfig`` (bits, group size, symmetry, observer, pad) under
``RTNConfig`` here and ``GPTQConfig`` / ``AWQConfig`` in ``qlib.methods``; ``FakeQuantConfig`` (weight and input
fake-quant) under ``QATConfig`` and ``CNNConfig``. A method's config lives next to its handler, so a config never
exists without its handler registered.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from qlib.quant.primitives import MAX_BITS, MIN_BITS, OBSERVERS, Granularity, check_bits


def check_group_size(group_size: int | None, what: str = "group_size") -> None:
    """Raise ValueError unless ``group_size`` is None (per-channel), -1 (per-tensor) or a positive int."""
    ok = group_size is None or (isinstance(group_size, int) and not isinstance(group_size, bool)
                                and (group_size == -1 or group_size > 0))
    if not ok:
        raise ValueError(f"{what}={group_size!r} is invalid; use None for per-channel, -1 for per-tensor, "
                         "or a positive group size such as 128")


def check_observer(observer: str, what: str = "observer") -> None:
    """Raise ValueError unless ``observer`` is a known observer name."""
    if observer not in OBSERVERS:
        raise ValueError(f"{what}={observer!r} is unknown; use one of {', '.join(OBSERVERS)}")


def granularity_of(group_size: int | None) -> Granularity:
    """Primitives' granularity for a config group size: None -> 'channel', -1 -> 'tensor', g -> g."""
    return "channel" if group_size is None else ("tensor" if group_size == -1 else group_size)


def group_tag(group_size: int | None) -> str:
    """Short file-name tag of a group size: 'ch', 't' or 'g128'."""
    return "ch" if group_size is None else ("t" if group_size == -1 else f"g{group_size}")


@dataclass(frozen=True)
class QuantConfig:
    """Base class of every quantization config; subclasses validate in ``__post_init__`` and have a handler."""

    targets: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear,)  # module types quantize_ offers to filter_fn

    @property
    def tag(self) -> str:
        """Short name for file names."""
        return type(self).__name__.removesuffix("Config").lower()


def check_int(value: int, name: str, low: int, hint: str) -> None:
    """Raise ValueError unless ``value`` is an int >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}; {hint}")


def check_flags(config: object, *names: str) -> None:
    """Raise ValueError unless each named field of ``config`` is a bool."""
    for name in names:
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{name}={getattr(config, name)!r} is invalid; use True or False")


@dataclass(frozen=True)
class WeightOnlyConfig(QuantConfig):
    """The weight grid every weight-only method shares: bits, group size, symmetry, range observer, short last group.

    Subclasses (RTN, GPTQ, AWQ) add their own fields after these and call ``super().__post_init__()``.
    """

    bits: int = 4
    group_size: int | None = 128  # None = per-channel, -1 = per-tensor
    symmetric: bool = True
    observer: str = "minmax"
    pad: bool = False  # allow a group size not dividing K: a shorter last group (576 = 4 x 128 + 64), as GPTQ does

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_group_size(self.group_size)
        check_observer(self.observer)
        check_flags(self, "symmetric", "pad")

    @property
    def granularity(self) -> Granularity:
        """Granularity in ``qlib.quant.primitives`` terms."""
        return granularity_of(self.group_size)

    def grid_tag(self, method: str) -> str:
        """``method.w4.g128.sym`` (observer added when not min-max): the grid part of every weight-only tag."""
        obs = "" if self.observer == "minmax" else f".{self.observer}"
        return f"{method}.w{self.bits}.{group_tag(self.group_size)}.{'sym' if self.symmetric else 'asym'}{obs}"


@dataclass(frozen=True)
class RTNConfig(WeightOnlyConfig):
    """Weight-only round-to-nearest fake-quant (accuracy only; real packed kernels live in ``qlib.quant.kernels``)."""

    @property
    def tag(self) -> str:
        """E.g. ``rtn.w4.g128.sym`` (observer added when not min-max)."""
        return self.grid_tag("rtn")


WEIGHT_GRANULARITIES = ("tensor", "channel")


@dataclass(frozen=True)
class FakeQuantConfig(QuantConfig):
    """The grid of weight-and-input fake-quant modules (QAT, CNN PTQ): weight bits / granularity / symmetry, input bits.

    Weights per tensor or per output channel; inputs per tensor from a calibrated range (``act_bits=None``: weight-only).
    """

    weight_bits: int = 4
    weight_granularity: str = "tensor"  # "tensor" or "channel" (per output channel)
    weight_symmetric: bool = True
    act_bits: int | None = 8  # None: weight-only
    act_symmetric: bool = False

    targets: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, nn.Conv2d)  # subclasses included (TF "same" convs)

    def __post_init__(self) -> None:
        check_bits(self.weight_bits)
        if self.act_bits is not None:
            check_bits(self.act_bits)
        if self.weight_granularity not in WEIGHT_GRANULARITIES:
            raise ValueError(f"weight_granularity={self.weight_granularity!r} is unknown; use 'tensor' or 'channel'")
        check_flags(self, "weight_symmetric", "act_symmetric")


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
        check_observer(self.act_observer, "act_observer")
        if self.act_mode == "dynamic" and self.act_observer != "minmax":
            raise ValueError(f"act_observer={self.act_observer!r} only applies to static calibration; "
                             "dynamic mode uses min-max on every call, so leave act_observer='minmax'")
        for name in ("weight_bits", "act_bits"):
            bits = getattr(self, name)
            if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
                raise ValueError(f"{name}={bits!r} is outside the supported range {MIN_BITS}..{MAX_BITS}; "
                                 f"pick an integer from {MIN_BITS} to {MAX_BITS}")
        check_group_size(self.weight_group_size, "weight_group_size")

    @property
    def weight_granularity(self) -> Granularity:
        """Weight granularity in ``qlib.quant.primitives`` terms."""
        return granularity_of(self.weight_group_size)

    @property
    def tag(self) -> str:
        """E.g. ``w8a8.dynamic.t.asym`` (weight/activation bits in the name when not 8)."""
        act = f"{self.act_mode}.{'tok' if self.act_granularity == 'token' else 't'}.{'sym' if self.act_symmetric else 'asym'}"
        obs = "" if self.act_observer == "minmax" else f".{self.act_observer}"
        wg = "" if self.weight_group_size is None else f".{group_tag(self.weight_group_size)}"
        return f"w{self.weight_bits}a{self.act_bits}.{act}{obs}{wg}{'' if self.weight_symmetric else '.wasym'}"
