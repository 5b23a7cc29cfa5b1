"""Every family of the architecture table on a tiny random model: table lookup and roles, RTN / W8A8 through
``quantize_``, GPTQ, AWQ, packing to INT8 / INT4 and the save_packed / load_packed round trip.

The models are built from configs here (no download): width 64, 2 blocks, a 97-token vocabulary.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import transformers as T
from torch import nn

from qlib.methods.arch import (ARCHS, ROLES, arch_of, block_filter, block_linear_names, blocks_path, get_blocks,
                               head_linear_names,
                               linear_weight, scale_groups_for, supported_model_types)
from qlib.lab.eval import evaluate_lm
from qlib.methods.awq import AWQConfig, fold_scales
from qlib.methods.gptq import GPTQConfig, packable
from qlib.methods.mixed import LayerOption, linear_shapes, rtn_apply, uniform_plan
from qlib.methods.qat import QATConfig
from qlib.quant.api import quantize_
from qlib.quant.config import RTNConfig, W8A8Config
from qlib.quant.fp8 import FP8Config
from qlib.quant.kernels import (PackedEmbedding, embedding_only_bytes, load_packed, pack_model, pack_quantized,
                                packed_bytes, packed_embeddings, packed_layers, save_packed)
from qlib.quant.modules import context_length, is_conv1d, logits_of, weight_out_in
from qlib.quant.primitives import qparams, quant_dequant, sqnr_db

V, H, FF, SEQ = 97, 64, 128, 16
DECODER = dict(vocab_size=V, hidden_size=H, intermediate_size=FF, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=0, eos_token_id=0)
ENCODER = dict(vocab_size=V, hidden_size=H, intermediate_size=FF, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, num_labels=3)


def _gemma3() -> nn.Module:
    return T.Gemma3ForCausalLM(T.Gemma3TextConfig(**{**DECODER, "num_key_value_heads": 1}, head_dim=16, sliding_window=4,
                                                  layer_types=["sliding_attention", "full_attention"]))


# one builder per family of the table (a test below checks that none is missing)
BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**DECODER)),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**DECODER)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**DECODER)),
    "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**DECODER, head_dim=16)),
    "gemma3": _gemma3,
    "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(**DECODER)),
    "opt": lambda: T.OPTForCausalLM(T.OPTConfig(vocab_size=V, hidden_size=H, ffn_dim=FF, num_hidden_layers=2,
                                                num_attention_heads=4, word_embed_proj_dim=H, max_position_embeddings=64,
                                                pad_token_id=1, bos_token_id=0, eos_token_id=0)),
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**{**DECODER, "num_key_value_heads": None})),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=H, n_layer=2, n_head=4, n_positions=64,
                                                   bos_token_id=0, eos_token_id=0)),
    "bert": lambda: T.BertForSequenceClassification(T.BertConfig(**ENCODER)),
    "roberta": lambda: T.RobertaForSequenceClassification(T.RobertaConfig(**ENCODER, pad_token_id=1)),
    "distilbert": lambda: T.DistilBertForSequenceClassification(
        T.DistilBertConfig(vocab_size=V, dim=H, hidden_dim=FF, n_layers=2, n_heads=4, max_position_embeddings=64,
                           num_labels=3)),
}
FAMILY = {"mistral": "llama", "qwen2": "llama", "qwen3": "llama"}  # model types that share a row
ENCODERS = {"bert", "roberta", "distilbert"}
NAMES = sorted(BUILDERS)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: these matrices are tiny, so a second thread only adds hand-off cost on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(name: str) -> nn.Module:
    """A tiny random model of one family, in eval mode, weights seeded."""
    torch.manual_seed(0)
    model = BUILDERS[name]().eval()
    with torch.no_grad():  # some families initialise norms / biases to constants: perturb so folds are not trivial
        for n, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in n.lower() or n.endswith("bias")):
                p.add_(0.1 * torch.randn_like(p))
    return model


def batches(name: str, n: int = 3) -> list:
    """``n`` calibration / test batches: token ids [1, SEQ] for decoders, dicts with a padding mask for encoders."""
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(2, V, (1, SEQ), generator=g) for _ in range(n)]
    if name in ENCODERS:
        return [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids]
    return ids


def outputs(model: nn.Module, bs: list) -> torch.Tensor:
    """Logits of every batch, concatenated."""
    with torch.no_grad():
        return torch.cat([logits_of(model(**b) if isinstance(b, dict) else model(b)).float().reshape(-1) for b in bs])


def block_linears(model: nn.Module) -> list[str]:
    return block_linear_names(model)


def test_every_family_of_the_table_has_a_tiny_model_here():
    covered = {FAMILY.get(n, n) for n in NAMES}  # test_table_and_role_helpers checks each model's row is this one
    assert covered == {spec.family for spec in ARCHS}
    required = {"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "gpt2", "opt", "gpt_neox", "bert",
                "distilbert", "roberta"}
    assert required <= set(supported_model_types())


def test_unsupported_family_error_names_families_and_how_to_add_one():
    class MambaForCausalLM(nn.Module):  # a stand-in: only the class name and config.model_type are read
        config = T.PretrainedConfig()
        config.model_type = "mamba"

    model = MambaForCausalLM()
    with pytest.raises(ValueError) as err:
        arch_of(model)
    msg = str(err.value)
    assert "'mamba'" in msg and "ArchSpec" in msg and "ARCHS" in msg
    for spec in ARCHS:
        assert spec.family in msg
    assert msg.count(". ") == 0  # one sentence


@pytest.mark.parametrize("name", NAMES)
def test_table_and_role_helpers(name):
    model = build(name)
    spec = arch_of(model)
    assert spec.family == FAMILY.get(name, name)
    blocks = get_blocks(model, spec)
    assert len(blocks) == 2
    for role in ROLES:  # every role names existing 2-D linears in both blocks
        names = block_linear_names(model, roles=role)
        assert len(names) == 2 * len(spec.role_linears(role)) > 0
        for n in names:
            assert weight_out_in(model.get_submodule(n)).dim() == 2
    assert len(block_linears(model)) == 2 * len(spec.linears)
    assert set(head_linear_names(model)) == set(spec.head)  # the row says where the head lives ...
    assert model.get_submodule(spec.embedding) is model.get_input_embeddings()  # ... and the token embedding
    for g in scale_groups_for(blocks[0], spec):  # every kept group folds exactly: prev's width = linears' input width
        prev = blocks[0].get_submodule(g.prev)
        width = prev.weight.shape[0] if prev.weight.dim() == 1 else linear_weight(prev, spec).shape[0]
        assert all(linear_weight(blocks[0].get_submodule(n), spec).shape[1] == width for n in g.linears)
    assert context_length(model) == 64 - (2 if name == "roberta" else 0)


@pytest.mark.parametrize("name", NAMES)
def test_rtn_w8a8_and_packing(name, tmp_path):
    ref = build(name)
    bs = batches(name, 2)
    y = outputs(ref, bs)
    chosen = block_linears(ref)

    model = copy.deepcopy(ref)
    quantize_(model, RTNConfig(bits=8, group_size=32), filter_fn=block_filter(model))
    assert set(model.qlib_quantized) == set(chosen)  # GPT-2's Conv1D layers are selected as linears
    changed = [n for n in chosen if not torch.equal(model.get_submodule(n).weight, ref.get_submodule(n).weight)]
    assert changed == chosen
    assert sqnr_db(y, outputs(model, bs)) > 30

    model = copy.deepcopy(ref)
    quantize_(model, W8A8Config(), filter_fn=block_filter(model))
    assert sqnr_db(y, outputs(model, bs)) > 20

    for bits, floor_db in ((8, 25), (4, 8)):
        model = copy.deepcopy(ref)
        pack_model(model, bits=bits, group_size=32, filter_fn=block_filter(model), act_dtype=torch.float32,
                   progress=False)
        assert set(packed_layers(model)) == set(chosen)
        y_packed = outputs(model, bs)
        assert sqnr_db(y, y_packed) > floor_db
    loaded = load_packed(save_packed(model, tmp_path / name))
    assert torch.equal(outputs(loaded, bs), y_packed)


DECODERS = [n for n in NAMES if n not in ENCODERS]


def _tied(model: nn.Module) -> bool:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight is emb.weight


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("name", DECODERS)
def test_whole_model_packing_covers_the_embedding_and_keeps_ties(name, bits, tmp_path):
    """The whole model packed (blocks, head and embedding): a tied embedding reads the packed head's rows (one copy),
    an untied one gets its own packed copy; the model is smaller than its FP32 and 16-bit versions, and reloads."""
    ref = build(name)
    tied = _tied(ref)
    fp32 = packed_bytes(ref)
    bs = batches(name, 2)
    y = outputs(ref, bs)
    model = pack_model(copy.deepcopy(ref), bits=bits, group_size=32, act_dtype=torch.float32, progress=False)
    (emb_name, emb), = packed_embeddings(model).items()
    assert model.get_input_embeddings() is emb and emb.tied == tied
    if tied:
        assert emb.packed is model.get_output_embeddings()  # one packed copy
        assert not any(n.startswith(emb_name + ".") for n in model.state_dict())
    ids = torch.tensor([[0, 5, V - 1]])
    scale = getattr(ref.get_input_embeddings(), "embed_scale", 1.0)
    expect = emb.dequantized_weight()[ids] * (scale.float() if isinstance(scale, torch.Tensor) else scale)
    assert torch.allclose(emb(ids), expect, atol=1e-6)
    w = ref.get_input_embeddings().weight
    assert sqnr_db(w[ids], emb.rows(ids)) > (8 if bits == 4 else 30)  # rows are the quantized float rows
    assert sqnr_db(y, outputs(model, bs)) > (5 if bits == 4 else 20)
    size = packed_bytes(model)
    assert size < fp32 / 2  # smaller than the 16-bit model, so smaller than FP32
    w = ref.get_input_embeddings().weight
    assert embedding_only_bytes(ref) == (0 if tied else w.numel() * 4)
    assert embedding_only_bytes(model) == (0 if tied else packed_bytes(emb.source))
    assert tied or 0 < packed_bytes(emb.source) < w.numel() * 4
    loaded = load_packed(save_packed(model, tmp_path / name))
    assert torch.equal(outputs(loaded, bs), outputs(model, bs))
    assert packed_bytes(loaded) == size
    assert isinstance(loaded.get_input_embeddings(), PackedEmbedding)
    if tied:
        assert loaded.get_input_embeddings().packed is loaded.get_output_embeddings()


@pytest.mark.parametrize("name", ["gemma3", "gpt_neox"])  # tied and untied
def test_embedding_false_keeps_the_float_table_and_quantized_codes_share_a_tied_head(name):
    ref = build(name)
    head = ref.get_output_embeddings()
    head_name = next(n for n, m in ref.named_modules() if m is head)
    kept = pack_model(copy.deepcopy(ref), bits=8, act_dtype=torch.float32, progress=False, embedding=False)
    assert isinstance(kept.get_input_embeddings(), nn.Embedding) and not packed_embeddings(kept)
    assert packed_bytes(kept) > packed_bytes(pack_model(copy.deepcopy(ref), bits=8, act_dtype=torch.float32,
                                                        progress=False))
    with pytest.raises(ValueError, match="embedding=True packs the input embedding together with the output head"):
        pack_model(copy.deepcopy(ref), bits=8, filter_fn=block_filter(ref), act_dtype=torch.float32, progress=False,
                   embedding=True)
    codes, qp = qparams_codes(weight_out_in(head), 4, 32)
    model = pack_quantized(copy.deepcopy(ref), {head_name: (codes, qp)}, act_dtype=torch.float32, progress=False)
    emb = model.get_input_embeddings()
    assert isinstance(emb, PackedEmbedding) and emb.tied == _tied(ref)


def qparams_codes(w: torch.Tensor, bits: int, group: int):
    from qlib.quant.kernels import weight_codes
    return weight_codes(w, bits, group)


def _output_error(weights: dict[str, torch.Tensor], x: torch.Tensor, ref: nn.Module) -> float:
    """Summed squared output error of [out, in] ``weights`` against ``ref``'s layers of the same names on inputs ``x``."""
    with torch.no_grad():
        return sum(float(((x @ (w - weight_out_in(ref.get_submodule(n))).t()) ** 2).sum()) for n, w in weights.items())


@pytest.mark.parametrize("name", NAMES)
def test_gptq_and_awq_run_and_pack(name, tmp_path):
    ref = build(name)
    spec = arch_of(ref)
    calib = batches(name, 2)
    bs = batches(name, 1)
    y = outputs(ref, bs)
    chosen = block_linears(ref)

    gptq = copy.deepcopy(ref)
    quantize_(gptq, GPTQConfig(bits=4, group_size=32), filter_fn=block_filter(gptq), calib=calib)
    assert set(gptq.qlib_gptq) == set(chosen)
    assert sqnr_db(y, outputs(gptq, bs)) > 5
    # block 0's first group sees the float model's inputs in GPTQ too, so its layer objective must beat RTN's
    names = [f"{blocks_path(ref, spec)}.0.{n}" for n in spec.sequential[0]]
    seen: list[torch.Tensor] = []
    hook = ref.get_submodule(names[0]).register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    outputs(ref, calib)
    hook.remove()
    x = torch.cat([h.reshape(-1, h.shape[-1]) for h in seen]).float()
    rtn = {n: quant_dequant(w, qparams(w, 4, True, 32)) for n in names for w in [weight_out_in(ref.get_submodule(n))]}
    assert _output_error({n: weight_out_in(gptq.get_submodule(n)) for n in names}, x, ref) <= _output_error(rtn, x, ref)
    pack_quantized(gptq, {f: packable(r) for f, r in gptq.qlib_gptq.items()}, act_dtype=torch.float32, progress=False)
    assert set(packed_layers(gptq)) == set(chosen)
    y_gptq = outputs(gptq, bs)
    assert torch.equal(outputs(load_packed(save_packed(gptq, tmp_path / "gptq")), bs), y_gptq)

    awq = copy.deepcopy(ref)
    quantize_(awq, AWQConfig(bits=4, group_size=32, n_grid=4, clip_grid=4, n_clip_tokens=32),
              filter_fn=block_filter(awq), calib=calib)
    result = awq.qlib_awq_result
    assert len(result.groups) == 2 * len(scale_groups_for(get_blocks(ref, spec)[0], spec))
    assert sqnr_db(y, outputs(awq, bs)) > 5
    pack_quantized(awq, awq.qlib_awq_codes, act_dtype=torch.float32, progress=False)
    assert set(packed_layers(awq)) == set(chosen)


def test_gpt2_conv1d_is_quantized_on_its_out_in_weight():
    model = build("gpt2")
    name = block_linear_names(model, blocks=1, roles="mlp_in")[0]
    conv = model.get_submodule(name)
    assert is_conv1d(conv) and tuple(conv.weight.shape) == (H, 4 * H)  # stored [in, out]
    w = weight_out_in(conv).detach().clone()
    quantize_(model, RTNConfig(bits=4, group_size=32), filter_fn=lambda m, f: f == name)
    wq = weight_out_in(model.get_submodule(name))
    # groups run along the input dimension of the [out, in] weight: each row's group of 32 has at most 16 levels
    for row in range(0, wq.shape[0], 37):
        for g in range(0, H, 32):
            assert wq[row, g : g + 32].unique().numel() <= 16
    assert (wq - w).abs().max() < w.abs().max() / 7


def test_gpt2_conv1d_takes_fp8_and_qat_configs_too():
    ref = build("gpt2")
    bs = batches("gpt2", 2)
    y = outputs(ref, bs)
    for config in (FP8Config(), QATConfig(weight_bits=8, weight_granularity="channel", act_bits=8)):
        model = copy.deepcopy(ref)
        quantize_(model, config, filter_fn=block_filter(model), calib=bs)
        assert set(model.qlib_quantized) == set(block_linears(ref))
        assert sqnr_db(y, outputs(model, bs)) > 20


def test_gpt2_conv1d_in_mixed_precision_helpers():
    ref = build("gpt2")
    bs = batches("gpt2", 2)
    y = outputs(ref, bs)
    names = block_linears(ref)
    shapes = linear_shapes(ref, names)
    assert all(shapes[n][:2] == tuple(weight_out_in(ref.get_submodule(n)).shape) for n in names)
    model = copy.deepcopy(ref)
    codes = rtn_apply(model, uniform_plan(names, LayerOption(4, 32)))
    assert sqnr_db(y, outputs(model, bs)) > 8
    pack_quantized(model, codes, act_dtype=torch.float32, progress=False)
    assert set(packed_layers(model)) == set(names)


@pytest.mark.parametrize("name", ["gpt2", "opt"])
def test_windows_longer_than_the_context_are_refused(name):
    model = build(name)
    long = torch.randint(2, V, (1, 65))
    limit = r"at most 64 positions \(config.(n_positions|max_position_embeddings)\); lower it to 64 or less"
    with pytest.raises(ValueError, match=r"the window \(.*WINDOW\) is 65 tokens but \w+ takes " + limit):
        evaluate_lm(model, long)
    with pytest.raises(ValueError, match=r"the calibration seq_len \(.*CALIB_LEN\) is 65 tokens but \w+ takes " + limit):
        quantize_(model, GPTQConfig(bits=4, group_size=32), calib=[long])


@pytest.mark.parametrize("name", NAMES)
def test_every_scale_group_folds_exactly(name):
    """A random positive per-channel scale folded into each group's ``prev`` and linears leaves the float model unchanged."""
    model = build(name)
    spec = arch_of(model)
    bs = batches(name, 2)
    y = outputs(model, bs)
    g = torch.Generator().manual_seed(3)
    for block in get_blocks(model, spec):
        for group in scale_groups_for(block, spec):
            width = linear_weight(block.get_submodule(group.linears[0]), spec).shape[1]
            s = 0.5 + torch.rand(width, generator=g)
            fold_scales(block.get_submodule(group.prev), [block.get_submodule(n) for n in group.linears], s, spec)
    assert torch.allclose(outputs(model, bs), y, atol=1e-4, rtol=1e-4)


def test_readme_family_table_is_the_architecture_table():
    """The README's "Run it on your model" table is generated from ARCHS (qlib.methods.arch.family_table)."""
    from qlib.lab.paths import REPO_ROOT
    from qlib.methods.arch import family_table

    readme = (REPO_ROOT / "README.md").read_text()
    start, end = "<!-- family-table: generated by qlib.methods.arch.family_table() -->\n", "<!-- /family-table -->"
    assert start in readme and end in readme, "the README lost its generated family table"
    shown = readme.split(start, 1)[1].split(end, 1)[0]
    assert shown == family_table(), ("README.md's family table differs from the architecture table; paste "
                                     "python -c 'from qlib.methods.arch import family_table; print(family_table())'")
