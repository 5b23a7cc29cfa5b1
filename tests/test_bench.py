"""Tests for qlib.lab.bench: timing statistics, decode speed harness, peak memory, bytes on disk, parameter counts."""
from __future__ import annotations

import os
import time
import warnings

import pytest
import torch
from torch import nn

from qlib.lab import bench

torch.set_num_threads(1)


def tiny_llama(tie: bool = True):
    """A random 2-layer Llama small enough to decode in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def test_set_threads_and_cpu_info():
    before = torch.get_num_threads()
    try:
        assert bench.set_threads(1) == 1 and torch.get_num_threads() == 1
        assert bench.set_threads() == len(os.sched_getaffinity(0))
        with pytest.raises(ValueError):
            bench.set_threads(0)
    finally:
        torch.set_num_threads(before)
    info = bench.cpu_info()
    assert info["logical_cores"] >= info["available_cores"] >= 1
    assert set(info["flags"]) >= {"avx2", "avx512f", "avx512_vnni", "amx_tile"}
    assert info["torch_version"] == torch.__version__
    assert info["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_latency_of_sleep():
    res = bench.latency(lambda: time.sleep(0.005), warmup=1, reps=10)
    assert res["reps"] == 10
    assert 4.9 <= res["median_ms"] <= 25.0  # sleep never returns early; a busy shared machine can add delay
    assert res["p90_ms"] >= res["median_ms"] >= res["min_ms"] >= 4.9
    capped = bench.latency(lambda: time.sleep(0.005), warmup=0, reps=1000, min_reps=3, max_seconds=0.03)
    assert 3 <= capped["reps"] < 50  # stops after ~30 ms, but not before min_reps


def test_throughput_rows():
    rows = bench.throughput(lambda b, s: (lambda: time.sleep(0.001 * b)), batch_sizes=(1, 4), seq_lens=(8, 16),
                            warmup=0, reps=3)
    assert [(r["batch"], r["seq"]) for r in rows] == [(1, 8), (1, 16), (4, 8), (4, 16)]
    for r in rows:
        assert set(r) >= {"batch", "seq", "median_ms", "p90_ms", "items_per_s"}
        assert r["items_per_s"] == pytest.approx(r["batch"] / (r["median_ms"] / 1e3))


def test_decode_generates_exactly_new_tokens_even_when_eos_wins():
    model = tiny_llama()
    eos = model.generation_config.eos_token_id
    # make EOS the argmax at every step: plain greedy decoding stops after one token
    model.lm_head.register_forward_hook(lambda m, a, out: out.index_fill(-1, torch.tensor([eos]), 1e4))
    prompt = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain = model.generate(prompt, do_sample=False, max_new_tokens=12, pad_token_id=0)
    assert plain.shape[1] - 6 == 1
    lengths = []
    original = model.generate

    def spy(ids, **kw):
        out = original(ids, **kw)
        lengths.append(out.shape[1] - ids.shape[1])
        return out

    model.generate = spy
    res = bench.decode_tokens_per_s(model, prompt, new_tokens=12, warmup=1, reps=2)
    assert lengths and all(n == 12 for n in lengths)
    assert res["new_tokens"] == 12 and res["batch"] == 2 and res["prompt_len"] == 6 and res["reps"] == 2
    assert res["prefill_ms"] > 0
    assert res["ms_per_token"] == pytest.approx(res["generate_ms"] / 12)
    assert res["tokens_per_s"] == pytest.approx(2 * 12 / (res["generate_ms"] / 1e3))


def test_peak_memory_sees_a_200mb_tensor():
    def alloc():
        x = torch.ones(50_000_000)  # 200 MB, every page touched
        time.sleep(0.02)
        return float(x[-1])

    res = bench.peak_memory(alloc)
    assert res["peak_rss_delta_bytes"] >= 150e6
    assert res["rss_before_bytes"] > 0 and res["peak_rss_bytes"] == res["rss_before_bytes"] + res["peak_rss_delta_bytes"]
    idle = bench.peak_memory(lambda: time.sleep(0.01))
    assert idle["peak_rss_delta_bytes"] < 50e6


def test_serialized_bytes_linear_tied_and_int8():
    lin = nn.Linear(64, 32)
    payload = 4 * (64 * 32 + 32)
    size = bench.serialized_bytes(lin)
    assert payload <= size <= payload + 1024  # only a small JSON header on top
    assert bench.serialized_bytes(lin.state_dict()) == size

    emb = nn.Embedding(100, 16)
    head = nn.Linear(16, 100, bias=False)
    head.weight = emb.weight  # tied
    tied = nn.ModuleDict({"emb": emb, "head": head})
    assert 4 * 1600 <= bench.serialized_bytes(tied) <= 4 * 1600 + 1024
    assert bench.param_count(tied) == 1600

    q = {"w": torch.zeros(1000, 10, dtype=torch.int8), "scale": torch.ones(1000, dtype=torch.float16)}
    assert 10_000 + 2_000 <= bench.serialized_bytes(q) <= 12_000 + 1024
    big = torch.zeros(100, 10)
    assert 4 * 500 <= bench.serialized_bytes({"half": big[:50]}) <= 4 * 500 + 1024  # a view is stored alone


def test_serialized_bytes_of_torch_ao_dynamic_int8():
    model = nn.Sequential(nn.Linear(256, 256))
    with warnings.catch_warnings():  # torch.ao quantization is deprecated and says so
        warnings.simplefilter("ignore")
        qmodel = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    fp32, int8 = bench.serialized_bytes(model), bench.serialized_bytes(qmodel)
    assert 256 * 256 <= int8 <= 256 * 256 + 4 * 256 + 2048  # int8 weights + fp32 bias + scales
    assert fp32 / int8 == pytest.approx(4.0, rel=0.1)


def test_param_count():
    model = tiny_llama(tie=True)
    assert bench.param_count(model) == sum(p.numel() for p in model.parameters())
    untied = tiny_llama(tie=False)
    assert bench.param_count(untied) - bench.param_count(model) == 96 * 32  # the separate lm_head
