"""qlib.methods.mixed: real packed bytes, the allocation DP (budget, monotone, brute force), one-layer sensitivity, applying plans."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from qlib.methods.gptq import GPTQConfig
from qlib.methods.gptq import gptq_quantize_model, packable
from qlib.quant.kernels import Int4WeightOnlyLinear, Int8WeightOnlyLinear, pack_quantized, packed_bytes
from qlib.methods.mixed import (DEFAULT_OPTIONS, W8, LayerOption, allocate, capture_inputs, gptq_layer_configs,
                        layer_sensitivity, linear_shapes, option_costs, output_errors, packed_linear_bytes, plan_bytes,
                        plan_options, prune_dominated, rtn_apply, rtn_codes, rtn_weight, transfer_losses, uniform_plan)
from qlib.lab.eval import kl_top1
from test_arch import tiny_llama


@pytest.mark.parametrize("shape", [(192, 576), (576, 1536), (40, 100), (33, 64)])
@pytest.mark.parametrize("option", list(DEFAULT_OPTIONS) + [LayerOption(4, None), LayerOption(3, 64), LayerOption(2, 32)])
def test_packed_bytes_match_the_kernel_modules(shape, option):
    torch.manual_seed(0)
    lin = nn.Linear(shape[1], shape[0], bias=shape == (40, 100))
    q, qp = rtn_codes(lin.weight, option)
    cls = Int4WeightOnlyLinear if option.bits <= 4 else Int8WeightOnlyLinear
    mod = cls.from_codes(q, qp, lin.bias, in_features=lin.in_features)
    assert packed_linear_bytes(*shape[::-1][::-1], option, bias=lin.bias is not None) == packed_bytes(mod)


def test_padding_makes_g128_dearer_than_g64_on_576_inputs():
    g64, g128 = LayerOption(4, 64), LayerOption(4, 128)
    assert packed_linear_bytes(576, 576, g128) > packed_linear_bytes(576, 576, g64)  # 576 pads to 640 at g128
    assert packed_linear_bytes(576, 1536, g128) < packed_linear_bytes(576, 1536, g64)
    kept = prune_dominated({"a": (576, 576, False), "b": (576, 1536, False)}, DEFAULT_OPTIONS)
    assert [o.tag for o in kept["a"]] == ["w4g32", "w4g64", "w8ch.sym"]
    assert [o.tag for o in kept["b"]] == ["w4g32", "w4g64", "w4g128", "w4g256", "w8ch.sym"]


def _problem(seed: int, layers: int = 5, options: int = 3):
    g = torch.Generator().manual_seed(seed)
    costs = {f"l{i}": {f"o{j}": int(c) for j, c in enumerate(torch.randint(10, 200, (options,), generator=g))}
             for i in range(layers)}
    losses = {f: {t: float(torch.rand(1, generator=g)) for t in c} for f, c in costs.items()}
    return losses, costs


def _brute(losses, costs, budget):
    best = None
    for combo in itertools.product(*[list(c) for c in costs.values()]):
        plan = dict(zip(costs, combo))
        if sum(costs[f][t] for f, t in plan.items()) <= budget:
            loss = sum(losses[f][t] for f, t in plan.items())
            best = loss if best is None else min(best, loss)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_optimal_respects_budget_and_is_monotone(seed):
    losses, costs = _problem(seed)
    lo = sum(min(c.values()) for c in costs.values())
    hi = sum(max(c.values()) for c in costs.values())
    previous = float("inf")
    for budget in range(lo, hi + 1, max(1, (hi - lo) // 25)):
        a = allocate(losses, costs, budget)
        assert a.exact and a.bytes <= budget
        assert a.bytes == sum(costs[f][t] for f, t in a.plan.items())
        assert a.loss == pytest.approx(_brute(losses, costs, budget), abs=1e-12)
        assert a.loss <= previous + 1e-12  # more bytes never hurt
        previous = a.loss
    with pytest.raises(ValueError, match="below the cheapest plan"):
        allocate(losses, costs, lo - 1)


def test_coarse_units_still_respect_the_budget():
    losses, costs = _problem(11, layers=8, options=4)
    lo = sum(min(c.values()) for c in costs.values())
    for budget in (lo, lo + 37, lo + 301):
        a = allocate(losses, costs, budget, max_states=7)
        assert a.bytes <= budget and not (a.exact and budget > lo)
        assert a.loss >= _brute(losses, costs, budget) - 1e-12


def test_transfer_scales_the_measured_kl_by_output_error():
    measured = {"a": {"w4g64": 0.2}, "b": {"w4g64": 0.1, "w8ch.sym": 0.003}}
    errors = {"a": {"w4g64": 4.0, "w4g32": 2.0, "w8ch.sym": 0.01}, "b": {"w4g64": 1.0, "w8ch.sym": 0.02}}
    out = transfer_losses(measured, errors, "w4g64")
    assert out["a"] == pytest.approx({"w4g64": 0.2, "w4g32": 0.1, "w8ch.sym": 0.0005})
    assert out["b"] == {"w4g64": 0.1, "w8ch.sym": 0.003}  # measured values win
    with pytest.raises(KeyError, match="reference"):
        transfer_losses({"a": {}}, errors, "w4g64")


def _windows(n=2, seq=24):
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 97, (n, seq), generator=g)


def test_one_layer_sensitivity_equals_a_plain_forward_and_resumes():
    model = tiny_llama()
    windows = _windows()
    opt = LayerOption(2, 32)  # coarse enough for a KL well above float noise on a random-init model
    fqns = ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    with torch.inference_mode():
        ref = [model(w[None]).logits for w in windows]
    seen = []
    got = layer_sensitivity(model, windows, {f: [opt] for f in fqns}, on_layer=lambda f, r: seen.append(f), progress=False)
    assert seen == fqns
    for f in fqns:  # the cached-prefix shortcut gives what a whole forward gives
        m = tiny_llama()
        with torch.no_grad():
            lin = m.get_submodule(f)
            lin.weight.copy_(rtn_weight(lin.weight, opt))
            want = sum(kl_top1(r, m(w[None]).logits)["kl"] for r, w in zip(ref, windows)) / len(windows)
        assert got[f][opt.tag] == pytest.approx(want, rel=1e-5, abs=1e-9)
        assert got[f][opt.tag] > 0
    for (_, a), (_, b) in zip(model.state_dict().items(), tiny_llama().state_dict().items()):
        assert torch.equal(a, b)  # every weight restored
    again = layer_sensitivity(model, windows, {f: [opt, W8] for f in fqns}, done={fqns[0]: {opt.tag: -1.0}},
                              progress=False)
    assert again[fqns[0]][opt.tag] == -1.0 and 0 <= again[fqns[0]][W8.tag] < got[fqns[0]][opt.tag]


def test_mixed_beats_uniform_at_the_same_bytes_on_planted_sensitivity():
    model = tiny_llama()
    sensitive = "model.layers.0.mlp.down_proj"
    with torch.no_grad():  # a few huge weights per row: 4-bit groups holding them lose everything else
        w = model.get_submodule(sensitive).weight
        w[:, ::16] *= 40
    fqns = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    shapes = linear_shapes(model, fqns)
    options = prune_dominated(shapes, [LayerOption(4, 32), LayerOption(4, 64), W8])
    windows = _windows(3, 32)
    kl = layer_sensitivity(model, windows, {f: [LayerOption(4, 64)] for f in fqns}, progress=False)
    errs = output_errors(model, capture_inputs(model, fqns, windows), options)
    losses = transfer_losses(kl, errs, "w4g64")
    costs = option_costs(shapes, [LayerOption(4, 32), LayerOption(4, 64), W8])
    uniform = uniform_plan(fqns, LayerOption(4, 32))
    budget = plan_bytes(shapes, uniform)
    alloc = allocate(losses, costs, budget)
    assert alloc.bytes <= budget and alloc.plan[sensitive] == "w8ch.sym"

    def measured(plan):
        m = tiny_llama()
        with torch.no_grad():
            m.get_submodule(sensitive).weight[:, ::16] *= 40
        with torch.inference_mode():
            ref = [m(w[None]).logits for w in windows]
        codes = rtn_apply(m, plan)
        with torch.inference_mode():
            return sum(kl_top1(r, m(w[None]).logits)["kl"] for r, w in zip(ref, windows)), m, codes

    kl_uniform, _, _ = measured(uniform)
    kl_mixed, m, codes = measured(plan_options(alloc))
    assert kl_mixed < 0.9 * kl_uniform  # measured here: 0.81
    before = packed_bytes(m)
    pack_quantized(m, codes, progress=False)  # the plan's real bytes are the packed modules' bytes
    assert packed_bytes(m) - before == plan_bytes(shapes, plan_options(alloc)) - sum(
        4 * o * i for o, i, _ in shapes.values())


def test_gptq_layer_configs():
    from test_gptq import lm_batches

    batches = lm_batches(4)
    base = GPTQConfig(bits=4, group_size=32)
    plain = gptq_quantize_model(tiny_llama(), batches, base, progress=False)
    same = gptq_quantize_model(tiny_llama(), batches, base, progress=False, layer_configs={})
    assert all(torch.equal(plain[f].codes, same[f].codes) for f in plain)
    plan = {"model.layers.1.mlp.down_proj": W8, "model.layers.1.self_attn.q_proj": LayerOption(3, 32)}
    cfgs = gptq_layer_configs(plan, base)
    model = tiny_llama()
    mixed = gptq_quantize_model(model, batches, base, progress=False, layer_configs=cfgs)
    for f in plain:
        if f.startswith("model.layers.0."):  # block 0 is untouched by the per-layer configs of block 1
            assert torch.equal(plain[f].codes, mixed[f].codes)
    assert mixed["model.layers.1.mlp.down_proj"].qparams.bits == 8 and mixed["model.layers.1.mlp.down_proj"].qparams.symmetric
    assert int(mixed["model.layers.1.self_attn.q_proj"].codes.max()) <= 7
    pack_quantized(model, {f: packable(r) for f, r in mixed.items()}, act_dtype=torch.float32, progress=False)
    assert isinstance(model.get_submodule("model.layers.1.mlp.down_proj"), Int8WeightOnlyLinear)
    with pytest.raises(ValueError, match="not linears inside the blocks"):
        gptq_quantize_model(tiny_llama(), batches, base, progress=False, layer_configs={"lm_head": base})


def test_option_validation():
    with pytest.raises(ValueError, match="int8 kernel"):
        LayerOption(8, 128)
    assert LayerOption(4, 128).tag == "w4g128" and W8.tag == "w8ch.sym"
