"""Where each model family keeps its blocks, norms and projections: a small table, not isinstance chains.

GPTQ reads ``sequential`` (the true-sequential groups of linears inside a block, in the order the block uses
them) and AWQ reads ``scale_groups`` (llm-awq's ``auto_scale`` groups: an op whose output feeds only some
linears, so a per-channel scale can move from those linears' inputs into that op). Names are relative to
one block. Supporting a new family is one more ``ArchSpec`` row in ``ARCHS``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ScaleGroup:
    """AWQ scale group: ``prev`` (a norm or linear) feeds ``linears``; ``inspect`` is the submodule whose output is scored."""

    prev: str
    linears: tuple[str, ...]
    inspect: str | None = None  # "" or None: the linears' own outputs are scored


@dataclass(frozen=True)
class ArchSpec:
    """Layout of one model family: block list, GPTQ sequential groups, AWQ scale groups."""

    family: str
    model_types: tuple[str, ...]
    blocks: str  # dotted path of the ModuleList of blocks from the task model (e.g. LlamaForCausalLM)
    sequential: tuple[tuple[str, ...], ...]
    scale_groups: tuple[ScaleGroup, ...]
    transposed: bool = False  # GPT-2 Conv1D stores weight as [in, out]
    norm_weight_offset: float = 0.0  # Gemma RMSNorm multiplies by (offset + weight): scale (offset + w), not w

    @property
    def linears(self) -> tuple[str, ...]:
        """Every quantizable linear of a block, in sequential order."""
        return tuple(n for group in self.sequential for n in group)


_LLAMA_LIKE = dict(
    sequential=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
)
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")

ARCHS: tuple[ArchSpec, ...] = (
    ArchSpec(
        family="llama",
        model_types=("llama", "mistral", "qwen2"),
        blocks="model.layers",
        **_LLAMA_LIKE,
        scale_groups=(
            ScaleGroup("input_layernorm", _QKV, "self_attn"),
            ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),  # only when v_proj out == o_proj in (no GQA)
            ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
            ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
        ),
    ),
    ArchSpec(
        family="gemma3",
        model_types=("gemma3_text", "gemma3"),
        blocks="model.layers",  # Gemma3ForConditionalGeneration: model.language_model.layers (found by get_blocks)
        **_LLAMA_LIKE,
        scale_groups=(  # Gemma's post_attention_layernorm sits AFTER o_proj; pre_feedforward_layernorm feeds the MLP
            ScaleGroup("input_layernorm", _QKV, "self_attn"),
            ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),
            ScaleGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
            ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
        ),
        norm_weight_offset=1.0,
    ),
    ArchSpec(
        family="bert",
        model_types=("bert",),
        blocks="bert.encoder.layer",  # BertModel itself: encoder.layer (found by get_blocks)
        sequential=(("attention.self.query", "attention.self.key", "attention.self.value"),
                    ("attention.output.dense",), ("intermediate.dense",), ("output.dense",)),
        # post-LN: each LayerNorm also feeds the residual, so only v -> attention-output is a valid scale group
        scale_groups=(ScaleGroup("attention.self.value", ("attention.output.dense",)),),
    ),
    ArchSpec(
        family="gpt2",
        model_types=("gpt2",),
        blocks="transformer.h",
        sequential=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        scale_groups=(ScaleGroup("ln_1", ("attn.c_attn",), "attn"), ScaleGroup("ln_2", ("mlp.c_fc",), "mlp")),
        transposed=True,
    ),
)


def supported_model_types() -> tuple[str, ...]:
    """Every ``config.model_type`` the table knows."""
    return tuple(t for spec in ARCHS for t in spec.model_types)


def arch_of(model: nn.Module) -> ArchSpec:
    """The ``ArchSpec`` of ``model``, looked up by ``model.config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for spec in ARCHS:
        if model_type in spec.model_types:
            return spec
    names = ", ".join(f"{s.family} ({'/'.join(s.model_types)})" for s in ARCHS)
    raise ValueError(f"model_type {model_type!r} of {type(model).__name__} is not in qlib.methods.arch's table; supported "
                     f"families: {names}; add an ArchSpec row to qlib.methods.arch.ARCHS for a new family")


def blocks_path(model: nn.Module, spec: ArchSpec) -> str:
    """Dotted path of the block ModuleList in ``model`` (the table's path, or it under/without the base-model prefix)."""
    head, _, rest = spec.blocks.partition(".")
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [spec.blocks, rest, f"model.language_model.{spec.blocks.rsplit('.', 1)[-1]}"]
    if prefix:
        candidates.insert(1, f"{prefix}.{rest}")
    for path in dict.fromkeys(c for c in candidates if c):
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList):
            return path
    raise ValueError(f"{type(model).__name__} has no block list at {spec.blocks!r} (tried {candidates}); "
                     f"fix the '{spec.family}' row of qlib.methods.arch.ARCHS for this model class")


def get_blocks(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    """The ModuleList of transformer blocks of ``model``."""
    return model.get_submodule(blocks_path(model, spec))


def linear_weight(module: nn.Module, spec: ArchSpec) -> Tensor:
    """The weight of a linear as [out, in] (a view; GPT-2 Conv1D's [in, out] is transposed)."""
    return module.weight.t() if spec.transposed else module.weight


def set_linear_weight(module: nn.Module, weight: Tensor, spec: ArchSpec) -> None:
    """Copy an [out, in] ``weight`` into ``module`` in place (transposed back for GPT-2 Conv1D)."""
    target = module.weight
    new = weight.t() if spec.transposed else weight
    if tuple(new.shape) != tuple(target.shape):
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit {type(module).__name__} with weight "
                         f"{tuple(target.shape)}; pass an [out, in] tensor of this layer")
    with torch.no_grad():
        target.copy_(new.to(target.dtype))


def out_in_features(module: nn.Module, spec: ArchSpec) -> tuple[int, int]:
    """(out_features, in_features) of a linear or Conv1D."""
    out_f, in_f = linear_weight(module, spec).shape
    return int(out_f), int(in_f)


def scale_groups_for(block: nn.Module, spec: ArchSpec) -> tuple[ScaleGroup, ...]:
    """The scale groups that apply to this block: a linear ``prev`` must output exactly what the linears take in.

    This drops llama's v_proj -> o_proj under grouped-query attention (v_proj is narrower than o_proj's input),
    as llm-awq does.
    """
    keep = []
    for g in spec.scale_groups:
        prev = block.get_submodule(g.prev)
        if _is_linear(prev, spec):
            width = out_in_features(prev, spec)[0]
            if any(out_in_features(block.get_submodule(n), spec)[1] != width for n in g.linears):
                continue
        keep.append(g)
    return tuple(keep)


def _is_linear(module: nn.Module, spec: ArchSpec) -> bool:
    """True for nn.Linear (and transformers' Conv1D in a transposed family)."""
    return isinstance(module, nn.Linear) or (spec.transposed and type(module).__name__ == "Conv1D")


def block_linears(block: nn.Module, spec: ArchSpec) -> dict[str, nn.Module]:
    """``{name: module}`` of the block's linears in sequential order (names relative to the block)."""
    return {n: block.get_submodule(n) for n in spec.linears}
