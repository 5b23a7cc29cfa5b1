import math

import pytest

from qlib.analysis.cost import (
    ARITHMETIC_VERDICTS, BERT_BASE, LLAMA_7B, ROBERTA_BASE, SMOLLM2_135M, article_checks_as_claims, decode_read_params, break_even_months, business_case,
    decode_roofline_tokens_per_s, decoder_params, encoder_params, hardware_table, kv_cache_bytes, load_prices,
    measure_cpu_bandwidth, monthly_cost, plot_sensitivity, recompute_article, roofline_table, sensitivity,
    serving_cost, total_cost_of_ownership, weight_only_bytes,
)
from qlib.lab.results import validate_claims


@pytest.fixture(scope="module")
def checks():
    return {r["item"]: r for r in recompute_article()}


def test_prices_file_is_dated_and_sourced():
    prices = load_prices()
    assert prices["as_of"] and prices["currency"] == "USD"
    art = prices["scenarios"]["article"]
    assert art["instances"]["a100-gpu"]["hourly"] == 4.10 and art["hours_per_month"] == 720
    for name, spec in prices["hardware"].items():
        assert spec["source"], name
    assert prices["hardware"]["this-cpu"]["mem_bandwidth_GBps"] is None       # measured at run time
    assert prices["hardware"]["A100-40GB"]["mem_bandwidth_GBps"] == 1555


def test_monthly_cost_and_hours():
    assert monthly_cost(4.10, 4, 720) == pytest.approx(11_808)
    assert monthly_cost(4.10, 4) == pytest.approx(11_972)                    # 730 h default
    with pytest.raises(ValueError):
        monthly_cost(-1)


def test_article_cost_figures_recomputed(checks):
    assert checks["four-A100 hourly"]["value"] == pytest.approx(16.40)
    assert checks["one-A100 monthly"]["value"] == pytest.approx(2_952)
    assert checks["LLaMA cost reduction"]["value"] == pytest.approx(75.0)
    assert checks["BERT-large cost reduction"]["value"] == pytest.approx(35.36, abs=0.01)
    assert checks["hours per month"]["value"] == pytest.approx(720)
    for item in ("four-A100 hourly", "four-A100 monthly", "one-A100 monthly", "LLaMA cost reduction", "BERT-large cost reduction"):
        assert checks[item]["verdict"] == "adds up", item
    saving = checks["LLaMA monthly saving"]
    assert saving["value"] == pytest.approx(8_856) and saving["verdict"] == "close"  # 8,848 = rounded 11,800 − 2,952


def test_1340_saving_is_flagged(checks):
    row = checks["BERT-large monthly saving"]
    assert row["value"] == pytest.approx((0.526 - 0.34) * 720)                 # $133.92 per instance
    assert row["verdict"] == "does not add up"
    assert "10.0 instances" in row["note"]
    assert checks["three-week bill"]["verdict"] == "does not add up"           # $4,200 vs 16.40 × 504 h = $8,266


def test_article_size_figures(checks):
    assert checks["LLaMA-7B FP16 size"]["value"] == pytest.approx(13.48, abs=0.01)
    assert 3.7 < checks["LLaMA-7B GPTQ INT4 size"]["value"] < 4.0
    assert checks["RoBERTa-base FP16 = 498MB"]["verdict"] == "does not add up"  # 498 MB is the fp32 size
    assert checks["BERT-base ONNX dynamic INT8"]["value"] == pytest.approx(181, abs=1)
    assert all(r["verdict"] in ARITHMETIC_VERDICTS for r in checks.values())
    claims = validate_claims(article_checks_as_claims(list(checks.values())))
    assert len(claims) == len(checks)


def test_param_counts_match_published_totals():
    assert sum(decoder_params(**LLAMA_7B).values()) == pytest.approx(6.74e9, rel=0.002)
    assert sum(encoder_params(**BERT_BASE).values()) == 109_482_240           # bert-base-uncased
    assert sum(encoder_params(**ROBERTA_BASE).values()) == pytest.approx(124.6e6, rel=0.002)
    params = {"linear": 1024, "embedding": 100}
    assert weight_only_bytes(params, 4) == pytest.approx(512 + 200)
    assert weight_only_bytes(params, 4, group_size=128, zero_bits=4) == pytest.approx(512 + 8 * 2.5 + 200)


def test_roofline_arithmetic():
    assert decode_roofline_tokens_per_s(1e9, 1000) == pytest.approx(1000)
    assert decode_roofline_tokens_per_s(1e9, 1000, batch=8) == pytest.approx(8000)  # weights read once per step
    assert decode_roofline_tokens_per_s(1e9, 1000, batch=4, kv_cache_bytes_per_seq=0.25e9) == pytest.approx(2000)
    assert kv_cache_bytes(layers=2, kv_heads=4, head_dim=8, context=10) == 2 * 2 * 4 * 8 * 10 * 2
    with pytest.raises(ValueError):
        decode_roofline_tokens_per_s(0, 1000)


def test_roofline_table_fits_and_skips_unmeasured():
    hw = hardware_table(load_prices())
    rows = roofline_table({"fp16": 14e9, "int4": 3.5e9}, hw)
    assert {r["hardware"] for r in rows} == {"A100-40GB", "A100-80GB-SXM", "H100-SXM", "T4", "RTX-4090"}
    t4 = {r["variant"]: r for r in rows if r["hardware"] == "T4"}
    assert t4["fp16"]["fits"] is True and t4["int4"]["speedup_bound"] == pytest.approx(4.0)
    assert t4["int4"]["tokens_per_s_bound"] == pytest.approx(320e9 / 3.5e9)
    rows = roofline_table({"fp16": 20e9}, hardware_table(load_prices(), cpu_GBps=30.0))
    assert {r["hardware"]: r["fits"] for r in rows}["T4"] is False
    assert {r["hardware"]: r["tokens_per_s_bound"] for r in rows}["this-cpu"] == pytest.approx(1.5)


def test_measure_cpu_bandwidth_is_plausible():
    gbps = measure_cpu_bandwidth(size_mb=64, reps=3)
    assert 0.5 < gbps < 2000
    assert 0.5 < measure_cpu_bandwidth(size_mb=16, reps=3, best=True) < 2000


def test_serving_cost_rounds_up_instances():
    out = serving_cost(requests_per_month=730 * 3600 * 25, throughput_per_s=10, hourly=1.0)
    assert out["instances_needed"] == pytest.approx(2.5) and out["instances"] == 3
    assert out["monthly"] == pytest.approx(3 * 730)


def test_break_even_and_tco():
    assert break_even_months(400, 200) == pytest.approx(2.0)
    assert break_even_months(0, 0) == 0.0 and math.isinf(break_even_months(100, -5))
    tco = total_cost_of_ownership(2_952, 12, baseline_monthly=11_808, ab_months=1, calibration_cost=300,
                                  validation_hours=40, hourly_rate=100)
    assert tco["total"] == pytest.approx(2_952 * 12 + 11_808 + 300 + 4_000)
    case = business_case(11_808, 2_952, months=12, ab_months=1, calibration_cost=300, validation_hours=40, hourly_rate=100)
    assert case["one_time"] == pytest.approx(11_808 + 300 + 4_000)
    assert case["break_even_months"] == pytest.approx((11_808 + 4_300) / 8_856)
    assert case["worth_it"] and case["saving"] == pytest.approx(11_808 * 12 - case["quantize_total"])
    with pytest.raises(ValueError, match="ab_months"):
        total_cost_of_ownership(1, 2, ab_months=3)


def test_sensitivity_varies_one_argument_at_a_time():
    rows = sensitivity(lambda a, b: a * b, {"a": 2.0, "b": 3.0}, {"a": [1.0, 4.0], "b": [0.0]})
    assert [(r["param"], r["value"], r["result"], r["delta"]) for r in rows] == \
           [("a", 1.0, 3.0, -3.0), ("a", 4.0, 12.0, 6.0), ("b", 0.0, 0.0, -6.0)]
    rows = sensitivity(lambda x: {"y": x + 1}, {"x": 1}, {"x": [2]}, output="y")
    assert rows[0]["result"] == 3.0 and rows[0]["base"] == 2.0
    with pytest.raises(ValueError, match="base_kwargs"):
        sensitivity(lambda x: x, {"x": 1}, {"z": [1]})
    import matplotlib
    matplotlib.use("Agg")
    ax = plot_sensitivity(sensitivity(lambda a, b: a * b, {"a": 2.0, "b": 3.0}, {"a": [1.0, 4.0], "b": [2.0, 5.0]}))
    assert [t.get_text() for t in ax.get_yticklabels()] == ["b", "a"]        # widest bar (a: 9) on top


def test_smollm2_architecture_matches_the_measured_model():
    params = decoder_params(**SMOLLM2_135M)
    assert sum(params.values()) == 134_515_008                                 # 00_baselines counts 134,515,008
    assert sum(decoder_params(**{**SMOLLM2_135M, "kv_hidden": None}).values()) > 134_515_008  # GQA matters
    read = decode_read_params(params)
    assert read["lm_head"] == params["embedding"] and "embedding" not in read   # tied head read whole, lookup not
    assert weight_only_bytes(read, 32, float_bytes=4) == pytest.approx(538.06e6, rel=1e-4)
    # packed INT8 (qlib): linears and the untied head at 8 bits, the embedding table stays fp32 in the file
    file_int8 = weight_only_bytes({**read, "embedding": params["embedding"]}, 8, float_bytes=4, quantize=("linear", "lm_head"))
    assert file_int8 == pytest.approx(248_330_088, rel=0.01)                   # 01_int8_ptq's measured file bytes
    untied = decode_read_params(decoder_params(**LLAMA_7B))
    assert untied["lm_head"] == 32000 * 4096


def test_calibration_cost_is_compared_with_the_articles_gptq_time(checks):
    row = checks["calibration cost per model"]
    assert row["value"] == pytest.approx(4.10 * 45 / 60)
    assert row["verdict"] == "unexplained" and "65-130×" in row["note"]
