"""Tests for qlib.methods.awq: exact folding, AWQ beats RTN on planted outliers, ratio 0 is RTN, search/apply apart, errors."""
from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from qlib.quant.api import quantize_
from qlib.methods.arch import ARCHS, arch_of, get_blocks, linear_weight
from qlib.methods.awq import (AWQConfig, AWQGroupScale, AWQResult, apply_clips, apply_scales, awq_apply, awq_search,
                              fold_scales, search_clip)
from qlib.methods.calib import capture_block_inputs, run_block
from qlib.quant.config import RTNConfig
from qlib.quant.primitives import dequantize, group_index, qparams, quant_dequant

torch.set_num_threads(1)
VOCAB, HIDDEN, GROUP = 96, 64, 32


def tiny_llama(kv_heads: int = 4, outliers: bool = False, seed: int = 0) -> LlamaForCausalLM:
    """A 2-block llama (hidden 64, MLP 128, 4 heads) in fp32; ``outliers``: 4 hidden channels 50x larger after each norm."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    if outliers:
        chans = torch.tensor([3, 17, 40, 58])
        with torch.no_grad():
            for blk in model.model.layers:
                for norm in (blk.input_layernorm, blk.post_attention_layernorm):
                    norm.weight[chans] *= 50.0
    return model


def batches(n: int = 4, seq: int = 32, seed: int = 0) -> list[torch.Tensor]:
    return [torch.randint(0, VOCAB, (1, seq), generator=torch.Generator().manual_seed(seed + i)) for i in range(n)]


def only_blocks(mod: nn.Module, fqn: str) -> bool:
    return fqn.startswith("model.layers.")


def rtn_model(model: nn.Module, bits: int) -> nn.Module:
    return quantize_(copy.deepcopy(model), RTNConfig(bits=bits, group_size=GROUP, symmetric=False, pad=True),
                     filter_fn=only_blocks)


def block0_mse(model: nn.Module, ref: nn.Module, data: list[torch.Tensor]) -> float:
    """MSE of block 0's output in ``model`` against ``ref``'s, on the same inputs (captured from ``ref``)."""
    spec = arch_of(ref)
    x, kw = capture_block_inputs(ref, data, spec)
    want = run_block(get_blocks(ref, spec)[0], x, kw)
    got = run_block(get_blocks(model, spec)[0], x, kw)
    return sum((a - b).pow(2).sum().item() for a, b in zip(want, got)) / sum(a.numel() for a in want)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_folding_scales_without_quantization_leaves_outputs_unchanged():
    model = tiny_llama()
    res = awq_search(model, batches(2), AWQConfig(bits=4, group_size=GROUP, n_grid=2, clip=False), progress=False)
    gen = torch.Generator().manual_seed(1)
    wild = [dataclasses.replace(g, scale=torch.exp(torch.empty_like(g.scale).uniform_(-2.3, 2.3, generator=gen)))
            for g in res.groups]  # 0.1..10
    ids = torch.randint(0, VOCAB, (2, 24), generator=gen)
    ref = logits(model, ids)
    for groups in (res.groups, wild):
        folded = apply_scales(copy.deepcopy(model), AWQResult(groups, {}, res.meta))
        assert (logits(folded, ids) - ref).abs().max() < 1e-5
        changed = folded.model.layers[0].input_layernorm.weight
        assert not torch.equal(changed, model.model.layers[0].input_layernorm.weight)  # the fold did move weights


def test_fold_into_gemma_style_norm_uses_the_weight_offset():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    spec = next(s for s in ARCHS if s.family == "gemma3")
    torch.manual_seed(0)
    norm, lin = Gemma3RMSNorm(HIDDEN), nn.Linear(HIDDEN, 16)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(8, HIDDEN)
    ref = lin(norm(x))
    fold_scales(norm, [lin], torch.exp(torch.randn(HIDDEN)), spec)  # (1 + w) / s - 1, not w / s
    assert torch.allclose(lin(norm(x)), ref, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 3])
def test_awq_beats_rtn_on_planted_outlier_channels(bits: int):
    model = tiny_llama(outliers=True)
    cfg = AWQConfig(bits=bits, group_size=GROUP)
    res = awq_search(model, batches(4), cfg, progress=False)
    awq = awq_apply(copy.deepcopy(model), res, cfg)
    held_out = batches(4, seed=100)
    err_awq, err_rtn = block0_mse(awq, model, held_out), block0_mse(rtn_model(model, bits), model, held_out)
    assert err_awq < 0.7 * err_rtn, (err_awq, err_rtn)
    ids = torch.cat(held_out)
    ref = logits(model, ids)
    assert (logits(awq, ids) - ref).pow(2).mean() < (logits(rtn_model(model, bits), ids) - ref).pow(2).mean()
    qkv = next(g for g in res.groups if g.prev == "model.layers.0.input_layernorm")
    assert qkv.best_ratio > 0 and qkv.loss_best < 0.7 * qkv.loss_ratio0  # the outliers make scaling pay
    assert all(isinstance(g, AWQGroupScale) and g.loss_best <= g.loss_ratio0 for g in res.groups)


def test_ratio_zero_reproduces_rtn_exactly():
    model = tiny_llama(outliers=True)
    cfg = AWQConfig(bits=4, group_size=24, n_grid=1, clip=False)  # 64 = 2 x 24 + 16: a shorter last group too
    res = awq_search(model, batches(2), cfg, progress=False)
    assert res.scales and all(torch.equal(s, torch.ones_like(s)) for s in res.scales.values())
    awq = awq_apply(copy.deepcopy(model), res, cfg)
    rtn = quantize_(copy.deepcopy(model), RTNConfig(bits=4, group_size=24, symmetric=False, pad=True), filter_fn=only_blocks)
    for (name, p), q in zip(awq.named_parameters(), rtn.parameters()):
        assert torch.equal(p, q), name
    full = awq_search(model, batches(2), AWQConfig(bits=4, group_size=24, n_grid=20, clip=False), progress=False)
    assert [g.prev for g in full.groups] == [g.prev for g in res.groups]
    for g, f in zip(res.groups, full.groups):  # the first grid point of a full search is that same RTN
        assert f.losses[0] == pytest.approx(g.loss_best, rel=1e-6)


def test_search_and_apply_are_separable(tmp_path):
    model = tiny_llama(outliers=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = AWQConfig(bits=4, group_size=GROUP)
    res = awq_search(model, batches(3), cfg, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the search left the model alone
    assert res.clips and not any("q_proj" in k or "k_proj" in k for k in res.clips)  # llm-awq skips q/k clipping
    loaded = AWQResult.load(res.save(tmp_path / "awq"))
    assert loaded.meta == res.meta and set(loaded.clips) == set(res.clips)
    assert [g.record() for g in loaded.groups] == [g.record() for g in res.groups]  # same groups, same order
    assert all(torch.equal(a.scale, b.scale) for a, b in zip(loaded.groups, res.groups))
    a = awq_apply(copy.deepcopy(model), res, cfg)
    b = awq_apply(copy.deepcopy(model), loaded, cfg)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    spec = arch_of(model)
    for fqn, (codes, qp) in b.qlib_awq_codes.items():  # the fake-quant weights are exactly the codes' values
        w = linear_weight(b.get_submodule(fqn), spec)
        assert torch.equal(dequantize(codes, qp)[:, : w.shape[1]], w)
    with pytest.raises(ValueError, match="different quantizer"):
        awq_apply(copy.deepcopy(model), res, AWQConfig(bits=3, group_size=GROUP))


def test_apply_clips_clamps_each_group_to_its_searched_value():
    model = tiny_llama(outliers=True)
    res = awq_search(model, batches(2), AWQConfig(bits=3, group_size=24), progress=False)  # 64 = 24 + 24 + 16
    scaled = apply_scales(copy.deepcopy(model), res)
    clipped = apply_clips(copy.deepcopy(scaled), res)
    shrunk = 0
    for fqn, max_val in res.clips.items():
        w0, w = scaled.get_submodule(fqn).weight, clipped.get_submodule(fqn).weight
        bound = max_val[:, group_index(w.shape[1], 24)]
        assert torch.equal(w, torch.clamp(w0, -bound, bound)), fqn
        amax = torch.zeros_like(max_val).scatter_reduce(1, group_index(w.shape[1], 24).expand_as(w0), w0.abs(), "amax")
        assert (max_val <= amax).all() and (max_val >= 0.5 * amax - 1e-6).all()
        shrunk += int((max_val < amax).sum())
    assert shrunk > 0


@pytest.mark.parametrize("symmetric,group_size", [(False, 32), (True, 32), (False, 48), (False, None)])
def test_search_quantizer_is_bit_identical_to_primitives(symmetric: bool, group_size: int | None):
    from qlib.methods.awq import rtn_qdq

    w = torch.randn(40, 80, generator=torch.Generator().manual_seed(0)) * torch.rand(80) * 3  # 80 = 48 + 32: short group
    cfg = AWQConfig(bits=3, group_size=group_size, symmetric=symmetric)
    want = quant_dequant(w, qparams(w, 3, symmetric, cfg.granularity, pad=True))
    assert torch.equal(rtn_qdq(w, cfg), want)


def test_clip_search_never_increases_partial_output_error():
    gen = torch.Generator().manual_seed(0)
    w = torch.distributions.StudentT(2.0).sample((48, 96))  # heavy tails: clipping should help somewhere
    x = torch.randn(256, 96, generator=gen)
    cfg = AWQConfig(bits=3, group_size=GROUP)
    max_val = search_clip(w, x, cfg)
    amax = w.abs().reshape(48, 3, GROUP).amax(-1)
    assert max_val.shape == (48, 3) and (max_val <= amax).all() and (max_val >= 0.5 * amax - 1e-6).all()
    assert (max_val < amax).any()
    clipped = torch.maximum(torch.minimum(w, max_val.repeat_interleave(GROUP, 1)), -max_val.repeat_interleave(GROUP, 1))

    def err(v: torch.Tensor) -> float:
        q = quant_dequant(v, qparams(v, 3, False, GROUP))
        return (x @ (q - w).T).pow(2).mean().item()

    assert err(clipped) < err(w)


def test_quantize_entry_point_gqa_and_packing():
    from qlib.quant.kernels import pack_quantized

    model = tiny_llama(kv_heads=2, outliers=True)  # grouped-query attention: v_proj -> o_proj cannot be scaled
    ids = torch.cat(batches(2, seed=50))
    ref = logits(model, ids)
    with pytest.warns(UserWarning, match="outside the transformer blocks"):
        quantize_(model, AWQConfig(bits=4, group_size=GROUP), calib=batches(3))  # default filter includes lm_head
    res = model.qlib_awq_result
    assert not any(k.endswith("v_proj") for k in res.scales) and any(k.endswith("up_proj") for k in res.scales)
    assert "lm_head" in model.qlib_quantized and len(model.qlib_awq_codes) == 14
    fake = logits(model, ids)
    assert 0 < (fake - ref).pow(2).mean() < 0.1 * ref.pow(2).mean()
    packed = pack_quantized(copy.deepcopy(model), model.qlib_awq_codes, act_dtype=torch.float32, progress=False)
    assert torch.allclose(logits(packed, ids), fake, atol=1e-4)


def test_empty_calibration_and_unknown_arch_errors():
    model, cfg = tiny_llama(), AWQConfig(bits=4, group_size=GROUP)
    with pytest.raises(ValueError, match="calib is empty"):
        awq_search(model, [], cfg, progress=False)
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize_(model, cfg, filter_fn=only_blocks)
    odd = tiny_llama()
    odd.config.model_type = "no-such-family"
    with pytest.raises(ValueError) as want:
        arch_of(odd)
    with pytest.raises(ValueError, match=re.escape(str(want.value))):
        awq_search(odd, batches(1), cfg, progress=False)
    with pytest.raises(ValueError, match="selected none"):
        awq_search(model, batches(1), cfg, filter_fn=lambda m, f: False, progress=False)


def test_config_validation_and_tag():
    assert AWQConfig().tag == "awq.w4.g128.asym" and AWQConfig(bits=3, clip=False).tag == "awq.w3.g128.asym.noclip"
    for bad in ({"group_size": -1}, {"n_grid": 0}, {"max_shrink": 1.0}, {"bits": 9}, {"clip": 1}, {"n_clip_tokens": 0}):
        with pytest.raises(ValueError):
            AWQConfig(**bad)
    with pytest.raises(ValueError, match="does not divide"):
        awq_search(tiny_llama(), batches(1), AWQConfig(group_size=24, pad=False), progress=False)


@pytest.mark.parametrize("lengths", [(32, 32, 32), (32, 24, 32)])  # equal: attention batches stacked; mixed: one call each
def test_search_losses_equal_a_plain_forward_per_batch(lengths):
    from qlib.methods.arch import scale_groups_for
    from qlib.methods.awq import (accepted_kwargs, act_mean, capture_linear_inputs, gram_pays, scale_candidates,
                           search_group_scale)
    from qlib.methods.calib import block_output, capture_block_kwargs

    model = tiny_llama(outliers=True)
    data = [torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(i)) for i, n in enumerate(lengths)]
    spec, cfg = arch_of(model), AWQConfig(bits=3, group_size=GROUP, n_grid=10)
    xs, _ = capture_block_inputs(model, data, spec)
    kws = capture_block_kwargs(model, data, spec)[0]
    block = copy.deepcopy(get_blocks(model, spec)[0])
    feats, _ = capture_linear_inputs(block, list(spec.linears), xs, kws)
    groups = scale_groups_for(block, spec)
    gram = [gram_pays(block, g, feats[g.linears[0]], spec, cfg.n_grid) for g in groups]
    assert any(g.inspect for g in groups) and any(gram) and not all(gram)  # module outputs, Gram, and plain linears

    def plain(group, x, kw):  # the scored output, one batch at a time, no shortcuts
        if group.inspect:
            mod = block.get_submodule(group.inspect)
            return block_output(mod(x, **accepted_kwargs(mod, kw)))
        return torch.cat([block.get_submodule(n)(x) for n in group.linears], dim=-1)

    with torch.no_grad():
        for group in groups:
            inputs = feats[group.linears[0]]
            _, record = search_group_scale(block, group, inputs, kws, spec, cfg, list(group.linears))
            org = [plain(group, x, kw) for x, kw in zip(inputs, kws)]
            want = []
            for _, s in scale_candidates(act_mean(inputs), cfg.n_grid):
                mods = [block.get_submodule(n) for n in group.linears]
                saved = [m.weight.detach().clone() for m in mods]
                for m in mods:
                    w = m.weight * s
                    m.weight.copy_(quant_dequant(w, qparams(w, 3, False, GROUP, pad=True)) / s)
                want.append(sum((o - plain(group, x, kw)).pow(2).sum().item() for o, x, kw in zip(org, inputs, kws))
                            / sum(o.numel() for o in org))
                for m, w in zip(mods, saved):
                    m.weight.copy_(w)
            assert record["losses"] == pytest.approx(want, rel=1e-4), group.prev
            assert record["best_ratio"] == min(zip(want, range(len(want))))[1] / cfg.n_grid, group.prev
