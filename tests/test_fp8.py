"""qlib.quant.fp8: the written-out FP8 rounding equals PyTorch's own float8 casts; the simulation and the handler."""
import pytest
import torch
from torch import nn

from qlib.quant.api import quantize_
from qlib.quant.fp8 import FORMATS, FP8Config, FP8Linear, cast_fp8, fp8_quant_dequant, fp8_scale, round_to_fp8


def _all_finite_values(fmt: str) -> torch.Tensor:
    """Every finite value of the format, decoded by PyTorch from all 256 bit patterns."""
    bits = torch.arange(256, dtype=torch.uint8)
    v = bits.view(FORMATS[fmt].dtype).float()
    return v[torch.isfinite(v)]


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_rounding_equals_torch_cast_on_random_values(fmt):
    g = torch.Generator().manual_seed(0)
    f = FORMATS[fmt]
    # log-uniform magnitudes across the whole range (subnormals to max), both signs
    mag = torch.exp(torch.empty(200_000).uniform_(-25, torch.log(torch.tensor(f.max)).item(), generator=g))
    x = mag * torch.where(torch.rand(200_000, generator=g) < 0.5, -1.0, 1.0)
    assert torch.equal(round_to_fp8(x, fmt), x.to(f.dtype).float())


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_rounding_equals_torch_cast_on_edges(fmt):
    f = FORMATS[fmt]
    grid = _all_finite_values(fmt).unique()
    mids = (grid[1:] + grid[:-1]) / 2  # exact ties: round half to even
    nudged = torch.cat([mids * (1 + 2**-20), mids * (1 - 2**-20)])
    x = torch.cat([grid, mids, nudged, torch.tensor([0.0, -0.0, f.max, -f.max])])
    assert torch.equal(round_to_fp8(x, fmt), x.to(f.dtype).float())
    assert torch.equal(round_to_fp8(grid, fmt), grid)  # every grid value is a fixed point


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_saturates_like_cast_fp8(fmt):
    f = FORMATS[fmt]
    x = torch.tensor([f.max * 1.01, -f.max * 3, 1e30, float("inf")])
    expect = torch.tensor([f.max, -f.max, f.max, f.max])
    assert torch.equal(round_to_fp8(x, fmt), expect)
    assert torch.equal(cast_fp8(x, fmt), expect)  # torch's own E5M2 cast would give inf here; the clamp stops that
    assert torch.isnan(round_to_fp8(torch.tensor([float("nan")]), fmt)).all()


def test_relative_error_bound_and_formats_order():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 256, generator=g) * torch.logspace(-2, 2, 256)  # channels over four decades
    for fmt, man in (("e4m3", 3), ("e5m2", 2)):
        q = fp8_quant_dequant(x, fmt, "channel")
        s = fp8_scale(x, fmt, "channel")
        normal = x.abs() / s >= 2.0 ** FORMATS[fmt].min_normal_exp
        rel = ((q - x).abs() / x.abs())[normal]
        assert rel.max() <= 2.0 ** -(man + 1) + 1e-7  # half a mantissa step, relative
        assert torch.allclose(q.abs().amax(dim=1), x.abs().amax(dim=1), rtol=1e-6)  # each row's max lands on the grid's max
    err = {f: (fp8_quant_dequant(x, f, "channel") - x).pow(2).mean() for f in ("e4m3", "e5m2")}
    assert err["e4m3"] < err["e5m2"]  # one more mantissa bit


def test_fp8_beats_int8_per_tensor_with_an_outlier():
    from qlib.quant.primitives import quant_dequant, qparams

    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, 512, generator=g)
    x[:, 7] *= 1000  # one outlier channel, as LLM activations have
    small = torch.ones_like(x, dtype=torch.bool)
    small[:, 7] = False
    fp8 = fp8_quant_dequant(x, "e4m3", "tensor")
    int8 = quant_dequant(x, qparams(x, 8, True, "tensor"))
    assert (fp8 - x)[small].pow(2).mean() < 0.05 * (int8 - x)[small].pow(2).mean()


def test_handler_weight_only_and_activations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    x = torch.randn(4, 32)
    ref = model(x)
    w0 = model[0].weight.detach().clone()
    quantize_(model, FP8Config("e4m3", "channel"))
    assert isinstance(model[0], FP8Linear) and isinstance(model[2], FP8Linear)
    assert torch.equal(model[0].weight, fp8_quant_dequant(w0, "e4m3", "channel"))
    y = model(x)
    assert 0 < (y - ref).abs().max() < 0.05 * ref.abs().max()
    m2 = nn.Sequential(nn.Linear(32, 16))
    quantize_(m2, FP8Config("e5m2", "tensor", act_format="e4m3", act_granularity="token"))
    lin = m2[0]
    expect = torch.nn.functional.linear(fp8_quant_dequant(x, "e4m3", "token"), lin.weight, lin.bias)
    assert torch.equal(lin(x), expect)
    assert FP8Config("e4m3", act_format="e5m2").tag == "fp8.we4m3.ch.ae5m2.t"


def test_config_validation():
    with pytest.raises(ValueError, match="unknown"):
        FP8Config("e3m4")
    with pytest.raises(ValueError, match="act_granularity"):
        FP8Config(act_format="e4m3", act_granularity="channel")
