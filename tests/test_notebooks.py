"""Source notebooks are clean, and every notebook runs end to end with SMOKE=True and records sane metrics."""
import json
from pathlib import Path

import nbformat
import pytest

from qlib.lab.paths import REPO_ROOT
from qlib.lab.results import VERDICTS
from qlib.lab.run import discover, run_notebook

NOTEBOOKS = discover()


def _finite_between(x, lo, hi):
    return isinstance(x, (int, float)) and lo <= x <= hi


def check_00_baselines(m):
    lm = m["lm"]
    for domain, row in lm["perplexity"].items():
        assert _finite_between(row["ppl"], 2.0, 1000.0), (domain, row)
    assert len(lm["perplexity"]) >= 2                      # two held-out domains
    assert 130e6 < lm["params"] < 140e6                     # SmolLM2-135M
    assert lm["decode"]["tokens_per_s"] > 0
    clf = m["classifier"]
    assert clf["accuracy"] > 0.6                            # smoke classifier: far above chance (0.5)
    assert 20e6 < clf["params"] < 25e6                      # MiniLM-L6 + head
    assert m["resnet"]["accuracy"] > 0.6                    # 10 classes: chance is 0.1
    assert 4e6 < m["efficientnet"]["params"] < 5.5e6
    for row in (clf, m["resnet"], m["efficientnet"]):
        # fp32 safetensors bytes ~ 4 bytes per parameter (+ header and buffers)
        assert 3.9 < row["bytes"] / row["params"] < 4.6, row


def check_01_int8_ptq(m):
    clf = {r["variant"]: r for r in m["classifier"]}
    assert 0.55 < clf["torch dynamic int8"]["size ratio"] < 0.75      # Linear weights int8, embeddings (52%) fp32
    assert abs(clf["qlib W8A8 dynamic (sim)"]["Δacc (pt)"]) < 5          # 8-bit simulated: close to fp32
    lm = {r["variant"]: r for r in m["lm"]}
    assert lm["torch dynamic int8"]["ppl_ratio"] > 1.5                    # per-tensor activations break on outliers
    assert lm["qlib int8 weight-only"]["ppl_ratio"] < 1.05                # weight-only INT8 is near lossless
    assert max(r["max_over_median"] for r in m["down_proj_inputs"]) > 100  # the outlier channels are there
    dec = {r["variant"]: r for r in m["decode"]}
    assert dec["qlib int4 g128 (RTN)"]["size ratio"] < 0.4 and dec["qlib int8 weight-only"]["size ratio"] < 0.55


def check_03_sym_vs_asym(m):
    w = {(r["bits"], r["scheme"], r["granularity"]): r for r in m["weights"]}
    for scheme in ("sym", "asym"):  # finer granularity: better weight SQNR and LM perplexity at 4 bits
        assert w[(4, scheme, "channel")]["clf_weight_sqnr_db"] > w[(4, scheme, "tensor")]["clf_weight_sqnr_db"] + 3
        assert w[(4, scheme, "channel")]["lm_ppl"] < w[(4, scheme, "tensor")]["lm_ppl"]
    d = {(r["tensor"], r["scheme"]): r for r in m["distributions"]}
    gelu = [t for t, _ in d if "GELU" in t][0]
    assert d[(gelu, "asym")]["sqnr_4bit_db"] > d[(gelu, "sym")]["sqnr_4bit_db"]  # skewed tensor: zero-point helps


def _dominates(a, b):
    """a is at least as good as b in quality and speedup and better in one."""
    return a["quality"] >= b["quality"] and a["speedup"] >= b["speedup"] and (a["quality"], a["speedup"]) != (b["quality"], b["speedup"])


def check_06_accuracy_budget(m):
    assert any(r["notebook"] == "01_int8_ptq" and r["points"] > 0 for r in m["inventory"])   # committed full run read
    assert m["model_name_checks"] and all(r["match"] for r in m["model_name_checks"])         # derived names fit 00's bytes
    for key, f in m["frontiers"].items():
        pts = {p["method"]: p for p in f["points"]}
        for name in f["speed"]:                      # frontier points are non-dominated ...
            assert not any(_dominates(q, pts[name]) for q in pts.values()), (key, name)
        for name in set(pts) - set(f["speed"]):      # ... and every other point is dominated by one
            assert any(_dominates(q, pts[name]) for q in pts.values()), (key, name)
    assert m["decisions"], "a worked example per zoo model"
    for key, d in m["decisions"].items():
        budget = d["assumptions"]["max_quality_drop"]
        within = [r for r in d["candidates"] if r["quality_drop"] <= budget + 1e-12]
        assert d["chosen"]["quality_drop"] <= budget + 1e-12
        assert d["chosen"]["total_monthly"] == min(r["total_monthly"] for r in within), key
        for r in d["candidates"]:                    # infra + errors + one-time add up; whole instances
            assert abs(r["total_monthly"] - r["infra_monthly"] - r["error_monthly"] - r["one_time_monthly"]) < 1e-6
            assert r["instances"] >= 1 and r["instances"] == int(r["instances"])


def check_11_cost(m):
    c = {r["item"]: r for r in m["article_checks"]}
    assert abs(c["four-A100 hourly"]["value"] - 16.40) < 1e-9 and abs(c["one-A100 monthly"]["value"] - 2952) < 1e-6
    assert abs(c["LLaMA cost reduction"]["value"] - 75.0) < 1e-9
    assert c["BERT-large monthly saving"]["verdict"] == "does not add up"    # $1,340 is ten instances' saving
    assert m["smollm2_params"]["architecture"] == 134_515_008                 # the architecture model counts SmolLM2 exactly
    for r in m["roofline_llama7b"] + m["roofline_smollm2"]:
        assert abs(r["tokens_per_s_bound"] - r["bandwidth_GBps"] / r["model_GB"]) < 1e-6 * r["tokens_per_s_bound"]
    assert {r["hardware"] for r in m["roofline_llama7b"]} >= {"A100-40GB", "H100-SXM", "T4", "RTX-4090", "this-cpu"}
    assert m["cpu"]["read_bandwidth_GBps"] > 0.5
    rows = m["decode_vs_roofline"]
    assert {r["format"] for r in rows} >= {"fp32", "int8", "int4"}
    for r in rows:
        assert abs(r["read MB/token"] / r["read MB (architecture)"] - 1) < 0.12, r   # measured bytes fit the architecture
        if r["format"] != "fp32":                     # smaller formats are faster, but not beyond the bytes they save
            assert 1.0 < r["speedup measured"] <= 1.1 * r["speedup bound"], r
    llama = next(r for r in m["business_cases"] if r["case"].startswith("LLaMA"))
    assert abs(llama["break-even months"] - llama["one-time $"] / (llama["before $/mo"] - llama["after $/mo"])) < 1e-9


def check_05_awq(m):
    fp32 = m["fp32"]
    for d in ("nyt", "shakespeare"):
        assert _finite_between(fp32[f"ppl {d}"], 2.0, 1000.0), fp32
    assert abs(fp32["qlib.lab.eval.perplexity nyt"] / fp32["ppl nyt"] - 1) < 1e-6  # the one-pass evaluation is qlib.lab.eval's ppl
    lm = {(r["method"], r["config"]): r for r in m["lm"]}
    for (method, config), r in lm.items():
        if method != "FP32":
            assert r["ppl nyt"] > fp32["ppl nyt"] and 0 < r["kl nyt"] and r["top1 nyt"] < 1, (method, config)
    for config in {c for _, c in lm if c != "FP32"}:
        assert lm[("AWQ", config)]["ppl nyt"] < lm[("RTN", config)]["ppl nyt"]  # even tiny calibration beats RTN here
    assert {r["method"] for r in m["calibration_sweep"]} == {"GPTQ", "AWQ"} and len(m["domain_shift"]) == 4
    assert all(0 <= g["best_ratio"] < 1 for g in m["awq_search"]["per_group_mean"])
    dec = {next(k for k in ("packed", "fake-quant", "fp32") if k in r["variant"]): r for r in m["decode"]}
    packed, fake = dec["packed"], dec["fake-quant"]  # the INT4 kernel computes what the fake-quant model did
    assert packed["bytes"] < dec["fp32"]["bytes"] and abs(packed["ppl 1 window"] / fake["ppl 1 window"] - 1) < 0.05


def check_09_onnx(m):
    ex = {r["exporter"]: r for r in m["exports"]}
    assert ex["dynamo"]["ok"] and ex["dynamo"]["max_abs_diff"] < 1e-3           # the exported classifier computes PyTorch's logits
    clf = {r["variant"]: r for r in m["classifier"]}
    fp32, dyn = clf["ort fp32"], clf["ort dynamic int8"]
    assert fp32["agree_with_pytorch"] >= 0.99 and abs(fp32["accuracy"] - clf["pytorch fp32"]["accuracy"]) <= 0.01
    assert dyn["bytes"] < 0.35 * fp32["bytes"]                                   # MatMul + Gather weights in one byte
    assert abs(dyn["Δacc (pt)"]) < 5 and dyn["speedup b1"] > 0
    lm = {(r["exporter"], tuple(r["inputs"])): r for r in m["lm_exports"]}
    dynamo, legacy = lm[("dynamo", ("input_ids", "attention_mask"))], lm[("legacy", ("input_ids", "attention_mask"))]
    assert dynamo["ok"] and dynamo["max_abs_diff"] < 1e-3
    assert not lm[("legacy", ("input_ids",))]["ok"] and "aten::diff" in lm[("legacy", ("input_ids",))]["error"]
    assert abs((legacy["bytes"] - dynamo["bytes"]) / (49152 * 576 * 4) - 1) < 0.05  # legacy stores the tied embedding twice
    ppl = {r["variant"]: r for r in m["lm"]}
    assert abs(ppl["ort fp32"]["ppl"] / ppl["pytorch fp32"]["ppl"] - 1) < 1e-3   # ORT perplexity = qlib.lab.eval's on the same windows
    assert ppl["ort int4 b128"]["bytes"] < ppl["ort fp32"]["bytes"] and ppl["ort int4 b128"]["matmul_nbits"] > 0
    assert ppl["ort dynamic int8"]["size ratio"] < 0.5
    rope = {(r["key"], r["exporter"]): r for r in m["rope"]}
    assert rope[("shipped", "dynamo")]["ok"] and rope[("shipped", "legacy")]["ok"]
    assert "aten::polar" in rope[("complex", "legacy")]["error"] and "complex" in rope[("complex", "dynamo")]["error"]
    assert rope[("complex-bcast", "dynamo")]["ok"] and rope[("complex-bcast", "dynamo")]["ort_vs_pytorch_max_abs"] < 1e-3
    assert all(r["pytorch_vs_shipped_max_abs"] < 1e-3 for r in m["rope"])       # the complex form is the same function


def check_04_gptq(m):
    lm = {(r["config"], r["method"]): r for r in m["lm"]}
    fp32, gptq = lm[("FP32", "fp32")], lm[("W4 g128", "GPTQ")]
    for r in lm.values():
        assert _finite_between(r["ppl nyt"], 2.0, 1e4) and 0.0 <= r["kl"] < 5.0, r
    assert fp32["kl"] < 1e-6 and fp32["top1_agreement"] == 1.0                  # FP32 against itself
    dec = {r["variant"]: r for r in m["decode"]}
    packed = dec["int4 g128 GPTQ (packed)"]
    assert abs(packed["ppl (≤8 windows)"] / gptq["ppl nyt"] - 1) < 0.05        # the INT4 kernel runs the GPTQ codes faithfully
    assert packed["bytes"] < dec["fp32"]["bytes"]
    clf = {(r["config"], r["method"]): r for r in m["classifier"]}
    assert clf[("FP32", "fp32")]["accuracy"] > 0.6 and clf[("W4 g128", "GPTQ")]["accuracy"] > 0.55


def check_08_lstm(m):
    fp32 = {r["model"]: r for r in m["fp32"]}
    for r in fp32.values():
        assert 0.0 <= r["f1"] <= 1.0 and r["threshold"] > 0 and r["params"] > 1000, r
    q = {(r["model"], r["variant"]): r for r in m["detector_quantized"]}
    assert abs(q[("bilstm", "ort fp32")]["f1"] - fp32["bilstm"]["f1"]) < 0.01          # the ONNX export is the same detector
    assert q[("bilstm", "torch dynamic int8")]["size ratio"] < 0.45                       # LSTM + Linear weights in int8
    for kind in ("bilstm", "mlp"):
        assert abs(q[(kind, "qlib W8 (RTN per row)")]["Δf1 (pt)"]) < 3, kind             # 8-bit weights: F1 as in FP32
    mods = m["dynamic_int8_modules"]
    assert mods["bare_root_lstm_type_after_quantize_dynamic"] == "torch.nn.modules.rnn.LSTM"   # the silent skip
    assert {"LSTM", "Linear"} <= set(mods["detector_swapped"]["bilstm"]) and mods["onnx_ops_int8"]["DynamicQuantizeLSTM"] > 0
    comp = {(r["lstm"], r["variant"]): r for r in m["compounding"]}
    for lname in {k[0] for k in comp}:                                                    # fewer bits, larger state error
        assert comp[(lname, "W8")]["rel err median"] < comp[(lname, "W4")]["rel err median"] < comp[(lname, "W2")]["rel err median"]
        for v in ("dynamic int8", "W8", "W4", "W2"):
            assert 0.3 < comp[(lname, v)]["accumulated / local (median)"] < 100 and comp[(lname, v)]["steps"] >= 100
    conv = m["char_conversion"]
    assert conv["max_abs_diff_vs_numpy_keras_cell"] < 1e-4 and 460_000 < conv["params"] < 466_000
    char = {r["variant"]: r for r in m["char_lstm"]}
    assert 1.5 < char["fp32"]["ppl"] < 15 and conv["ppl_naive_transpose"] > 10 * char["fp32"]["ppl"]   # the layout matters
    assert char["qlib W8 (per row)"]["ppl_ratio"] < 1.03 and char["torch dynamic int8"]["ppl_ratio"] < 1.15
    assert char["qlib W4 (per row)"]["ppl_ratio"] > char["qlib W8 (per row)"]["ppl_ratio"]
    assert char["qlib W4 g32"]["ppl_ratio"] < char["qlib W4 (per row)"]["ppl_ratio"]     # smaller groups, smaller loss
    tp = {(r["variant"], r["batch"]): r for r in m["throughput"]}
    batches = sorted({b for _, b in tp})
    assert all(r["windows_per_s"] > 0 for r in tp.values())
    assert tp[("ort fp32", batches[-1])]["windows_per_s"] > tp[("ort fp32", batches[0])]["windows_per_s"]  # batching pays
    assert len(m["headline"]["compounding_slopes_int8"]) == 2


def check_02_ptq_vs_qat(m):
    assert m["step0_matches_ptq"] is True                                  # QAT step 0 is the PTQ model, bit for bit
    ptq = {r["variant"]: r for r in m["ptq"]}
    fp32 = ptq["FP32"]["accuracy"]
    assert 0.6 < fp32 <= 1.0
    assert abs(ptq["W8A8, per-channel weights"]["Δacc (pt)"]) < 5            # 8-bit PTQ: close to FP32
    target = m["headline"]["target"]
    assert ptq[target]["accuracy"] <= ptq["W8A8, per-channel weights"]["accuracy"] + 0.02  # 4-bit per-tensor: no better
    for scales, hist in m["qat_curves"].items():
        assert hist[0]["step"] == 0 and abs(hist[0]["metric"] - ptq[target]["accuracy"]) < 1e-12, scales
        assert hist[-1]["train_s"] > 0 and all(0 <= r["metric"] <= 1 for r in hist)
    assert m["cost"]["qat_over_fp32_step"] > 0.5 and m["cost"]["epochs"] > 0
    lm = {r["variant"]: r for r in m["lm"]}
    assert lm["FP32"]["ppl"] > 1.0 and all(r["ppl"] < float("inf") for r in lm.values())  # smoke: a 2-layer LM, huge ppl
    assert lm["W8 weight-only (per-channel)"]["ppl_ratio"] < 1.05           # 8-bit weights alone: near lossless


def check_07_cnn(m):
    for r in m["folding"]:                                                 # BN folding exact in float, every BN folded
        assert r["folded"] == r["bn_layers"] and r["bn_left"] == 0 and r["max_rel_diff"] < 1e-4, r
    fold = {r["model"]: r for r in m["folding"]}
    assert fold["efficientnet-lite0"]["bn_layers"] == 49 and fold["efficientnet-lite0"]["depthwise_folded"] > 0
    r = {(x["weight_bits"], x["variant"]): x for x in m["resnet_ptq"]}
    assert abs(r[(8, "BN folded, per-channel")]["Δacc (pt)"]) < 3                # 8-bit per-channel: close to FP32
    assert m["resnet_qat"]["qat_step0_accuracy"] == m["resnet_qat"]["ptq_accuracy"]  # QAT starts at PTQ
    e = {(x["weight_bits"], x["variant"]): x for x in m["effnet_ptq"]}
    # per-channel moves EfficientNet's output less than per-tensor (depthwise convs, BN spread)
    assert e[(8, "BN folded, per-channel")]["kl"] < e[(8, "BN folded, per-tensor")]["kl"]
    assert e[(8, "naive (BN separate), per-tensor")]["bn_multipliers_zeroed"] > 0
    ort = {(x["model"], x["variant"]): x for x in m["ort"]}
    q = ort[("efficientnet-lite0", "ort int8 (QDQ)")]
    assert q["quantize_nodes"] > 0 and q["size_ratio"] < 0.5                  # INT8 weights: about a quarter of the bytes
    rq, rf = ort[("fmnist-resnet", "ort int8 (QDQ)")], ort[("fmnist-resnet", "ort fp32")]
    assert abs(rq["accuracy"] - rf["accuracy"]) < 0.05 and rf["max_abs_vs_torch_first64"] < 1e-3
    rr = ort[("fmnist-resnet", "ort int8 (QDQ, reduce_range)")]                # 7-bit weights: no U8S8 saturation
    assert abs(rr["accuracy"] - rf["accuracy"]) < 0.05 and rr["size_ratio"] < 0.5 and rr["speedup_b1"] > 0


# Notebook-specific checks on smoke metrics; notebooks without an entry get the generic checks only.
CHECKS = {"00_baselines": check_00_baselines, "01_int8_ptq": check_01_int8_ptq, "03_sym_vs_asym": check_03_sym_vs_asym,
          "05_awq": check_05_awq}
CHECKS.update({"04_gptq": check_04_gptq, "06_accuracy_budget": check_06_accuracy_budget, "11_cost": check_11_cost})
CHECKS.update({"09_onnx": check_09_onnx})


def check_12_beyond(m):
    sens = m["sensitivity"]
    assert len(sens) >= 7 and all(0 < r["w4g128"] < 1 for r in sens.values())  # one 4-bit layer: small, positive KL
    for r in m["transfer_check"]["rows"]:  # KL carried over by output error lands near the directly measured KL
        if r["measured"] > 1e-6:
            assert 0.25 < r["transferred"] / r["measured"] < 4, r
    for a in m["allocations"]:  # the DP stays within the real-byte budget and beats the uniform plan on its own loss
        assert a["exact"] and a["plan bytes"] <= a["budget bytes"] and a["predicted loss"] <= a["uniform predicted loss"]
    mx = {(r["method"], r["variant"]): r for r in m["mixed_vs_uniform"]}
    for r in mx.values():
        assert _finite_between(r["ppl nyt"], 2.0, 1000.0) and _finite_between(r["ppl shakespeare"], 2.0, 1000.0), r
    for method in ("RTN", "GPTQ"):
        u, x = mx[(method, "uniform W4 g128")], mx[(method, "mixed @ W4 g128 bytes")]
        assert x["bytes"] <= u["bytes"] and x["kl"] < 1.2 * u["kl"], (method, x, u)
    sub = {(r["method"], r["variant"]): r for r in m["sub4"]}
    for method in ("RTN", "GPTQ", "AWQ"):  # 3 bits lose more than RTN at 4 bits, and store the same real bytes here
        w3 = sub[(method, "W3 g128")]
        assert w3["kl"] > mx[("RTN", "uniform W4 g128")]["kl"] and w3["real bytes"] == mx[("RTN", "uniform W4 g128")]["bytes"]
    dec = {r["variant"]: r for r in m["decode"]}
    for name, r in dec.items():
        if name != "fp32":
            assert r["block linear bytes"] < 0.2 * dec["fp32"]["block linear bytes"] and r["tokens_per_s"] > 0, r
    assert len(m["points"]) == len(dec) and all(p["speedup"] > 0 for p in m["points"])
    kl = {r["format"]: r["kl"] for r in m["fp8_lm"]}
    assert kl["INT8 W (ch)"] < kl["FP8 E4M3 W (ch)"] < kl["FP8 E5M2 W (ch)"]  # per channel, INT8's even grid is finer
    assert kl["FP8 E4M3 W+A (per-tensor)"] < 0.5 * kl["INT8 W+A (per-tensor)"]  # outlier activations: FP8's range wins
    clf = {r["format"]: r for r in m["fp8_classifier"]}
    assert all(abs(r["Δacc (pt)"]) < 10 for r in clf.values())


CHECKS.update({"12_beyond": check_12_beyond})
CHECKS.update({"08_lstm": check_08_lstm})


def check_10_libraries(m):
    rows = {r["recipe"]: r for r in m["recipes"]}
    fp32 = rows["FP32 (PyTorch eager)"]
    ran = [r for name, r in rows.items() if name != fp32["recipe"] and r["ok"]]
    assert len(ran) >= 9                                                   # every CPU-capable recipe ran
    for r in ran:                                                          # every weight-quantized recipe is smaller
        assert r["bytes"] < fp32["bytes"], r["recipe"]
        assert 0 <= r["kl"] < 1.0 and r["prefill_speedup"] > 0, r["recipe"]
    w8 = [rows[n] for n in ("torchao INT8 weight-only", "qlib W8 (int8pack)", "bitsandbytes LLM.int8()")]
    assert all(r["kl"] < 0.02 and r["top1"] > 0.95 for r in w8)           # INT8 weight-only: close to FP32
    assert rows["torch.ao dynamic INT8"]["kl"] > 5 * rows["torchao INT8 weight-only"]["kl"]  # per-tensor activations hurt
    kls = list(m["rtn_w4_agreement"]["kl"].values())                       # three RTN W4 g64 asym implementations agree
    assert len(kls) == 3 and max(kls) / min(kls) < 1.25 and m["rtn_w4_agreement"]["ppl_max_over_min"] < 1.05
    assert max(kls) > 2 * max(r["kl"] for r in w8)                         # ... and 4 bits cost more than 8
    assert rows["bitsandbytes NF4"]["lines"] <= 3 and rows["bitsandbytes LLM.int8()"]["lines"] <= 3
    assert any("torch.ao.quantization" in d["message"] and "torchao" in d["migration"] for d in m["deprecations"])
    assert len(m["torchao_int4_formats"]) >= 3 and all(f["ok"] or f["error"] for f in m["torchao_int4_formats"])
    for name in ("qlib W8 (int8pack)", "qlib RTN W4 g64 (int4pack)"):             # qlib's packed models save and reload
        assert rows[name]["saved_with"] == "qlib.quant.kernels.save_packed" and rows[name]["reload"] == "ok", rows[name]


CHECKS.update({"10_libraries": check_10_libraries})
CHECKS.update({"02_ptq_vs_qat": check_02_ptq_vs_qat, "07_cnn": check_07_cnn})


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_source_notebook_is_clean(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "commit notebooks without outputs"
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "exactly one cell tagged 'parameters'"
    assert "SMOKE" in params[0].source and "OUT" in params[0].source
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_smoke_run(path, tmp_path):
    outcome = run_notebook(path, smoke=True, out_root=tmp_path, progress=False)
    assert outcome.ok, f"{path.name} failed in {outcome.error}"
    executed = (tmp_path / path.stem / path.name).read_text()
    assert len(executed.encode()) <= 1_500_000, "an executed notebook stays under 1.5 MB (library logs go to files)"
    assert str(REPO_ROOT) not in executed, "the executed copy names no path of the machine that ran it"
    data = json.loads((tmp_path / path.stem / "metrics.json").read_text())
    assert data["provenance"]["smoke"] is True
    assert data["claims"], "every notebook tests at least one claim of the article"
    assert all(c["verdict"] in VERDICTS for c in data["claims"])
    CHECKS.get(path.stem, lambda m: None)(data["metrics"])


def test_there_are_notebooks():
    assert any(p.stem == "00_baselines" for p in NOTEBOOKS)


# ---------------------------------------------------------------------------------------------------------------
# The language-model notebooks on other families: GPT-2 (Conv1D), OPT, Qwen2 and Gemma-3 (qlib.lab.family_models,
# the zoo's gemma3-270m). Each CI run executes three (notebook, family) pairs, one per family slot, moving through
# the notebooks day by day (every pair within 18 days); QLIB_FAMILY_MATRIX=1 runs them all.
LM_NOTEBOOKS = ("00_baselines", "01_int8_ptq", "02_ptq_vs_qat", "03_sym_vs_asym", "04_gptq", "05_awq", "09_onnx",
                "10_libraries", "12_beyond")
FAMILY_SLOTS = (("tiny-gpt2",), ("tiny-opt",), ("smollm2-135m-qwen2", "gemma3-270m"))
CLASSIFIER_SLOTS = ("tiny-distilbert-sentiment", "tiny-roberta-sentiment")  # the same runs take another encoder too


def family_cases(day: int, every: bool = False) -> list[tuple[str, str, str]]:
    """(notebook stem, LM, CLASSIFIER) for the family smoke runs of ``day`` (an ordinal date); notebooks without a
    classifier ignore the third."""
    if every:
        return [(nb, lm, CLASSIFIER_SLOTS[i % 2]) for slot in FAMILY_SLOTS for i, lm in enumerate(slot)
                for nb in LM_NOTEBOOKS]
    turn = day // len(LM_NOTEBOOKS)
    clf = CLASSIFIER_SLOTS[day % len(CLASSIFIER_SLOTS)]  # one test classifier a day: one build to pay for
    return [(LM_NOTEBOOKS[(day + 3 * j) % len(LM_NOTEBOOKS)], slot[turn % len(slot)], clf)
            for j, slot in enumerate(FAMILY_SLOTS)]


def test_family_rotation_covers_every_pair():
    seen = {(nb, lm) for day in range(9 * 2 * 2) for nb, lm, _ in family_cases(day)}
    assert seen == {(nb, lm) for nb, lm, _ in family_cases(0, every=True)}
    assert all(len({nb for nb, _, _ in family_cases(d)}) == 3 for d in range(30))  # three different notebooks a day
    assert {c for d in range(30) for _, _, c in family_cases(d)} == set(CLASSIFIER_SLOTS)


def _family_params():
    import datetime
    import os

    every = os.environ.get("QLIB_FAMILY_MATRIX") == "1"
    return family_cases(datetime.date.today().toordinal(), every)


@pytest.mark.notebooks
@pytest.mark.parametrize("stem,lm,clf", _family_params(), ids=[f"{s}-{m}-{c}" for s, m, c in _family_params()])
def test_lm_notebook_smoke_run_on_another_family(stem, lm, clf, tmp_path):
    from qlib.lab.run import notebook_parameters

    path = next(p for p in NOTEBOOKS if p.stem == stem)
    params = {"LM": lm, **({"CLASSIFIER": clf} if "CLASSIFIER" in notebook_parameters(path) else {})}
    outcome = run_notebook(path, smoke=True, out_root=tmp_path, parameters=params, progress=False)
    assert outcome.ok, f"{path.name} with {params} failed in {outcome.error}"
    executed = (tmp_path / path.stem / path.name).read_text()
    assert len(executed.encode()) <= 1_500_000 and str(REPO_ROOT) not in executed
    data = json.loads((tmp_path / path.stem / "metrics.json").read_text())
    assert data["claims"] and all(c["verdict"] in VERDICTS for c in data["claims"])
    defaults = ["SmolLM2"] + (["MiniLM"] if "CLASSIFIER" in params else [])
    for c in data["claims"]:  # another model's numbers are never published under the default model's name
        text = " ".join(str(c[k]) for k in ("claim", "measured", "note"))
        assert not any(d in text for d in defaults), (params, c)
