"""qlib.methods.arch (the family table) and qlib.methods.calib (block-input capture, block-by-block replay) on tiny models."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (BertConfig, BertForSequenceClassification, BertModel, Gemma3ForCausalLM, Gemma3TextConfig,
                          GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM)

from qlib.methods.arch import (ARCHS, ArchSpec, arch_of, block_filter, block_linear_names, block_position, blocks_path,
                               get_blocks, head_linear_names, linear_weight, scale_groups_for, set_linear_weight,
                               supported_model_types, trim_blocks)
from qlib.methods.calib import calib_batches_from_text, capture_block_inputs, capture_block_kwargs, run_block

V = 97


def tiny_llama(kv_heads: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gemma3() -> Gemma3ForCausalLM:
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64)
    return Gemma3ForCausalLM(cfg).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()


def tiny_bert(cls=BertForSequenceClassification):
    torch.manual_seed(0)
    return cls(BertConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=64)).eval()


def ids(n: int = 3, seq: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, V, (1, seq), generator=g) for _ in range(n)]


def bert_batches() -> list[dict]:
    g = torch.Generator().manual_seed(2)
    mask = torch.tensor([[1] * 16, [1] * 10 + [0] * 6])
    return [{"input_ids": torch.randint(0, V, (2, 16), generator=g), "attention_mask": mask} for _ in range(2)]


def _final_hidden(model: nn.Module, batch) -> torch.Tensor:
    """Last hidden state of the model's own forward (before any final norm for decoder LMs: hidden_states[-1] has it)."""
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True) if isinstance(batch, dict) else model(batch, output_hidden_states=True)
    return out.hidden_states


def test_unknown_model_type_names_the_supported_families():
    model = nn.Linear(2, 2)
    model.config = type("Cfg", (), {"model_type": "mamba"})()
    with pytest.raises(ValueError, match="mamba") as err:
        arch_of(model)
    for name in ("llama", "gemma3", "bert", "gpt2"):
        assert name in str(err.value)
    assert {"llama", "gemma3_text", "gemma3", "bert", "gpt2"} <= set(supported_model_types())


def test_table_names_resolve_in_every_family():
    for model in (tiny_llama(), tiny_gemma3(), tiny_gpt2(), tiny_bert(), tiny_bert(BertModel)):
        spec = arch_of(model)
        blocks = get_blocks(model, spec)
        assert len(blocks) == 2
        for name in spec.linears:  # every linear exists and has a 2-D [out, in] weight
            assert linear_weight(blocks[0].get_submodule(name), spec).dim() == 2
        for g in spec.scale_groups:
            blocks[0].get_submodule(g.prev)
            if g.inspect:
                blocks[0].get_submodule(g.inspect)
    assert blocks_path(tiny_bert(BertModel), arch_of(tiny_bert(BertModel))) == "encoder.layer"
    assert blocks_path(tiny_bert(), arch_of(tiny_bert())) == "bert.encoder.layer"


def test_gqa_drops_the_v_to_o_scale_group():
    gqa, mha = tiny_llama(kv_heads=2), tiny_llama(kv_heads=4)
    prevs = lambda m: [g.prev for g in scale_groups_for(get_blocks(m, arch_of(m))[0], arch_of(m))]
    assert "self_attn.v_proj" not in prevs(gqa)
    assert "self_attn.v_proj" in prevs(mha)
    assert len(prevs(mha)) == len(ARCHS[0].scale_groups)


def test_conv1d_weight_is_transposed_to_out_in():
    model = tiny_gpt2()
    spec = arch_of(model)
    c_fc = get_blocks(model, spec)[0].get_submodule("mlp.c_fc")  # Conv1D 64 -> 256, weight stored [64, 256]
    w = linear_weight(c_fc, spec)
    assert tuple(w.shape) == (256, 64)
    x = torch.randn(3, 64)
    torch.testing.assert_close(c_fc(x), x @ w.t() + c_fc.bias)
    set_linear_weight(c_fc, torch.zeros(256, 64), spec)
    assert c_fc.weight.abs().sum() == 0
    with pytest.raises(ValueError, match="does not fit"):
        set_linear_weight(c_fc, torch.zeros(64, 256), spec)


@pytest.mark.parametrize("make,batches", [(tiny_llama, ids), (tiny_gemma3, ids), (tiny_gpt2, ids),
                                          (tiny_bert, bert_batches)])
def test_block_by_block_replay_matches_the_model(make, batches):
    model, data = make(), batches()
    spec = arch_of(model)
    blocks = get_blocks(model, spec)
    inputs, kwargs = capture_block_inputs(model, data, spec)
    per_block = capture_block_kwargs(model, data, spec)
    assert len(inputs) == len(kwargs) == len(data) and len(per_block) == len(blocks)
    assert all(kw.get("use_cache", False) is False and kw.get("past_key_values") is None for kw in kwargs)
    h = inputs
    for b, block in enumerate(blocks):
        h = run_block(block, h, per_block[b])
        want = [_final_hidden(model, x)[b + 1] for x in data]
        if b == len(blocks) - 1 and spec.family != "bert":
            break  # decoders apply their final norm to the last hidden state
        for got, ref in zip(h, want):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for got, x in zip(inputs, data):
        torch.testing.assert_close(got, _final_hidden(model, x)[0])


def test_gemma3_layers_get_their_own_mask_and_rotary():
    model, data = tiny_gemma3(), ids(n=1, seq=12)
    per_block = capture_block_kwargs(model, data, arch_of(model))
    cos_local, cos_global = per_block[0][0]["position_embeddings"][0], per_block[1][0]["position_embeddings"][0]
    assert not torch.allclose(cos_local, cos_global)  # local and global rope bases differ
    # replaying block 1 with block 0's arguments would be wrong: check it differs from the model
    inputs, _ = capture_block_inputs(model, data, arch_of(model))
    blocks = get_blocks(model, arch_of(model))
    h1 = run_block(blocks[0], inputs, per_block[0])
    right, wrong = run_block(blocks[1], h1, per_block[1]), run_block(blocks[1], h1, per_block[0])
    assert (right[0] - wrong[0]).abs().max() > 1e-3


class _Tok:
    """A whitespace tokenizer with encode(), like a small char/word model's."""

    def encode(self, text: str) -> list[int]:
        return [len(w) for w in text.split()]


def test_calib_windows_are_deterministic_and_in_range():
    text = " ".join("w" * (i % 7 + 1) for i in range(500))
    a = calib_batches_from_text(_Tok(), text, n_samples=5, seq_len=32, seed=3)
    b = calib_batches_from_text(_Tok(), text, n_samples=5, seq_len=32, seed=3)
    c = calib_batches_from_text(_Tok(), text, n_samples=5, seq_len=32, seed=4)
    assert all(x.shape == (1, 32) and torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    stream = torch.tensor(_Tok().encode(text))
    for w in a:  # each window is a contiguous slice of the stream
        hits = [i for i in range(len(stream) - 31) if torch.equal(stream[i:i + 32], w[0])]
        assert hits
    with pytest.raises(ValueError, match="seq_len"):
        calib_batches_from_text(_Tok(), "a b c", n_samples=1, seq_len=32)


def test_empty_calibration_raises():
    model = tiny_llama()
    with pytest.raises(ValueError, match="empty"):
        capture_block_inputs(model, [], arch_of(model))


def test_block_linear_names_select_exactly_the_table_rows_per_family():
    expected = {  # (first block's linears, first block's MLP down projection, head linears)
        "llama": ("model.layers", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"], "mlp.down_proj", ["lm_head"]),
        "gpt2": ("transformer.h", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"], "mlp.c_proj", ["lm_head"]),
        "bert": ("bert.encoder.layer", ["attention.self.query", "attention.self.key", "attention.self.value",
                                        "attention.output.dense", "intermediate.dense", "output.dense"], "output.dense",
                 ["bert.pooler.dense", "classifier"]),
    }
    for model in (tiny_llama(), tiny_gpt2(), tiny_bert()):
        path, linears, down, head = expected[arch_of(model).family]
        assert block_linear_names(model, 1) == [f"{path}.0.{n}" for n in linears]
        assert block_linear_names(model) == [f"{path}.{i}.{n}" for i in range(2) for n in linears]
        assert block_linear_names(model, roles="mlp_out") == [f"{path}.0.{down}", f"{path}.1.{down}"]
        assert block_linear_names(model, [1], roles="mlp_out") == [f"{path}.1.{down}"]
        attention = block_linear_names(model, 2, roles="attention")
        mlp = block_linear_names(model, 2, roles=["mlp_in", "mlp_out"])
        assert sorted(attention + mlp) == sorted(block_linear_names(model)) and not set(attention) & set(mlp)
        assert head_linear_names(model) == head
        assert block_position(model, f"{path}.1.{down}") == (1, down)
        keep = block_filter(model, 1, "mlp")
        assert [n for n, m in model.named_modules() if keep(m, n)] == block_linear_names(model, 1, "mlp")


def test_block_selection_errors_say_what_to_pass():
    model = tiny_llama()
    with pytest.raises(ValueError, match="1..2"):
        block_linear_names(model, 3)
    with pytest.raises(ValueError, match="pick one of"):
        block_linear_names(model, roles="ffn")
    with pytest.raises(ValueError, match="not inside the blocks"):
        block_position(model, "lm_head")
    with pytest.raises(ValueError, match="1..2"):
        trim_blocks(model, 0)


def test_every_table_row_has_one_group_per_role():
    for spec in ARCHS:
        assert set(spec.role_linears("attention")) | set(spec.role_linears("mlp")) == set(spec.linears)
    with pytest.raises(ValueError, match="one per role"):
        ArchSpec(family="x", model_types=("x",), blocks="layers", sequential=(("a",),), scale_groups=())


def test_trim_blocks_keeps_a_working_forward_equal_to_the_first_blocks():
    x = ids(1)[0]
    final_norm = {"llama": "model.norm", "gemma3": "model.norm", "gpt2": "transformer.ln_f"}
    for make in (tiny_llama, tiny_gemma3, tiny_gpt2):
        full, model = make(), make()
        trim_blocks(model, 1)
        assert len(get_blocks(model, arch_of(model))) == 1 and model.config.num_hidden_layers == 1
        with torch.no_grad():
            after_block0 = full(x, output_hidden_states=True).hidden_states[1]
            expected = full.get_output_embeddings()(full.get_submodule(final_norm[arch_of(full).family])(after_block0))
            logits = model(x).logits
            generated = model.generate(x[:, :4], max_new_tokens=3, do_sample=False)  # the KV cache sizes itself from the config
        torch.testing.assert_close(logits, expected)  # the trimmed model is the first block, the final norm and the head
        assert generated.shape == (1, 7)
    bert = trim_blocks(tiny_bert(), 1)
    with torch.no_grad():
        logits = bert(**bert_batches()[0]).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all() and bert.config.num_hidden_layers == 1
