"""Where each model family keeps its blocks, norms and projections: a small table, not isinstance chains.

GPTQ reads ``sequential`` (the true-sequential groups of linears inside a block, in the order the block uses
them) and AWQ reads ``scale_groups`` (llm-awq's ``auto_scale`` groups: an op whose output feeds only some
linears, so a per-channel scale can move from those linears' inputs into that op). Names are relative to
one block. Supporting a new family is one more ``ArchSpec`` row in ``ARCHS``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qlib.quant.modules import is_conv1d, is_linear, weight_out_in

# Every family's ``sequential`` lists these four groups in this order, so a role names the same layers in any family.
ROLES = ("attn_in", "attn_out", "mlp_in", "mlp_out")
ROLE_UNIONS = {"attention": ("attn_in", "attn_out"), "mlp": ("mlp_in", "mlp_out")}


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
    sequential: tuple[tuple[str, ...], ...]  # one group per role in ROLES: attention in, attention out, MLP in, MLP out
    scale_groups: tuple[ScaleGroup, ...]
    transposed: bool = False  # GPT-2 Conv1D stores weight as [in, out] (the helpers detect Conv1D by its type)
    norm_weight_offset: float = 0.0  # Gemma RMSNorm multiplies by (offset + weight): scale (offset + w), not w
    embedding: str = ""  # dotted path of the token embedding from the task model
    head: tuple[str, ...] = ()  # dotted paths of the linears after the blocks (LM head, or pooler + classifier)
    models: str = ""  # the models people know this row by, for the README's table

    def __post_init__(self) -> None:
        if len(self.sequential) != len(ROLES):
            raise ValueError(f"the '{self.family}' row has {len(self.sequential)} sequential groups; list exactly "
                             f"{len(ROLES)}, one per role {ROLES}")

    @property
    def linears(self) -> tuple[str, ...]:
        """Every quantizable linear of a block, in sequential order."""
        return tuple(n for group in self.sequential for n in group)

    def role_linears(self, role: str) -> tuple[str, ...]:
        """Block-relative names of one role's linears: a name in ``ROLES`` or ``ROLE_UNIONS`` ("attention", "mlp")."""
        if role in ROLE_UNIONS:
            return tuple(n for r in ROLE_UNIONS[role] for n in self.role_linears(r))
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; pick one of {ROLES + tuple(ROLE_UNIONS)}")
        return self.sequential[ROLES.index(role)]


_LLAMA_LIKE = dict(
    sequential=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
)
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_BERT_LIKE = dict(
    sequential=(("attention.self.query", "attention.self.key", "attention.self.value"),
                ("attention.output.dense",), ("intermediate.dense",), ("output.dense",)),
    # post-LN: each LayerNorm also feeds the residual, so only v -> attention-output is a valid scale group
    scale_groups=(ScaleGroup("attention.self.value", ("attention.output.dense",)),),
)

ARCHS: tuple[ArchSpec, ...] = (
    ArchSpec(
        family="llama",  # Llama (SmolLM2, TinyLlama), Mistral, Qwen2, Qwen3 (q_norm/k_norm sit after q/k: no effect here)
        embedding="model.embed_tokens", head=("lm_head",), models="Llama, SmolLM2, TinyLlama, Mistral, Qwen2, Qwen3",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
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
        embedding="model.embed_tokens", head=("lm_head",), models="Gemma-3 (text)",
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
        family="phi3",
        embedding="model.embed_tokens", head=("lm_head",), models="Phi-3",
        model_types=("phi3",),
        blocks="model.layers",
        sequential=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
        # fused qkv_proj / gate_up_proj: only their v / up halves feed o_proj / down_proj, so no linear -> linear group
        scale_groups=(ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
                      ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp")),
    ),
    ArchSpec(
        family="opt",
        embedding="model.decoder.embed_tokens", head=("lm_head",), models="OPT",
        model_types=("opt",),
        blocks="model.decoder.layers",
        sequential=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",),
                    ("fc1",), ("fc2",)),
        scale_groups=(  # llm-awq's OPT groups; fc1 -> fc2 is exact through ReLU (relu(x / s) = relu(x) / s for s > 0)
            ScaleGroup("self_attn_layer_norm", _QKV, "self_attn"),
            ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",)),
            ScaleGroup("final_layer_norm", ("fc1",)),
            ScaleGroup("fc1", ("fc2",)),
        ),
    ),
    ArchSpec(
        family="gpt_neox",  # GPT-NeoX, Pythia
        embedding="gpt_neox.embed_in", head=("lm_head",), models="GPT-NeoX, Pythia",
        model_types=("gpt_neox",),
        blocks="gpt_neox.layers",
        sequential=(("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",),
                    ("mlp.dense_4h_to_h",)),
        # parallel residual or not, each norm feeds only its own branch; the fused qkv and the GELU between the MLP
        # linears leave no exact linear -> linear group
        scale_groups=(ScaleGroup("input_layernorm", ("attention.query_key_value",), "attention"),
                      ScaleGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",), "mlp")),
    ),
    ArchSpec(
        family="gpt2",
        embedding="transformer.wte", head=("lm_head",), models="GPT-2",
        model_types=("gpt2",),
        blocks="transformer.h",
        sequential=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        scale_groups=(ScaleGroup("ln_1", ("attn.c_attn",), "attn"), ScaleGroup("ln_2", ("mlp.c_fc",), "mlp")),
        transposed=True,
    ),
    ArchSpec(family="bert", model_types=("bert",), blocks="bert.encoder.layer", **_BERT_LIKE,  # BertModel: encoder.layer
             embedding="bert.embeddings.word_embeddings", head=("bert.pooler.dense", "classifier"),
             models="BERT, MiniLM"),
    ArchSpec(family="roberta", model_types=("roberta", "xlm-roberta"), blocks="roberta.encoder.layer", **_BERT_LIKE,
             embedding="roberta.embeddings.word_embeddings", head=("classifier.dense", "classifier.out_proj"),
             models="RoBERTa, XLM-RoBERTa"),
    ArchSpec(
        family="distilbert",
        embedding="distilbert.embeddings.word_embeddings", head=("pre_classifier", "classifier"), models="DistilBERT",
        model_types=("distilbert",),
        blocks="distilbert.transformer.layer",
        sequential=(("attention.q_lin", "attention.k_lin", "attention.v_lin"), ("attention.out_lin",),
                    ("ffn.lin1",), ("ffn.lin2",)),
        scale_groups=(ScaleGroup("attention.v_lin", ("attention.out_lin",)),),  # post-LN, as BERT
    ),
)


def family_table() -> str:
    """The architecture table as Markdown, one row per family (the README's "Run it on your model" shows it)."""
    def code(names: Iterable[str]) -> str:
        return ", ".join(f"`{n}`" for n in names) or "—"

    rows = ["| family | models | `model_type` | embedding | blocks | attention in → out | MLP in → out | head "
            "| AWQ scale groups (norm or linear → linears) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for spec in ARCHS:
        attn = f"{code(spec.role_linears('attn_in'))} → {code(spec.role_linears('attn_out'))}"
        mlp = f"{code(spec.role_linears('mlp_in'))} → {code(spec.role_linears('mlp_out'))}"
        groups = "; ".join(f"`{g.prev}` → {', '.join(f'`{x}`' for x in g.linears)}" for g in spec.scale_groups)
        notes = []
        if spec.transposed:
            notes.append("`Conv1D` weights [in, out]")
        if spec.norm_weight_offset:
            notes.append(f"norms scale by {spec.norm_weight_offset:g} + w")
        blocks = f"`{spec.blocks}`" + (f" ({'; '.join(notes)})" if notes else "")
        rows.append(f"| {spec.family} | {spec.models} | {code(spec.model_types)} | `{spec.embedding}` | {blocks} | "
                    f"{attn} | {mlp} | {code(spec.head)} | {groups} |")
    return "\n".join(rows) + "\n"


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
    raise ValueError(f"{type(model).__name__} has model_type {model_type!r}, which the architecture table does not know "
                     f"(it supports {names}); to add this family, append an ArchSpec row naming its block list, four "
                     f"sequential linear groups and AWQ scale groups to qlib.methods.arch.ARCHS")


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


def linear_weight(module: nn.Module, spec: ArchSpec | None = None) -> Tensor:
    """The weight of a linear as [out, in] (a view; GPT-2 Conv1D's [in, out] is transposed, found by module type)."""
    return weight_out_in(module)


def set_linear_weight(module: nn.Module, weight: Tensor, spec: ArchSpec | None = None) -> None:
    """Copy an [out, in] ``weight`` into ``module`` in place (transposed back for GPT-2 Conv1D)."""
    target = module.weight
    new = weight.t() if is_conv1d(module) else weight
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
    post_ln = getattr(block, "do_layer_norm_before", True) is False  # OPT-350m: its norms also feed the residual
    for g in spec.scale_groups:
        prev = block.get_submodule(g.prev)
        if post_ln and not _is_linear(prev, spec):
            continue
        if _is_linear(prev, spec):
            width = out_in_features(prev, spec)[0]
            if any(out_in_features(block.get_submodule(n), spec)[1] != width for n in g.linears):
                continue
        keep.append(g)
    return tuple(keep)


def _is_linear(module: nn.Module, spec: ArchSpec) -> bool:
    """True for nn.Linear and transformers' Conv1D."""
    return is_linear(module)


def block_linears(block: nn.Module, spec: ArchSpec) -> dict[str, nn.Module]:
    """``{name: module}`` of the block's linears in sequential order (names relative to the block)."""
    return {n: block.get_submodule(n) for n in spec.linears}


# --------------------------------------------------------------------------------------------------
# selecting and trimming blocks by the table, so callers never spell a family's module paths


def _block_indices(n_blocks: int, blocks: int | Iterable[int] | None) -> list[int]:
    """Block indices: all for None, the first ``blocks`` for an int, else the given indices."""
    if blocks is None:
        return list(range(n_blocks))
    if isinstance(blocks, int):
        if not 1 <= blocks <= n_blocks:
            raise ValueError(f"blocks={blocks} but the model has {n_blocks} blocks; pass 1..{n_blocks} or None for all")
        return list(range(blocks))
    idx = sorted(set(blocks))
    if not idx or idx[0] < 0 or idx[-1] >= n_blocks:
        raise ValueError(f"block indices {idx} are not within 0..{n_blocks - 1}; pass indices of existing blocks")
    return idx


def block_linear_names(model: nn.Module, blocks: int | Iterable[int] | None = None,
                       roles: str | Iterable[str] | None = None) -> list[str]:
    """Fully-qualified names of the table's linears in some blocks, in module order.

    ``blocks``: None for every block, an int N for the first N, or an iterable of block indices. ``roles``: None for
    every linear, or one or several of ``ROLES`` / ``ROLE_UNIONS`` (e.g. "mlp_out", the MLP down projection).
    """
    spec = arch_of(model)
    path = blocks_path(model, spec)
    idx = _block_indices(len(model.get_submodule(path)), blocks)
    names = spec.linears if roles is None else tuple(
        n for r in ([roles] if isinstance(roles, str) else roles) for n in spec.role_linears(r))
    wanted = {f"{path}.{i}.{n}" for i in idx for n in names}
    return [n for n, _ in model.named_modules() if n in wanted]


def block_filter(model: nn.Module, blocks: int | Iterable[int] | None = None,
                 roles: str | Iterable[str] | None = None) -> Callable[[nn.Module, str], bool]:
    """A ``filter_fn(module, fqn)`` for ``quantize_`` and friends that accepts ``block_linear_names(model, blocks, roles)``."""
    chosen = frozenset(block_linear_names(model, blocks, roles))
    return lambda module, fqn: fqn in chosen


def head_linear_names(model: nn.Module) -> list[str]:
    """Names of the linears outside the blocks: the task head (``lm_head``, or BERT's pooler and classifier)."""
    spec = arch_of(model)
    inside = blocks_path(model, spec) + "."
    return [n for n, m in model.named_modules() if _is_linear(m, spec) and not n.startswith(inside)]


def block_position(model: nn.Module, fqn: str) -> tuple[int, str]:
    """(block index, name inside the block) of a module inside the blocks, e.g. (3, "mlp.down_proj")."""
    path = blocks_path(model, arch_of(model))
    index, _, rest = fqn.removeprefix(path + ".").partition(".")
    if not fqn.startswith(path + ".") or not index.isdigit():
        raise ValueError(f"{fqn!r} is not inside the blocks of {type(model).__name__} ({path}.N...); pass a name from "
                         f"block_linear_names")
    return int(index), rest


def trim_blocks(model: nn.Module, n: int) -> nn.Module:
    """Keep only the first ``n`` blocks of ``model`` (in place), with the config's layer count and layer types to match."""
    spec = arch_of(model)
    path = blocks_path(model, spec)
    blocks = model.get_submodule(path)
    if not 1 <= n <= len(blocks):
        raise ValueError(f"cannot trim {type(model).__name__} to {n} blocks: it has {len(blocks)}; pass 1..{len(blocks)}")
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, blocks[:n])
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    config.num_hidden_layers = n  # GPT-2's config maps this name onto n_layer
    if isinstance(getattr(config, "layer_types", None), list):  # Gemma-3: one attention type per layer
        config.layer_types = config.layer_types[:n]
    return model

