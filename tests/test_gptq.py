"""GPTQ: the Hessian, the solver against round-to-nearest, hard cases, and whole tiny models of each family."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from qlib.quant.api import quantize_
from qlib.methods.arch import arch_of, get_blocks, linear_weight, set_linear_weight
from qlib.methods.gptq import GPTQConfig
from qlib.methods.gptq import GPTQ, gptq_quantize_model, packable
from qlib.quant.kernels import pack_quantized
from qlib.quant.primitives import dequantize, qparams, quantize
from test_arch import bert_batches, tiny_bert, tiny_gpt2, tiny_llama

GRANULARITIES = [(None, "channel"), (32, 32), (48, 48), (-1, "tensor")]  # 48 does not divide 128: shorter last group


def rtn_codes(w: torch.Tensor, bits: int, symmetric: bool, granularity) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest codes and dequantized weight from qlib.quant.primitives."""
    qp = qparams(w, bits, symmetric, granularity, pad=True)
    codes = quantize(w, qp)
    return codes, dequantize(codes, qp)


def out_err(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor) -> float:
    """||W X - W_q X||_F^2 over inputs x [n, in]."""
    return (x @ (w - wq).t()).pow(2).sum().item()


def correlated_inputs(n: int, k: int, outliers: int = 0, seed: int = 0) -> torch.Tensor:
    """Inputs [n, k] with correlated channels and, optionally, a few outlier channels 25x larger."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) @ (torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k))
    x[:, :outliers] *= 25.0
    return x


def solver(w: torch.Tensor, x: torch.Tensor, chunks: int = 4) -> GPTQ:
    g = GPTQ(w)
    for part in x.chunk(chunks):
        g.add_batch(part.unsqueeze(0))
    return g


def test_incremental_hessian_equals_batch_hessian():
    torch.manual_seed(0)
    x = torch.randn(7, 10, 24)  # 7 sequences of 10 tokens
    g = GPTQ(torch.randn(5, 24))
    for part in (x[:1], x[1:4], x[4:6], x[6]):  # batches of 1, 3, 2 sequences, and a 2-D [tokens, in] one
        g.add_batch(part)
    flat = x.reshape(-1, 24).double()
    want = 2 / 7 * flat.t() @ flat  # n counts sequences, as the reference
    torch.testing.assert_close(g.H.double(), want, rtol=1e-5, atol=1e-5)
    assert g.nsamples == 7 and g.ntokens == 70


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size,granularity", GRANULARITIES)
def test_identity_hessian_gives_round_to_nearest(symmetric, group_size, granularity):
    torch.manual_seed(1)
    w = torch.randn(16, 128)
    g = GPTQ(w)
    g.add_batch(torch.eye(128) * 2.0)  # H proportional to I: no error is worth propagating
    res = g.quantize(bits=4, group_size=group_size, symmetric=symmetric, block_size=32)
    codes, wq = rtn_codes(w, 4, symmetric, granularity)
    assert torch.equal(res.codes, codes)
    torch.testing.assert_close(res.weight_dq, wq, rtol=0, atol=0)
    torch.testing.assert_close(dequantize(res.codes, res.qparams), res.weight_dq, rtol=0, atol=1e-6)
    assert res.dead_columns == 0 and res.notes == []


@pytest.mark.parametrize("outliers", [0, 4])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, None)])
def test_gptq_beats_rtn_on_layer_output(outliers, bits, group_size):
    torch.manual_seed(2)
    w = torch.randn(48, 96) * 0.05
    x = correlated_inputs(512, 96, outliers)
    res = solver(w, x).quantize(bits=bits, group_size=group_size)
    _, wq = rtn_codes(w, bits, True, "channel" if group_size is None else group_size)
    assert out_err(w, res.weight_dq, x) < 0.8 * out_err(w, wq, x)


def test_act_order_static_groups_valid_codes_and_better_than_rtn():
    torch.manual_seed(3)
    w = torch.randn(32, 96) * 0.05
    x = correlated_inputs(512, 96, outliers=3, seed=3)
    res = solver(w, x).quantize(bits=4, group_size=32, act_order=True, static_groups=True)
    assert res.codes.dtype == torch.uint8 and int(res.codes.max()) <= 15
    assert res.qparams.group_size == 32 and tuple(res.qparams.scale.shape) == (32, 3) and res.g_idx is None
    torch.testing.assert_close(dequantize(res.codes, res.qparams), res.weight_dq, rtol=0, atol=1e-6)
    _, wq = rtn_codes(w, 4, True, 32)
    assert out_err(w, res.weight_dq, x) <= out_err(w, wq, x)
    # static groups are the RTN groups of the (unpermuted) weight
    torch.testing.assert_close(res.qparams.scale, qparams(w, 4, True, 32).scale)


def test_act_order_dynamic_groups_store_per_column_qparams_and_g_idx():
    torch.manual_seed(4)
    w = torch.randn(16, 64)
    x = correlated_inputs(256, 64, outliers=2, seed=4)
    res = solver(w, x).quantize(bits=4, group_size=16, act_order=True)
    assert res.qparams.group_size == 1 and res.g_idx is not None and res.g_idx.shape == (64,)
    assert sorted(torch.bincount(res.g_idx).tolist()) == [16, 16, 16, 16]
    torch.testing.assert_close(dequantize(res.codes, res.qparams), res.weight_dq, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="static_groups"):
        packable(res)


def test_rank_deficient_hessian_with_dead_columns_does_not_crash():
    torch.manual_seed(5)
    w = torch.randn(16, 64)
    x = torch.randn(1, 10, 64)  # 10 tokens for 64 columns: rank <= 10
    x[..., :5] = 0  # 5 inputs always zero
    g = GPTQ(w)
    g.add_batch(x)
    res = g.quantize(bits=4, group_size=32, percdamp=0.0)  # no damping: the first Cholesky must fail
    assert res.dead_columns == 5
    assert torch.isfinite(res.weight_dq).all() and res.weight_dq[:, :5].abs().max() == 0
    assert res.damp_used > 0
    text = " ".join(res.notes)
    assert "dead" in text and "rank-deficient" in text and "escalated" in text


def test_quantize_without_inputs_and_bad_config_raise():
    with pytest.raises(ValueError, match="add_batch"):
        GPTQ(torch.randn(4, 8)).quantize()
    with pytest.raises(ValueError, match="static_groups"):
        GPTQConfig(group_size=None, static_groups=True)
    with pytest.raises(ValueError, match="percdamp"):
        GPTQConfig(percdamp=-0.1)
    with pytest.raises(ValueError, match="bits"):
        GPTQConfig(bits=9)
    assert GPTQConfig(bits=3, act_order=True, static_groups=True).tag == "gptq.w3.g128.sym.act.static"


# --------------------------------------------------------------------------------------------------
# whole tiny models


def lm_batches(n: int = 8, seq: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 97, (1, seq), generator=g) for _ in range(n)]


def _outputs(model: nn.Module, batches) -> list[torch.Tensor]:
    with torch.no_grad():
        outs = [model(**b) if isinstance(b, dict) else model(b) for b in batches]
    return [o.logits if hasattr(o, "logits") else o.last_hidden_state for o in outs]


def _rtn_blocks(model: nn.Module, bits: int, group_size: int) -> None:
    """Round-to-nearest on the same layers GPTQ quantizes (block linears)."""
    spec = arch_of(model)
    for block in get_blocks(model, spec):
        for name in spec.linears:
            m = block.get_submodule(name)
            set_linear_weight(m, rtn_codes(linear_weight(m, spec).detach(), bits, True, group_size)[1], spec)


@pytest.mark.parametrize("make,data", [(tiny_llama, lm_batches), (tiny_gpt2, lm_batches), (tiny_bert, bert_batches)])
def test_gptq_model_output_closer_to_float_than_rtn(make, data):
    batches = data()
    ref = _outputs(make(), batches)
    err = lambda outs: sum((o - r).pow(2).sum().item() for o, r in zip(outs, ref))
    rtn_model = make()
    _rtn_blocks(rtn_model, 3, 32)
    gptq_model = make()
    results = gptq_quantize_model(gptq_model, batches, GPTQConfig(bits=3, group_size=32), progress=False)
    spec = arch_of(gptq_model)
    assert len(results) == 2 * len(spec.linears)
    for fqn, res in results.items():  # what is in the model is what the codes say
        torch.testing.assert_close(linear_weight(gptq_model.get_submodule(fqn), spec), res.weight_dq)
        torch.testing.assert_close(dequantize(res.codes, res.qparams), res.weight_dq, rtol=0, atol=1e-6)
    assert err(_outputs(gptq_model, batches)) < 0.9 * err(_outputs(rtn_model, batches))


def test_quantize_entry_point_needs_calib_and_leaves_lm_head():
    model = tiny_llama()
    with pytest.raises(ValueError, match="calib"):
        quantize_(model, GPTQConfig(group_size=32))
    head = model.lm_head.weight.detach().clone()
    with pytest.warns(UserWarning, match="lm_head"):
        quantize_(model, GPTQConfig(group_size=32), calib=lm_batches(4))
    assert torch.equal(model.lm_head.weight, head)
    assert len(model.qlib_gptq) == 14  # 2 blocks x 7 linears
    only_down = tiny_llama()
    quantize_(only_down, GPTQConfig(group_size=32), filter_fn=lambda m, f: f.endswith("down_proj"), calib=lm_batches(4))
    assert sorted(only_down.qlib_gptq) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_shared_input_hessian_matches_a_layer_alone():
    batches = lm_batches(4)
    together = gptq_quantize_model(tiny_llama(), batches, GPTQConfig(group_size=32), progress=False)
    for name in ("self_attn.k_proj", "mlp.up_proj"):  # share q_proj's / gate_proj's input and Hessian
        fqn = f"model.layers.0.{name}"  # alone in its group; the attention before the MLP quantized as in `together`
        keep = lambda m, f: f == fqn or (name.startswith("mlp") and f.startswith("model.layers.0.self_attn"))
        alone = gptq_quantize_model(tiny_llama(), batches, GPTQConfig(group_size=32), progress=False, filter_fn=keep)
        assert torch.equal(alone[fqn].codes, together[fqn].codes) and alone[fqn].loss == together[fqn].loss


def test_gptq_codes_pack_into_int4_kernels():
    model = tiny_llama()
    results = gptq_quantize_model(model, lm_batches(4), GPTQConfig(group_size=48, pad=True), progress=False)  # 64 = 48 + 16
    fqn = "model.layers.0.mlp.down_proj"  # 128 = 2 x 48 + 32
    want = results[fqn].weight_dq.clone()
    codes, qp = packable(results[fqn])
    assert codes.shape[1] == 144 and dequantize(codes, qp)[:, 128:].abs().max() == 0
    with pytest.raises(ValueError, match="int4 kernel"):  # 48 is not a kernel group
        pack_quantized(model, {fqn: (codes, qp)}, progress=False)
    model = tiny_llama()
    results = gptq_quantize_model(model, lm_batches(4), GPTQConfig(group_size=32), progress=False)
    want = results[fqn].weight_dq.clone()
    pack_quantized(model, {f: packable(r) for f, r in results.items()}, act_dtype=torch.float32, progress=False)
    torch.testing.assert_close(model.get_submodule(fqn).dequantized_weight(), want, rtol=1e-6, atol=1e-6)
