"""The cost model: dated prices, the article's arithmetic re-done, a memory-bandwidth roofline, hidden costs.

Prices live in ``data/prices.json`` as named scenarios with sources; the only prices shipped are the
article's own. Every monthly figure takes ``hours_per_month`` explicitly: the article uses 720 h (30 days),
cloud bills use 730 h (8,760 h / 12), and that alone moves a 24/7 bill by 1.4%.

The roofline: decoding one token at batch 1 reads every weight byte once, so tokens/s can never exceed
memory bandwidth / model bytes. Measured decode speed over that bound says how much of the hardware a
kernel uses; the ratio of two variants' bounds is the most a smaller format can speed decoding up.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from qlib.lab.paths import REPO_ROOT

PRICES_PATH = REPO_ROOT / "data" / "prices.json"
HOURS_PER_MONTH = 730.0  # 8,760 h / 12, what cloud bills use
ARITHMETIC_VERDICTS = ("adds up", "close", "does not add up", "unexplained")
CLAIM_VERDICT = {"adds up": "reproduced", "close": "partly", "does not add up": "not reproduced",
                 "unexplained": "not testable offline"}

# Architectures of the article's models, from their published configs (hidden size, MLP width, layers, vocab).
LLAMA_7B = {"vocab": 32000, "hidden": 4096, "intermediate": 11008, "layers": 32, "tied": False}  # LLaMA paper, Table 2
ROBERTA_BASE = {"vocab": 50265, "hidden": 768, "intermediate": 3072, "layers": 12, "max_positions": 514,
                "type_vocab": 1, "pooler": False, "head_dense": True}  # roberta-base config + sequence-classification head
BERT_BASE = {"vocab": 30522, "hidden": 768, "intermediate": 3072, "layers": 12, "max_positions": 512,
             "type_vocab": 2, "pooler": True, "head_dense": False}  # bert-base-uncased config
SMOLLM2_135M = {"vocab": 49152, "hidden": 576, "intermediate": 1536, "layers": 30, "tied": True,
                "kv_hidden": 192}  # SmolLM2-135M config: 9 query heads, 3 KV heads of 64, tied embeddings


def load_prices(path: str | Path = PRICES_PATH) -> dict:
    """The price and hardware file (see ``data/prices.json``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; restore data/prices.json or pass the path of your own price file.")
    prices = json.loads(path.read_text())
    for key in ("as_of", "currency", "scenarios", "hardware"):
        if key not in prices:
            raise ValueError(f"{path} lacks {key!r}; a price file needs as_of, currency, scenarios and hardware.")
    return prices


def monthly_cost(hourly: float, count: int = 1, hours_per_month: float = HOURS_PER_MONTH) -> float:
    """Cost of ``count`` instances running 24/7 for a month."""
    if hourly < 0 or count < 0 or hours_per_month <= 0:
        raise ValueError(f"need hourly >= 0, count >= 0, hours_per_month > 0 (got {hourly}, {count}, {hours_per_month}).")
    return hourly * count * hours_per_month


def serving_cost(requests_per_month: float, throughput_per_s: float, hourly: float,
                 hours_per_month: float = HOURS_PER_MONTH, utilization: float = 1.0, whole_instances: bool = True) -> dict:
    """Instances and monthly cost to serve a request volume at a measured per-instance throughput.

    Traffic is assumed spread evenly over the month; ``utilization`` < 1 leaves headroom for peaks.
    """
    if throughput_per_s <= 0 or not 0 < utilization <= 1:
        raise ValueError(f"need throughput_per_s > 0 and 0 < utilization <= 1 (got {throughput_per_s}, {utilization}).")
    needed = requests_per_month / (hours_per_month * 3600) / (throughput_per_s * utilization)
    instances = max(1, math.ceil(needed - 1e-9)) if whole_instances else needed
    return {"instances_needed": needed, "instances": instances,
            "monthly": monthly_cost(hourly, 1, hours_per_month) * instances}


# --- model bytes -------------------------------------------------------------------------------------------

def decoder_params(vocab: int, hidden: int, intermediate: int, layers: int, tied: bool = False,
                   kv_hidden: int | None = None) -> dict[str, int]:
    """Parameter counts of a Llama-style decoder (gated MLP, RMSNorm, no biases) by kind.

    ``kv_hidden`` is the width of the key and value projections (KV heads x head dim; default ``hidden``, no GQA).
    """
    kv = hidden if kv_hidden is None else kv_hidden
    return {"embedding": vocab * hidden, "lm_head": 0 if tied else vocab * hidden,
            "linear": layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate),
            "norm": (2 * layers + 1) * hidden}


def decode_read_params(params: dict[str, int]) -> dict[str, int]:
    """The parameters one decode step reads: every linear, the norms and the whole output head.

    The embedding lookup reads one row per token (counted as none); a tied head is the embedding matrix,
    read whole. Kinds: ``linear``, ``lm_head``, ``norm``, ready for :func:`weight_only_bytes`.
    """
    return {"linear": params["linear"], "lm_head": params["lm_head"] or params["embedding"], "norm": params["norm"]}


def encoder_params(vocab: int, hidden: int, intermediate: int, layers: int, max_positions: int, type_vocab: int,
                   pooler: bool = True, head_dense: bool = False) -> dict[str, int]:
    """Parameter counts of a BERT-style encoder by kind (linear weights apart from their biases)."""
    extra = int(pooler) + int(head_dense)  # pooler / classification head: one hidden x hidden dense each
    return {"embedding": (vocab + max_positions + type_vocab) * hidden,
            "linear": layers * (4 * hidden * hidden + 2 * hidden * intermediate) + extra * hidden * hidden,
            "bias": layers * (4 * hidden + intermediate + hidden) + extra * hidden,
            "norm": (2 * layers + 1) * 2 * hidden}


def weight_only_bytes(params: dict[str, int], bits: float, group_size: int | None = None, float_bytes: float = 2.0,
                      scale_bytes: float = 2.0, zero_bits: float = 0.0, quantize: Sequence[str] = ("linear",)) -> float:
    """Bytes of a model whose ``quantize`` kinds are stored at ``bits`` (plus a scale and zero per group), the rest as floats.

    ``group_size=None`` counts no scales (the ideal ``params x bits / 8``); GPTQ's format stores an fp16
    scale and a packed 4-bit zero per group of 128 (``scale_bytes=2, zero_bits=4``).
    """
    total = 0.0
    for kind, n in params.items():
        if kind in quantize:
            total += n * bits / 8
            if group_size:
                total += n / group_size * (scale_bytes + zero_bits / 8)
        else:
            total += n * float_bytes
    return total


# --- the roofline ------------------------------------------------------------------------------------------

def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, context: int, bytes_per_elem: float = 2.0) -> float:
    """Bytes of one sequence's KV cache at ``context`` tokens (keys and values, every layer)."""
    return 2 * layers * kv_heads * head_dim * context * bytes_per_elem


def decode_roofline_tokens_per_s(model_bytes: float, bandwidth_GBps: float, batch: int = 1,
                                 kv_cache_bytes_per_seq: float = 0.0) -> float:
    """Upper bound on decode tokens/s: each step reads every weight byte once plus each sequence's KV cache.

    One step yields ``batch`` tokens and moves ``model_bytes + batch * kv_cache_bytes_per_seq`` bytes; compute,
    activations and kernel overheads are ignored, so real decoding is slower.
    """
    if model_bytes <= 0 or bandwidth_GBps <= 0 or batch < 1 or kv_cache_bytes_per_seq < 0:
        raise ValueError(f"need model_bytes > 0, bandwidth_GBps > 0, batch >= 1, kv bytes >= 0 "
                         f"(got {model_bytes}, {bandwidth_GBps}, {batch}, {kv_cache_bytes_per_seq}).")
    step_s = (model_bytes + batch * kv_cache_bytes_per_seq) / (bandwidth_GBps * 1e9)
    return batch / step_s


def hardware_table(prices: dict | None = None, cpu_GBps: float | None = None) -> dict[str, dict]:
    """The hardware entries of the price file, with ``this-cpu``'s bandwidth filled in when measured."""
    hw = {k: dict(v) for k, v in (prices or load_prices())["hardware"].items()}
    if cpu_GBps is not None and "this-cpu" in hw:
        hw["this-cpu"]["mem_bandwidth_GBps"] = float(cpu_GBps)
    return hw


def roofline_table(model_bytes_by_variant: dict[str, float], hardware: dict[str, dict], batch: int = 1,
                   kv_cache_bytes_per_seq: float = 0.0) -> list[dict]:
    """Decode-speed bound of every variant on every device (devices without a bandwidth are skipped).

    ``fits`` says whether the weights fit the device memory (None where memory is not given);
    ``speedup_bound`` is against the first variant, the most a smaller format can speed decoding up.
    """
    if not model_bytes_by_variant:
        raise ValueError("model_bytes_by_variant is empty; pass {variant: bytes}, the fp32/fp16 one first.")
    ref_bytes = next(iter(model_bytes_by_variant.values()))
    rows = []
    for device, spec in hardware.items():
        bw = spec.get("mem_bandwidth_GBps")
        if not bw:
            continue
        for variant, nbytes in model_bytes_by_variant.items():
            mem = spec.get("mem_GB")
            rows.append({
                "hardware": device, "variant": variant, "bandwidth_GBps": bw, "model_GB": nbytes / 1e9,
                "fits": None if mem is None else nbytes / 1e9 <= mem,
                "tokens_per_s_bound": decode_roofline_tokens_per_s(nbytes, bw, batch, kv_cache_bytes_per_seq),
                "speedup_bound": (ref_bytes + batch * kv_cache_bytes_per_seq) / (nbytes + batch * kv_cache_bytes_per_seq),
            })
    return rows


def measure_cpu_bandwidth(size_mb: int = 512, reps: int = 5, best: bool = False) -> float:
    """Read bandwidth of this CPU in GB/s: the median over ``reps`` sums of a ``size_mb`` MB fp32 tensor.

    Uses torch's current thread count (set it as the decode benchmark does); one untimed warm-up first.
    ``best`` takes the fastest sum instead: the least-disturbed estimate of the peak on a shared machine.
    """
    import torch

    if size_mb < 1 or reps < 1:
        raise ValueError(f"need size_mb >= 1 and reps >= 1 (got {size_mb}, {reps}).")
    x = torch.ones(size_mb * 1_000_000 // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / (min(times) if best else statistics.median(times)) / 1e9


# --- the article's arithmetic ------------------------------------------------------------------------------

def _verdict(stated: float, value: float, abs_tol: float, close_rel: float = 0.10) -> str:
    """'adds up' within the stated figure's rounding, 'close' within ``close_rel``, else 'does not add up'."""
    if abs(value - stated) <= abs_tol:
        return "adds up"
    return "close" if abs(value - stated) <= close_rel * abs(stated) else "does not add up"


def _row(item: str, article: str, stated: float, value: float, recomputed: str, verdict: str, note: str = "") -> dict:
    """One checked figure."""
    return {"item": item, "article": article, "stated": stated, "value": value, "recomputed": recomputed,
            "verdict": verdict, "note": note}


def _cost_checks(scn: dict) -> list[dict]:
    """The 'Cost Savings Analysis' figures re-done from the article's own prices."""
    inst, dep, st = scn["instances"], scn["deployments"], scn["stated"]
    h = scn["hours_per_month"]
    a100 = inst[dep["llama-7b-fp16"]["instance"]]["hourly"]
    n_before, n_after = dep["llama-7b-fp16"]["count"], dep["llama-7b-int4-awq"]["count"]
    t4, cpu = inst[dep["bert-large-fp16-t4"]["instance"]]["hourly"], inst[dep["bert-large-int8-cpu"]["instance"]]["hourly"]
    fleet_h = a100 * n_before
    fleet_m, fleet_730 = monthly_cost(a100, n_before, h), monthly_cost(a100, n_before)
    one_m = monthly_cost(a100, n_after, h)
    saving_exact = fleet_m - one_m
    reduction = 100 * (1 - one_m / fleet_m)
    three_weeks = fleet_h * 24 * 21
    bert_red = 100 * (1 - cpu / t4)
    bert_saving = monthly_cost(t4 - cpu, 1, h)
    low, high = st["calibration_cost_per_model"]
    gptq_min = st["gptq_minutes_a100_7b"]
    gptq_cost = a100 * gptq_min / 60
    rows = [
        _row("hours per month", f"${a100:.2f}/h per A100 → ${st['single_a100_monthly']:,}/month", h,
             st["single_a100_monthly"] / a100, f"{st['single_a100_monthly']:,} / {a100:.2f} = {st['single_a100_monthly'] / a100:.0f} h",
             "adds up" if abs(st["single_a100_monthly"] / a100 - h) < 1 else "does not add up",
             "the article bills 30 days × 24 h = 720 h; cloud providers bill 730 h (8,760 / 12), 1.4% more"),
        _row("four-A100 hourly", f"{n_before} × ${a100:.2f}/h = ${st['fleet_hourly']:.2f}/h", st["fleet_hourly"], fleet_h,
             f"{n_before} × {a100:.2f} = {fleet_h:.2f}", _verdict(st["fleet_hourly"], fleet_h, 0.005)),
        _row("four-A100 monthly", f"roughly ${st['fleet_monthly']:,}/month for 24/7", st["fleet_monthly"], fleet_m,
             f"{fleet_h:.2f} × {h} = {fleet_m:,.0f} (× 730 = {fleet_730:,.0f})", _verdict(st["fleet_monthly"], fleet_m, 50),
             f"'roughly' holds at {h} h/month; at 730 h it is ${fleet_730:,.0f}"),
        _row("one-A100 monthly", f"${a100:.2f}/h → ${st['single_a100_monthly']:,}/month", st["single_a100_monthly"], one_m,
             f"{a100:.2f} × {h} = {one_m:,.0f}", _verdict(st["single_a100_monthly"], one_m, 0.5)),
        _row("LLaMA cost reduction", f"{st['llama_cost_reduction_pct']}% cost reduction", st["llama_cost_reduction_pct"],
             reduction, f"1 − {one_m:,.0f} / {fleet_m:,.0f} = {reduction:.1f}%",
             _verdict(st["llama_cost_reduction_pct"], reduction, 0.5)),
        _row("LLaMA monthly saving", f"saving ${st['llama_monthly_saving']:,} monthly", st["llama_monthly_saving"],
             saving_exact, f"{fleet_m:,.0f} − {one_m:,.0f} = {saving_exact:,.0f}",
             _verdict(st["llama_monthly_saving"], saving_exact, 0.5),
             f"${st['llama_monthly_saving']:,} is the rounded ${st['fleet_monthly']:,} minus ${one_m:,.0f}; the exact saving is ${saving_exact:,.0f}"),
        _row("three-week bill", f"AWS bill ${st['bill_three_weeks']:,} in three weeks on four A100s", st["bill_three_weeks"],
             three_weeks, f"{fleet_h:.2f} × 24 × 21 = {three_weeks:,.0f}", _verdict(st["bill_three_weeks"], three_weeks, 50),
             f"${st['bill_three_weeks']:,} is {st['bill_three_weeks'] / three_weeks:.0%} of four A100s running 24/7 for 21 days "
             f"(≈{st['bill_three_weeks'] / (a100 * 24 * 21):.1f} GPUs 24/7, or part-time use)"),
        _row("calibration cost per model", f"calibration 'about ${low}-{high} per model in GPU costs'; GPTQ on a 7B "
             f"model 'took about {gptq_min} minutes on an A100'", high, gptq_cost,
             f"{gptq_min} min × ${a100:.2f}/h = ${gptq_cost:.2f} of A100 time per GPTQ run",
             "unexplained",
             f"${low}-{high} buys {low / a100:.0f}-{high / a100:.0f} A100-hours, {low / gptq_cost:.0f}-{high / gptq_cost:.0f}× "
             "the article's own GPTQ run; repeated runs, sweeps or evaluation may explain it, the article does not say"),
        _row("BERT-large cost reduction", f"T4 ${t4}/h → CPU ${cpu}/h: {st['bert_cost_reduction_pct']}% cheaper",
             st["bert_cost_reduction_pct"], bert_red, f"1 − {cpu} / {t4} = {bert_red:.1f}%",
             _verdict(st["bert_cost_reduction_pct"], bert_red, 0.5)),
        _row("BERT-large monthly saving", f"saving ${st['bert_monthly_saving']:,} monthly", st["bert_monthly_saving"],
             bert_saving, f"({t4} − {cpu}) × {h} = {bert_saving:,.2f} per instance", _verdict(st["bert_monthly_saving"], bert_saving, 0.5),
             f"one instance saves ${bert_saving:,.0f}/month; ${st['bert_monthly_saving']:,} needs "
             f"{st['bert_monthly_saving'] / bert_saving:.1f} instances (never stated) or is off by 10×"),
    ]
    return rows


def _size_checks() -> list[dict]:
    """The memory figures re-done from the models' architectures."""
    llama = decoder_params(**LLAMA_7B)
    n_llama = sum(llama.values())
    fp16 = weight_only_bytes(llama, 16) / 1e9
    int4 = weight_only_bytes(llama, 4, group_size=128, zero_bits=4) / 1e9
    rob, bert = encoder_params(**ROBERTA_BASE), encoder_params(**BERT_BASE)
    rob_fp32, rob_fp16 = sum(rob.values()) * 4 / 1e6, sum(rob.values()) * 2 / 1e6
    rob_int8 = weight_only_bytes(rob, 8, float_bytes=4) / 1e6  # dynamic INT8: nn.Linear weights only
    bert_fp32, bert_int8 = sum(bert.values()) * 4 / 1e6, weight_only_bytes(bert, 8, float_bytes=4) / 1e6
    return [
        _row("7B at FP16 / INT8 / INT4", "7B × 2 bytes = 14 GB; INT8 7 GB; INT4 3.5 GB", 14.0, 7e9 * 2 / 1e9,
             f"7e9 × 2 / 1e9 = 14; × 1 = 7; × 0.5 = 3.5 GB", "adds up",
             "ideal sizes: INT4 formats also store scales (+3–4% at group 128) and often keep embeddings in 16 bits"),
        _row("LLaMA-7B FP16 size", "13.5GB", 13.5, fp16, f"{n_llama / 1e9:.2f}B params × 2 B = {fp16:.2f} GB",
             _verdict(13.5, fp16, 0.05)),
        _row("LLaMA-7B GPTQ INT4 size", "13.5GB to 3.8GB", 3.8, int4,
             f"linears at 4 bits + fp16 scale and 4-bit zero per 128 + fp16 embeddings and lm_head = {int4:.2f} GB",
             _verdict(3.8, int4, 0.05),
             f"ideal 4-bit of everything: {n_llama * 0.5 / 1e9:.2f} GB; 3.8 GB is plausible for a packed checkpoint"),
        _row("'compress models by 75%'", "75% compression (intro)", 75.0, 100 * (1 - 3.8 / 13.5),
             f"the article's own 13.5 → 3.8 GB is {100 * (1 - 3.8 / 13.5):.1f}% smaller", _verdict(75.0, 100 * (1 - 3.8 / 13.5), 0.5),
             "75% is FP16 → INT4 with no scales or unquantized layers"),
        _row("RoBERTa-base FP16 = 498MB", "'original FP16 model' ... 498MB", 498.0, rob_fp16,
             f"{sum(rob.values()) / 1e6:.1f}M params × 2 B = {rob_fp16:.0f} MB (× 4 B = {rob_fp32:.0f} MB)",
             _verdict(498.0, rob_fp16, 1.0), f"498 MB is the FP32 size ({rob_fp32:.1f} MB), not FP16"),
        _row("RoBERTa-base dynamic INT8 = 255MB", "498MB to 255MB", 255.0, rob_int8,
             f"INT8 nn.Linear weights + FP32 embeddings, biases, norms = {rob_int8:.0f} MB", _verdict(255.0, rob_int8, 1.0),
             f"dynamic INT8 leaves the {rob['embedding'] / 1e6:.1f}M embedding parameters in FP32, so only "
             f"{100 * (1 - rob_int8 / rob_fp32):.0f}% is saved, not the 75% of FP32 → INT8 everywhere"),
        _row("BERT-base ONNX dynamic INT8", "438MB to 181MB", 181.0, bert_int8,
             f"FP32 {bert_fp32:.0f} MB; INT8 linears + FP32 embeddings = {bert_int8:.1f} MB", _verdict(181.0, bert_int8, 1.0)),
    ]


def _speed_checks(prices: dict) -> list[dict]:
    """Speed ratios the article states, against arithmetic and the bandwidth bound."""
    llama = decoder_params(**LLAMA_7B)
    fp16, int4 = weight_only_bytes(llama, 16), weight_only_bytes(llama, 4, group_size=128, zero_bits=4)
    bw = prices["hardware"]["RTX-4090"]["mem_bandwidth_GBps"]
    bound = decode_roofline_tokens_per_s(int4, bw) / decode_roofline_tokens_per_s(fp16, bw)
    a100_mem = prices["hardware"]["A100-40GB"]["mem_GB"]
    return [
        _row("BERT-large T4 INT8 speedup", "47ms to 19ms, a 2.5x speedup", 2.5, 47 / 19, f"47 / 19 = {47 / 19:.2f}×",
             _verdict(2.5, 47 / 19, 0.05)),
        _row("LLaMA-7B INT4 3.2× on RTX 4090", "3.2x on an RTX 4090; memory bandwidth the bottleneck", 3.2, bound,
             f"bandwidth bound: {fp16 / 1e9:.2f} GB / {int4 / 1e9:.2f} GB = {bound:.2f}× "
             f"({decode_roofline_tokens_per_s(fp16, bw):.0f} → {decode_roofline_tokens_per_s(int4, bw):.0f} tok/s at {bw} GB/s)",
             "adds up" if 3.2 <= bound else "does not add up", "3.2× is below the most a 3.5× smaller model can gain at batch 1"),
        _row("four A100s for a 7B model", "a 7B model 'ran on four A100 GPUs'", 4.0, math.ceil(fp16 / 1e9 / a100_mem),
             f"{fp16 / 1e9:.1f} GB of FP16 weights fit {math.ceil(fp16 / 1e9 / a100_mem)} A100-40GB", "unexplained",
             "weights alone need one A100; four may serve throughput or long-context KV cache, which the article does not say"),
    ]


def recompute_article(prices: dict | None = None) -> list[dict]:
    """The article's cost, size and speed arithmetic re-done; each row has a short verdict in ARITHMETIC_VERDICTS.

    Rows: ``{"item", "article", "stated", "value", "recomputed", "verdict", "note"}``.
    """
    prices = prices or load_prices()
    scn = prices["scenarios"].get("article")
    if scn is None:
        raise ValueError("the price file has no 'article' scenario; recompute_article needs the article's own prices.")
    return _cost_checks(scn) + _size_checks() + _speed_checks(prices)


def article_checks_as_claims(rows: Sequence[dict]) -> list[dict]:
    """The checked figures as claims for ``metrics.json`` (adds up → reproduced, close → partly, ...)."""
    return [{"claim": r["item"], "article": r["article"], "measured": r["recomputed"],
             "verdict": CLAIM_VERDICT[r["verdict"]], "note": r["note"] or f"arithmetic {r['verdict']}"} for r in rows]


# --- hidden costs, break-even, sensitivity -----------------------------------------------------------------

def break_even_months(one_time_cost: float, monthly_saving: float) -> float:
    """Months until a one-time cost is paid back by a monthly saving (inf when nothing is saved)."""
    if one_time_cost < 0:
        raise ValueError(f"one_time_cost must be >= 0 (got {one_time_cost}).")
    if one_time_cost == 0:
        return 0.0
    return one_time_cost / monthly_saving if monthly_saving > 0 else math.inf


def total_cost_of_ownership(monthly_infra: float, months: float, *, baseline_monthly: float = 0.0,
                            ab_months: float = 0.0, calibration_cost: float = 0.0, validation_hours: float = 0.0,
                            hourly_rate: float = 0.0, maintenance_monthly: float = 0.0) -> dict:
    """Cost of running a quantized model for ``months``, hidden costs included.

    During the A/B period (``ab_months``, counted inside ``months``) the full-precision deployment
    (``baseline_monthly``) keeps running beside the quantized one. Validation is engineering hours × rate.
    """
    if months <= 0 or not 0 <= ab_months <= months:
        raise ValueError(f"need months > 0 and 0 <= ab_months <= months (got months={months}, ab_months={ab_months}).")
    parts = {"infra": monthly_infra * months, "ab_overlap": baseline_monthly * ab_months,
             "calibration": calibration_cost, "validation": validation_hours * hourly_rate,
             "maintenance": maintenance_monthly * months}
    total = sum(parts.values())
    return {**parts, "total": total, "monthly_equivalent": total / months}


def business_case(baseline_monthly: float, quantized_monthly: float, months: float = 12.0, **hidden: float) -> dict:
    """Keep full precision or quantize: both totals over ``months``, the saving, and the break-even month.

    ``hidden`` goes to :func:`total_cost_of_ownership` (ab_months, calibration_cost, validation_hours, ...).
    """
    keep = baseline_monthly * months
    tco = total_cost_of_ownership(quantized_monthly, months, baseline_monthly=baseline_monthly, **hidden)
    one_time = tco["total"] - quantized_monthly * months - tco["maintenance"]
    saving_monthly = baseline_monthly - quantized_monthly - hidden.get("maintenance_monthly", 0.0)
    return {"keep_total": keep, "quantize_total": tco["total"], "saving": keep - tco["total"], "tco": tco,
            "one_time": one_time, "break_even_months": break_even_months(one_time, saving_monthly),
            "worth_it": tco["total"] < keep}


def sensitivity(fn: Callable[..., Any], base_kwargs: dict, vary: dict[str, list], output: str | None = None) -> list[dict]:
    """``fn`` re-run with one argument changed at a time: rows ``{param, value, result, base, delta}``.

    ``output`` picks a key when ``fn`` returns a dict. Rows come in ``vary``'s order, values as given.
    """
    def call(kw: dict) -> float:
        out = fn(**kw)
        return float(out[output] if output is not None else out)

    unknown = [k for k in vary if k not in base_kwargs]
    if unknown:
        raise ValueError(f"sensitivity: {unknown} are not in base_kwargs; give every varied argument a base value.")
    base = call(base_kwargs)
    rows = []
    for param, values in vary.items():
        for v in values:
            result = call({**base_kwargs, param: v})
            rows.append({"param": param, "value": v, "result": result, "base": base, "delta": result - base})
    return rows


def plot_sensitivity(rows: Sequence[dict], ax=None, xlabel: str = "change from base"):
    """Tornado plot: per parameter, a bar from its lowest to its highest result relative to the base."""
    import matplotlib.pyplot as plt

    params: dict[str, list[dict]] = {}
    for r in rows:
        params.setdefault(r["param"], []).append(r)
    order = sorted(params, key=lambda p: max(abs(r["delta"]) for r in params[p]))  # widest bar on top
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 0.5 * len(order) + 1.5))
    for i, p in enumerate(order):
        lo = min(params[p], key=lambda r: r["delta"])
        hi = max(params[p], key=lambda r: r["delta"])
        ax.barh(i, hi["delta"] - lo["delta"], left=lo["delta"], color="C0", alpha=0.7)
        for r, side, dx in ((lo, "right", -3), (hi, "left", 3)):
            label = f"{r['value']:.4g}" if isinstance(r["value"], (int, float)) else str(r["value"])
            ax.annotate(label, (r["delta"], i), ha=side, va="center", fontsize=7, xytext=(dx, 0), textcoords="offset points")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(order)), order)
    ax.set_xlabel(xlabel)
    return ax
