"""Packed INT4/INT8 weight-only linears and torch.ao dynamic INT8 against their float references."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qlib.quant.api import quantize_
from qlib.quant.config import RTNConfig
from qlib.quant.kernels import (Int4WeightOnlyLinear, Int8WeightOnlyLinear, PackedEmbedding, pack_model, pack_quantized,
                                packed_bytes, torch_dynamic_int8, weight_codes)
from qlib.quant.primitives import QParams, dequantize, qparams, quant_dequant, sqnr_db

BF16_REL = 1.5e-2  # max |y - ref| / max |ref|: both sides round the output (and the reference W) to bf16


def _linear(k: int, n: int, bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(1 + 4 * torch.rand(n, 1))  # rows of different ranges, so per-channel scales differ
    return lin


def _reference(x: torch.Tensor, w_deq: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x.bf16, W_deq.bf16) in float32, plus the float bias."""
    y = F.linear(x.bfloat16(), w_deq.bfloat16()).float()
    return y if bias is None else y + bias


def _assert_close_bf16(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.shape == ref.shape and y.dtype == ref.dtype
    err = (y - ref).abs().max().item() / ref.abs().max().item()
    assert err < BF16_REL, f"max error {err:.4f} of max |ref| exceeds bf16 tolerance {BF16_REL}"
    assert (y - ref).norm() / ref.norm() < 1e-2  # one bf16 ulp is 2**-7 relative


SHAPES = [  # (in_features K, out_features N, bias)
    (576, 1536, True),  # SmolLM2 q/gate shapes: K = 576 is not a multiple of 128
    (576, 13, False),  # N not a multiple of 16 (int4 pads it) nor of 8
    (64, 48, True),
    (1536, 576, False),
]


@pytest.mark.parametrize("k,n,bias", SHAPES)
@pytest.mark.parametrize("tokens", [1, 37])
@pytest.mark.parametrize("group_size,symmetric", [(128, False), (32, True), (None, False)])
def test_int4_matches_dequantized_reference(k, n, bias, tokens, group_size, symmetric):
    lin = _linear(k, n, bias)
    mod = Int4WeightOnlyLinear.from_linear(lin, group_size=group_size, symmetric=symmetric)
    x = torch.randn(2, tokens, k)  # a leading batch dim, as in a transformer
    y = mod(x)
    assert y.shape == (2, tokens, n)
    _assert_close_bf16(y, _reference(x, mod.dequantized_weight(), lin.bias))
    # the dequantized weight is the fake-quant of the weight (K zero-padded to the group), up to bf16 scales
    w = F.pad(lin.weight.detach(), (0, (-k) % (group_size or k)))
    qp = qparams(w, 4, symmetric, group_size or "channel")
    fake = quant_dequant(w, qp)[:, :k]
    step = qp.scale.repeat_interleave(w.shape[1] // qp.scale.shape[1], dim=1)[:, :k]  # each element's own scale
    # scale and zero rounded to bf16 move a weight by <= (|q - 8| + |8 - z|) * s * 2**-9 <= s / 32
    assert ((mod.dequantized_weight() - fake).abs() <= step / 32).all()


@pytest.mark.parametrize("k,n,bias", SHAPES + [(584, 7, True), (24, 5, False)])  # K % 16 != 0 is padded
@pytest.mark.parametrize("tokens", [1, 37])
def test_int8_matches_dequantized_reference(k, n, bias, tokens):
    lin = _linear(k, n, bias)
    mod = Int8WeightOnlyLinear.from_linear(lin)
    x = torch.randn(tokens, k)
    _assert_close_bf16(mod(x), _reference(x, mod.dequantized_weight(), lin.bias))
    fake = quant_dequant(lin.weight.detach(), qparams(lin.weight.detach(), 8, True, "channel"))
    rel = (mod.dequantized_weight() - fake).abs() / fake.abs().amax(dim=1, keepdim=True)
    assert rel.max() < 2**-8  # only the bf16 rounding of the per-channel scale


def test_fp32_activations_match_exactly_computed_weight():
    lin = _linear(576, 64, True)
    mod = Int4WeightOnlyLinear.from_linear(lin, group_size=64, act_dtype=torch.float32)
    x = torch.randn(5, 576)
    ref = F.linear(x, mod.dequantized_weight(), lin.bias)
    torch.testing.assert_close(mod(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def _grid_weight(n: int, k: int, group: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, QParams]:
    """A weight on an asymmetric 4-bit grid whose scales have 4 significant bits, so every value is exact in bf16."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g).to(torch.uint8)
    codes[:, ::group], codes[:, 1::group] = 0, 15  # every group spans the full range, so min-max recovers the grid
    scale = torch.randint(1, 16, (n, k // group), generator=g).float() * 2.0 ** -9
    zero = torch.randint(1, 15, (n, k // group), generator=g).float()
    qp = QParams(scale, zero, 4, False, group)
    return dequantize(codes, qp), codes, qp


@pytest.mark.parametrize("group", [32, 128])
def test_int4_reproduces_grid_weight_exactly(group):
    w, codes, qp = _grid_weight(48, 256, group)
    lin = nn.Linear(256, 48, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    mod = Int4WeightOnlyLinear.from_linear(lin, group_size=group, symmetric=False)
    assert torch.equal(mod.codes()[:48, :256], codes)  # the kernel's own packed bytes hold the same codes
    assert torch.equal(mod.dequantized_weight(), w)
    out = mod(torch.eye(256))  # the kernel itself returns W.T row by row, exactly
    assert torch.equal(out, w.t())
    # packing the codes directly (pack_quantized's path) gives the same bytes: no re-rounding
    direct = Int4WeightOnlyLinear.from_codes(codes, qp)
    assert torch.equal(direct.weight_packed, mod.weight_packed)
    assert torch.equal(direct.scales_and_zeros, mod.scales_and_zeros)


def test_int4_float_zero_points():
    """Q4_1-style codes (scale and a fractional zero from the group's min) pack without loss."""
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (32, 128), generator=g).to(torch.uint8)
    qp = QParams(torch.rand(32, 4, generator=g) * 0.01 + 1e-3, torch.rand(32, 4, generator=g) * 15, 4, False, 32)
    mod = Int4WeightOnlyLinear.from_codes(codes, qp, act_dtype=torch.float32)
    torch.testing.assert_close(mod.dequantized_weight(), dequantize(codes, qp), rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="integer zero"):
        Int8WeightOnlyLinear.from_codes(codes, QParams(qp.scale[:, :1], qp.zero[:, :1], 4, False, 128))


def test_int4_padded_codes_and_errors():
    lin = _linear(576, 32, False)
    codes, qp = weight_codes(lin.weight, bits=4, group_size=128, symmetric=False)
    assert codes.shape == (32, 640)
    assert dequantize(codes, qp)[:, 576:].abs().max() == 0  # zero padding quantizes to exactly 0.0
    bad = codes.clone()
    bad[:, 600] = (qp.zero[:, 4] + 1).to(torch.uint8)  # a padding column that would not be 0.0
    with pytest.raises(ValueError, match="padding"):
        Int4WeightOnlyLinear.from_codes(bad, qp, in_features=576)
    with pytest.raises(ValueError, match="int4 kernel"):
        Int4WeightOnlyLinear.from_codes(*weight_codes(lin.weight, bits=4, group_size=16))
    with pytest.raises(ValueError, match="Int8WeightOnlyLinear"):
        Int4WeightOnlyLinear.from_codes(*weight_codes(lin.weight, bits=8, group_size=64))
    with pytest.raises(ValueError, match="symmetric"):
        Int8WeightOnlyLinear.from_codes(*weight_codes(lin.weight, bits=8, group_size=None, symmetric=False))


def test_state_dict_round_trip_and_capability_guard():
    lin = _linear(576, 40, True)
    mod = Int4WeightOnlyLinear.from_linear(lin)
    fresh = Int4WeightOnlyLinear(576, 40, 128, bias=True)
    fresh.load_state_dict(mod.state_dict())
    x = torch.randn(3, 576)
    assert torch.equal(fresh(x), mod(x))
    state = mod.state_dict()
    state["_extra_state"] = {"cpu_capability": "SOME_OTHER_ISA"}
    with pytest.raises(RuntimeError, match="re-pack"):
        fresh.load_state_dict(state)


def test_packed_bytes_ratios():
    lin = nn.Linear(4096, 4096, bias=False)
    fp32 = packed_bytes(lin)
    assert fp32 == 4096 * 4096 * 4
    int4 = Int4WeightOnlyLinear.from_linear(lin, group_size=128)
    assert packed_bytes(int4) == 4096 * 4096 // 2 + (4096 // 128) * 4096 * 2 * 2  # nibbles + bf16 scale and zero
    assert 0.12 < packed_bytes(int4) / fp32 < 0.14
    int8 = Int8WeightOnlyLinear.from_linear(lin)
    assert 0.24 < packed_bytes(int8) / fp32 < 0.26


def test_torch_dynamic_int8_close_and_small():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 64)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the deprecation is handled inside
        q = torch_dynamic_int8(mlp)
    assert isinstance(mlp[0], nn.Linear)  # the input model is untouched
    assert type(q[0]).__name__ == "Linear" and type(q[0]).__module__.startswith("torch.ao.nn.quantized.dynamic")
    x = torch.randn(64, 256)
    with torch.inference_mode():
        assert sqnr_db(mlp(x), q(x)) > 30
    ratio = packed_bytes(q) / packed_bytes(mlp)
    assert 0.24 < ratio < 0.30  # int8 weights; fp32 biases and scales on top


def test_torch_dynamic_int8_lstm_bytes():
    lstm = nn.LSTM(64, 128, num_layers=2)
    q = torch_dynamic_int8(nn.Sequential(lstm))
    ratio = packed_bytes(q) / packed_bytes(lstm)
    assert 0.25 < ratio < 0.35  # int8 gate weights; fp32 biases stay


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_model_tiny_llama(bits):
    model = _tiny_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    config = RTNConfig(bits=4, group_size=32, symmetric=False) if bits == 4 else RTNConfig(8, None, symmetric=True)
    with pytest.warns(UserWarning, match="tied"):  # the fake-quant reference unties the head the same way
        fake = quantize_(copy.deepcopy(model), config)
    packed = pack_model(model, bits=bits, group_size=32, progress=False)
    kind = Int4WeightOnlyLinear if bits == 4 else Int8WeightOnlyLinear
    assert isinstance(packed.lm_head, kind) and isinstance(packed.model.layers[0].mlp.down_proj, kind)
    assert not any(isinstance(m, nn.Linear) for m in packed.modules())
    # the tie is kept: the embedding reads the packed head's rows (one copy); transformers must not re-tie it
    assert isinstance(packed.model.embed_tokens, PackedEmbedding) and packed.model.embed_tokens.packed is packed.lm_head
    assert packed.config.tie_word_embeddings is False
    with torch.no_grad():  # the matching fake-quant model: its embedding holds the quantized head's rows too
        fake.model.embed_tokens.weight.copy_(fake.lm_head.weight)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref, out = fake(ids).logits, packed(ids).logits
        assert out.dtype == torch.float32
        assert (out - ref).abs().max() < 0.03 * ref.abs().max()
        assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
        gen = packed.generate(ids[:1, :8], max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 14) and torch.equal(gen[:, :8], ids[:1, :8])
    assert packed_bytes(packed) < packed_bytes(fake)


def test_pack_model_filters_and_pack_quantized():
    model = _tiny_llama()
    pack_model(model, bits=4, group_size=32, include_lm_head=False, progress=False,
               filter_fn=lambda m, fqn: "mlp" in fqn)
    assert isinstance(model.model.layers[1].mlp.up_proj, Int4WeightOnlyLinear)
    assert isinstance(model.model.layers[1].self_attn.q_proj, nn.Linear) and isinstance(model.lm_head, nn.Linear)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the head stays tied when not packed

    model = _tiny_llama()
    w = model.model.layers[0].self_attn.o_proj.weight.detach()
    codes, qp = weight_codes(w, bits=3, group_size=64, symmetric=True)  # e.g. from GPTQ: 3-bit codes, 4-bit storage
    pack_quantized(model, {"model.layers.0.self_attn.o_proj": (codes, qp)})
    o = model.model.layers[0].self_attn.o_proj
    assert isinstance(o, Int4WeightOnlyLinear)
    step = qp.scale.max().item()
    assert (o.dequantized_weight() - dequantize(codes, qp)).abs().max() < 0.02 * step
    with pytest.raises(KeyError, match="not a module"):
        pack_quantized(model, {"model.nope": (codes, qp)})


def test_pack_model_rejects_bad_input():
    with pytest.raises(ValueError, match="bits"):
        pack_model(_tiny_llama(), bits=1)
    with pytest.raises(ValueError, match="symmetric"):
        pack_model(_tiny_llama(), bits=8, symmetric=False)
    with pytest.raises(ValueError, match="no nn.Linear"):
        pack_model(_tiny_llama(), filter_fn=lambda m, fqn: False)


@pytest.mark.parametrize("bits", [4, 8])
def test_save_packed_round_trip_and_save_pretrained_refused(tmp_path, bits):
    from qlib.quant.kernels import load_packed, packed_layers, save_packed

    model = pack_model(_tiny_llama(), bits=bits, group_size=32, progress=False)
    with pytest.raises(RuntimeError, match="save_packed"):  # it would reload as float layers with random weights
        model.save_pretrained(str(tmp_path / "hf"))
    save_packed(model, tmp_path / "packed")
    again = load_packed(tmp_path / "packed")
    assert set(packed_layers(again)) == set(packed_layers(model)) and again.config.tie_word_embeddings is False
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert torch.equal(again(ids).logits, model(ids).logits)
    assert packed_bytes(again) == packed_bytes(model)
    with pytest.raises(RuntimeError, match="save_packed"):
        again.save_pretrained(str(tmp_path / "hf2"))
    # a plain (non-HF) module loads into a float base of the same architecture
    plain = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    packed = pack_model(copy.deepcopy(plain), bits=bits, group_size=32, progress=False)
    save_packed(packed, tmp_path / "seq")
    with pytest.raises(ValueError, match="base="):
        load_packed(tmp_path / "seq")
    x = torch.randn(3, 64)
    with torch.inference_mode():
        assert torch.equal(load_packed(tmp_path / "seq", base=copy.deepcopy(plain))(x), packed(x))


def test_save_packed_rejects_bad_input(tmp_path):
    from qlib.quant.kernels import load_packed, save_packed

    with pytest.raises(ValueError, match="no packed layers"):
        save_packed(_tiny_llama(), tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="save_packed"):
        load_packed(tmp_path)


_ROWS_CHECK = """
import torch
from torch import nn
from qlib.quant.kernels import Int4WeightOnlyLinear, PackedEmbedding
torch.manual_seed(0)
for n, k in [(80, 64), (1000, 200), (300, 96), (16, 32)]:
    lin = nn.Linear(k, n, bias=False)
    src = Int4WeightOnlyLinear.from_linear(lin, 32)
    ids = torch.cat([torch.randint(0, n, (50,)), torch.tensor([0, n - 1])])
    assert torch.equal(PackedEmbedding(src, tied=True).rows(ids), src.dequantized_weight()[ids]), (n, k)
print(torch.backends.cpu.get_cpu_capability())
"""


@pytest.mark.parametrize("capability", ["default", "avx2", None])
def test_int4_rows_are_read_right_in_every_packed_layout(capability):
    """PackedEmbedding reads rows out of the int4 kernel's packed bytes, whose layout differs by CPU capability
    (AVX512 packs blocks of 64 rows, AVX2 and DEFAULT of 32); each layout torch can dispatch here is checked against
    the kernel's own read-back, including N not a multiple of the block."""
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    out = subprocess.run([sys.executable, "-c", _ROWS_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    if capability is not None:
        assert out.stdout.strip().lower() in (capability, "default")  # a CPU without AVX2 falls back to DEFAULT
