"""qlib.tools.reference: gptqmodel / llm-compressor GPTQ and AWQ wrappers on a tiny random Llama saved to disk.

Each wrapper must return a plain float32 model whose block linears lie on the library's 4-bit grid and whose
outputs match the library's own quantized model; qlib's GPTQ and gptqmodel's GPTQ must agree closely.
Tolerances are measured values (tiny_llama with 4 KV heads, 8 windows of 32 tokens, W4 g32) with about 3x headroom.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("gptqmodel")
pytest.importorskip("llmcompressor")

from qlib.tools import reference as R  # noqa: E402
from qlib.methods.gptq import GPTQConfig  # noqa: E402
from qlib.methods.gptq import gptq_quantize_model  # noqa: E402
from test_arch import V, tiny_llama  # noqa: E402

GS = 32  # two groups per 64-wide row; every width here is a multiple of 32, as gptqmodel's packer needs
BLOCK_LINEARS = 14  # 2 layers x (q, k, v, o, gate, up, down)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    """tiny_llama with 4 KV heads (v_proj 64 wide: gptqmodel's AWQ clip needs out_features % 64 == 0) and a tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_llama")
    model = tiny_llama(kv_heads=4)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 0, 1, 2
    model.save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", eos_token="t1", pad_token="t2",
                            unk_token="t3").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, V, (1, 32), generator=g) for _ in range(8)]


@pytest.fixture(scope="module")
def runs(tiny_dir, calib) -> dict[str, tuple[nn.Module, dict]]:
    """Every wrapper once on the same model and windows (the libraries are the slow part)."""
    torch.set_num_threads(1)
    return {
        "gptqmodel_gptq": R.gptqmodel_gptq(tiny_dir, calib, group_size=GS),
        "llmcompressor_gptq": R.llmcompressor_gptq(tiny_dir, calib, group_size=GS),
        "gptqmodel_awq": R.gptqmodel_awq(tiny_dir, calib, group_size=GS),
        "llmcompressor_awq": R.llmcompressor_awq(tiny_dir, calib, group_size=GS),
    }


# --------------------------------------------------------------------------------------------------
# unpacking, without any library


def test_unpack_int32_inverts_packing():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (64, 24), generator=g)
    shifts = torch.arange(8) * 4
    rows = (codes.view(8, 8, 24) << shifts.view(1, 8, 1)).sum(1)  # pack 8 consecutive rows per word (GPTQ qweight)
    cols = (codes.view(64, 3, 8) << shifts).sum(-1)  # pack 8 consecutive columns per word (GPTQ qzeros)
    to32 = lambda t: ((t + 2**31) % 2**32 - 2**31).to(torch.int32)  # noqa: E731 (wrap to signed words)
    assert torch.equal(R.unpack_int32(to32(rows), 4, 0), codes)
    assert torch.equal(R.unpack_int32(to32(cols), 4, 1), codes)


def test_dequant_awq_gemm_matches_the_library_layout():
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm, pack_awq

    g = torch.Generator().manual_seed(0)
    codes, zeros = torch.randint(0, 16, (64, 32), generator=g), torch.randint(0, 16, (2, 32), generator=g)
    scales = torch.rand(2, 32, generator=g) + 0.1
    qweight, qzeros = pack_awq(codes.to(torch.int32), zeros.to(torch.int32), 4)
    ours = R.dequant_awq_gemm(qweight, qzeros, scales, group_size=32)
    assert torch.equal(ours, dequantize_gemm(qweight, qzeros, scales, 4, 32).t())
    assert torch.equal(ours, (scales.repeat_interleave(32, 0) * (codes - zeros.repeat_interleave(32, 0))).t())


def test_bad_inputs_say_what_to_pass(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match=r"LongTensor \[1, seq_len\]"):
        R.llmcompressor_gptq(tiny_dir, [torch.zeros(32, dtype=torch.long)])
    with pytest.raises(FileNotFoundError, match="config.json"):
        R.gptqmodel_gptq(tmp_path, [torch.zeros(1, 32, dtype=torch.long)])
    with pytest.raises(ValueError, match="in_features % group_size"):
        R.gptqmodel_awq(tiny_dir, [torch.zeros(1, 32, dtype=torch.long)], group_size=48)
    with pytest.raises(ValueError, match="in_features % group_size"):
        R.llmcompressor_gptq(tiny_dir, [torch.zeros(1, 32, dtype=torch.long)], group_size=48)
    with pytest.raises(ValueError, match="bfloat16"):
        R.gptqmodel_awq(tiny_dir, [torch.zeros(1, 32, dtype=torch.long)], dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# every wrapper: a plain float model on the library's grid, equal to the library's own model


@pytest.mark.parametrize("name", ["gptqmodel_gptq", "llmcompressor_gptq", "gptqmodel_awq", "llmcompressor_awq"])
def test_wrapper_returns_float_model_on_the_grid(runs, tiny_dir, name):
    model, info = runs[name]
    original = tiny_llama(kv_heads=4)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert len(info["quantized_layers"]) == BLOCK_LINEARS and info["same_layers_as_qlib"] and info["wall_s"] > 0
    assert info["settings"]["n_windows"] == 8 and info["notes"]
    mods = dict(model.named_modules())
    for fqn in info["quantized_layers"]:
        w = mods[fqn].weight.detach()
        assert R.grid_levels(w, GS) <= 16, fqn  # at most 2**4 values per row and group
        assert not torch.equal(w, dict(original.named_modules())[fqn].weight), fqn  # it was quantized
    assert torch.equal(model.lm_head.weight, original.lm_head.weight)  # lm_head stays float
    assert info["check"]["max_grid_levels_per_group"] <= 16


def test_gptqmodel_gptq_unpacking_matches_library(runs):
    check = runs["gptqmodel_gptq"][1]["check"]
    # the library dequantizes in float16 (fp16 scales x codes): measured 3.1e-5 (half an fp16 step at |w| ~ 0.06) ...
    assert check["max_abs_weight_diff_vs_library_dequant"] <= 1e-4
    # ... and its TorchLinear runs in float16: measured 1.1e-4 on logits of magnitude 0.5
    assert check["max_abs_logit_diff"] <= 5e-4


def test_llmcompressor_weights_are_its_fake_quant_values(runs):
    for name in ("llmcompressor_gptq", "llmcompressor_awq"):
        check = runs[name][1]["check"]
        assert check["codes_in_range"] and check["max_abs_grid_residual"] == 0.0
        assert check["max_abs_logit_diff"] <= 1e-6  # same float32 forward, the library re-applies the same QDQ


def test_gptqmodel_awq_unpacking_matches_library(runs):
    model, info = runs["gptqmodel_awq"]
    check = info["check"]
    assert check["max_abs_weight_diff_vs_library_dequant"] == 0.0  # the library's own dequantize_gemm, fp32 scales
    # the library's model runs in bfloat16: measured 2.0e-3 on logits of magnitude 0.5 (ours cast to bf16)
    assert check["max_abs_logit_diff"] <= 6e-3
    norms = [m.weight for n, m in model.named_modules() if n.endswith("input_layernorm")]
    assert any(not torch.equal(w, torch.ones_like(w)) for w in norms)  # AWQ scales were folded into the norms


# --------------------------------------------------------------------------------------------------
# qlib's GPTQ against gptqmodel's: same algorithm, same windows, same settings


def test_qlib_gptq_close_to_gptqmodel_gptq(runs, tiny_dir, calib):
    from transformers import AutoModelForCausalLM

    lib_model, _ = runs["gptqmodel_gptq"]
    ours = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    fp = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    gptq_quantize_model(ours, calib, GPTQConfig(bits=4, group_size=GS, symmetric=True, percdamp=0.01), progress=False)
    lib_mods, our_mods, fp_mods = dict(lib_model.named_modules()), dict(ours.named_modules()), dict(fp.named_modules())
    worst = 0.0
    for fqn in runs["gptqmodel_gptq"][1]["quantized_layers"]:
        w_lib, w_ours, w_fp = (m[fqn].weight.detach() for m in (lib_mods, our_mods, fp_mods))
        # the two GPTQ results differ far less than either differs from the float weight
        worst = max(worst, float((w_lib - w_ours).norm() / (w_fp - w_ours).norm()))
    assert worst <= 0.006, worst  # measured 0.0018 (fp16 scale storage, token-normalised H, summation order)
    x = torch.cat(calib)
    with torch.inference_mode():
        h_fp, h_lib, h_ours = (m.model(x).last_hidden_state for m in (fp, lib_model, ours))
    gap = float((h_lib - h_ours).norm() / (h_fp - h_ours).norm())
    assert gap <= 0.012, gap  # final hidden states: measured 0.0037
