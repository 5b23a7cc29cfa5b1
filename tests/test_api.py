"""Tests for qlib.quant.api.quantize_ and qlib.quant.config: layer selection, RTN, W8A8 dynamic/static, validation."""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from qlib.quant import api
from qlib.quant.api import default_filter, quantize_, register
from qlib.quant.config import QuantConfig, RTNConfig, W8A8Config
from qlib.quant.fakequant import QuantLinear
from qlib.quant.primitives import rtn, sqnr_db

torch.set_num_threads(1)


def mlp(seed: int = 0) -> nn.Sequential:
    """A small random MLP (64 -> 128 -> 64 -> 16)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 16))


def inputs(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(seed))


class TinyLM(nn.Module):
    """Embedding -> linear -> lm_head tied to the embedding; called with keyword input_ids like HF models."""

    def __init__(self, vocab: int = 50, dim: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.relu(self.proj(self.embed(input_ids))))


def test_rtn_changes_only_filtered_layers():
    ref, m = mlp(), mlp()
    out = quantize_(m, RTNConfig(bits=4, group_size=32), filter_fn=lambda mod, fqn: fqn in {"0", "4"})
    assert out is m
    for i in (0, 4):
        w, w0 = m[i].weight.detach(), ref[i].weight.detach()
        assert not torch.equal(w, w0) and (w - w0).abs().max() < 0.1 * w0.abs().max()
        groups = w.reshape(-1, 32)
        assert max(len(torch.unique(g)) for g in groups) <= 16  # each group of 32 sits on a 4-bit grid
        assert torch.equal(m[i].bias, ref[i].bias)
    assert torch.equal(m[2].weight, ref[2].weight)
    assert set(m.qlib_quantized) == {"0", "4"} and m.qlib_quantized["0"] == RTNConfig(bits=4, group_size=32)
    quantize_(m, RTNConfig(bits=8, group_size=None), filter_fn=lambda mod, fqn: fqn == "2")
    assert set(m.qlib_quantized) == {"0", "2", "4"} and m.qlib_quantized["2"].bits == 8


def test_rtn_quality_and_default_filter():
    ref, m = mlp(), mlp()
    x = inputs()
    quantize_(m, RTNConfig(bits=8, group_size=None))
    assert set(m.qlib_quantized) == {"0", "2", "4"}
    assert sqnr_db(ref(x), m(x)) > 35
    assert default_filter(nn.Linear(2, 2), "x") and not default_filter(nn.Conv1d(2, 2, 1), "x")


def test_rtn_is_atomic_when_one_layer_fails():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(96, 96), nn.Linear(96, 64), nn.Linear(64, 8))
    m = copy.deepcopy(ref)
    with pytest.raises(ValueError, match=r"layer 2: group size 48 does not divide the input dimension 64"):
        quantize_(m, RTNConfig(bits=4, group_size=48))  # divides 96 (layers 0, 1) but not 64 (layer 2)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), ref.parameters()))
    assert not hasattr(m, "qlib_quantized")


def test_rtn_unties_tied_lm_head():
    m = TinyLM()
    emb0 = m.embed.weight.detach().clone()
    with pytest.warns(UserWarning, match="tied"):
        quantize_(m, RTNConfig(bits=4, group_size=32))
    assert torch.equal(m.embed.weight, emb0)  # the embedding keeps full precision
    assert m.lm_head.weight is not m.embed.weight and not torch.equal(m.lm_head.weight, emb0)


def test_filter_matching_nothing_raises():
    with pytest.raises(ValueError, match="filter_fn matched no nn.Linear in Sequential"):
        quantize_(mlp(), RTNConfig(), filter_fn=lambda mod, fqn: "attn" in fqn)


def test_w8a8_dynamic_close_to_float():
    ref, x = mlp(), inputs()
    y = ref(x)
    for gran in ("tensor", "token"):
        m = quantize_(mlp(), W8A8Config(act_granularity=gran))
        assert all(isinstance(m[i], QuantLinear) for i in (0, 2, 4))
        assert sqnr_db(y, m(x)) > 25
    m = quantize_(mlp(), W8A8Config(act_bits=4))
    assert sqnr_db(y, m(x)) < 25  # the check has teeth: 4-bit activations fall well below it


def test_w8a8_static_calibrated_close_to_float():
    ref, x = mlp(), inputs()
    calib = [inputs(32, seed=10 + i) for i in range(4)]
    m = quantize_(mlp(), W8A8Config(act_mode="static"), calib=calib)
    assert all(m[i].static and m[i].act_scale.dim() == 0 for i in (0, 2, 4))
    assert sqnr_db(ref(x), m(x)) > 25
    assert "0.act_scale" in m.state_dict()
    # frozen: a much larger input is clipped by the calibrated range, so the error grows a lot
    assert sqnr_db(ref(x * 20), m(x * 20)) < sqnr_db(ref(x), m(x)) - 10


def test_w8a8_static_calibrates_through_dict_batches():
    ref = TinyLM()
    ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(0))
    m = quantize_(copy.deepcopy(ref), W8A8Config(act_mode="static", act_observer="percentile"),
                  calib=[{"input_ids": ids[:2]}, {"input_ids": ids[2:]}])
    assert sqnr_db(ref(input_ids=ids), m(input_ids=ids)) > 25


def test_w8a8_static_needs_calibration():
    with pytest.raises(ValueError, match="W8A8 static needs calibration data: pass calib="):
        quantize_(mlp(), W8A8Config(act_mode="static"))
    with pytest.raises(ValueError, match="calib is empty"):
        quantize_(mlp(), W8A8Config(act_mode="static"), calib=[])


@pytest.mark.parametrize("kwargs, words", [
    (dict(bits=1), "2..8"),
    (dict(bits=9), "2..8"),
    (dict(group_size=0), "group_size=0 is invalid"),
    (dict(observer="kl"), "observer='kl' is unknown"),
    (dict(pad="yes"), "pad='yes' is invalid"),
])
def test_rtn_config_validation(kwargs, words):
    with pytest.raises(ValueError, match=words):
        RTNConfig(**kwargs)


@pytest.mark.parametrize("kwargs, words", [
    (dict(act_mode="lazy"), "act_mode='lazy' is unknown"),
    (dict(act_granularity="channel"), "act_granularity='channel' is unknown"),
    (dict(act_mode="static", act_granularity="token"), "cannot be per-token"),
    (dict(act_observer="mse"), "only applies to static"),
    (dict(weight_bits=16), "weight_bits=16 is outside"),
    (dict(act_bits=1), "act_bits=1 is outside"),
    (dict(weight_group_size=-3), "weight_group_size=-3 is invalid"),
])
def test_w8a8_config_validation(kwargs, words):
    with pytest.raises(ValueError, match=words):
        W8A8Config(**kwargs)


def test_configs_are_frozen_and_tagged():
    cfg = RTNConfig()
    with pytest.raises(AttributeError):
        cfg.bits = 8  # type: ignore[misc]
    assert cfg.tag == "rtn.w4.g128.sym"
    assert RTNConfig(bits=3, group_size=None, symmetric=False).tag == "rtn.w3.ch.asym"
    assert W8A8Config().tag == "w8a8.dynamic.t.asym"
    assert W8A8Config(act_mode="static", act_observer="mse").tag == "w8a8.static.t.asym.mse"


def test_registry_dispatch_and_unknown_config():
    @dataclass(frozen=True)
    class NoHandlerConfig(QuantConfig):
        pass

    with pytest.raises(ValueError, match="no handler is registered for NoHandlerConfig"):
        quantize_(mlp(), NoHandlerConfig())

    @dataclass(frozen=True)
    class MarkConfig(QuantConfig):
        pass

    seen = {}

    @register(MarkConfig)
    def _mark(model, config, fqns, calib):
        seen["fqns"], seen["calib"] = fqns, calib
        return model

    try:
        quantize_(mlp(), MarkConfig(), filter_fn=lambda mod, fqn: mod.out_features == 64, calib="c")
        assert seen == {"fqns": ["2"], "calib": "c"}
    finally:
        api._HANDLERS.pop(MarkConfig, None)


def test_calibration_batches_must_be_inputs_only():
    from collections import UserDict  # HF BatchEncoding is a UserDict, not a dict

    ref = TinyLM()
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    m = quantize_(copy.deepcopy(ref), W8A8Config(act_mode="static"), calib=[UserDict(input_ids=ids)])
    assert sqnr_db(ref(input_ids=ids), m(input_ids=ids)) > 25
    with pytest.raises(ValueError, match="pass model inputs only"):
        quantize_(mlp(), W8A8Config(act_mode="static"), calib=[(inputs(4), torch.zeros(4))])


def test_rtn_pad_gives_a_shorter_last_group():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(576, 64))  # SmolLM2-135M's hidden size: 576 = 4 x 128 + 64
    msg = "layer 0: group size 128 does not divide the input dimension 576; pick a divisor such as 64 or 192, " \
          "or pass pad=True for a shorter last group (as the GPTQ reference does)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        quantize_(copy.deepcopy(ref), RTNConfig(bits=4, group_size=128))
    m = quantize_(copy.deepcopy(ref), RTNConfig(bits=4, group_size=128, pad=True))
    w, w0 = m[0].weight.detach(), ref[0].weight.detach()
    assert torch.equal(w, rtn(w0, 4, True, 128, pad=True))
    assert max(len(torch.unique(r)) for r in w[:, 512:]) <= 16  # the 64-wide last group is on its own 4-bit grid
    assert max(len(torch.unique(g)) for g in w[:, :512].reshape(-1, 128)) <= 16
    x = torch.randn(32, 576, generator=torch.Generator().manual_seed(2))
    assert 15 < sqnr_db(ref(x), m(x)) < 30  # 4-bit g128 on a uniform-init layer: measured ~20 dB
    assert RTNConfig(pad=True).tag == RTNConfig().tag == "rtn.w4.g128.sym"
