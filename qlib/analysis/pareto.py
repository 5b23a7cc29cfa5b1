"""Thresholds and the Pareto frontier: which quantized variants are worth having, and which one to deploy.

Every notebook that measures a quantized variant also records it as a point under ``metrics["points"]``::

    {"model": "smollm2-135m", "method": "gptq-w4g128", "bits": 4, "quality": -81.6, "quality_name": "-perplexity",
     "speedup": 3.1, "bytes": 98_000_000, "source": "04_gptq"}

``quality`` is always *higher is better*: accuracy or F1 as they are, a lower-is-better metric negated
(``quality_name`` then starts with ``-``; :meth:`Point.from_metric` does this). ``speedup`` is against the
fp32 model of the same run (ratios from one run, never absolute times across runs). Quality only compares
within one model: frontiers and decisions are made per model.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from qlib.lab.paths import REPO_ROOT

RESULTS_DIR = REPO_ROOT / "results"
LOWER_IS_BETTER = ("perplexity", "ppl", "loss", "nll", "kl", "wer", "cer", "error", "mse")
MINIMIZED_FIELDS = ("bytes", "bits")  # when plotted on x, less is better


@dataclasses.dataclass(frozen=True)
class Point:
    """One measured variant of one model: its weight bits, quality (higher is better), speedup and size."""

    model: str
    method: str
    bits: float
    quality: float
    quality_name: str
    speedup: float
    bytes: int | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if not (isinstance(self.quality, (int, float)) and math.isfinite(self.quality)):
            raise ValueError(f"Point {self.model}/{self.method}: quality {self.quality!r} is not a finite number; record the measured value.")
        if not (isinstance(self.speedup, (int, float)) and math.isfinite(self.speedup) and self.speedup > 0):
            raise ValueError(f"Point {self.model}/{self.method}: speedup {self.speedup!r} must be a positive number (fp32 time / this time).")
        if not (isinstance(self.bits, (int, float)) and 0 < self.bits <= 64):
            raise ValueError(f"Point {self.model}/{self.method}: bits {self.bits!r} must be in (0, 64]; use the weight bits (e.g. 32, 8, 4.25).")

    @classmethod
    def from_metric(cls, model: str, method: str, bits: float, value: float, metric: str, speedup: float,
                    bytes: int | None = None, source: str = "", higher_is_better: bool | None = None) -> "Point":
        """Build a point from a raw metric; lower-is-better metrics (perplexity, loss, ...) are negated."""
        if higher_is_better is None:
            higher_is_better = not any(metric.lower().startswith(m) for m in LOWER_IS_BETTER)
        quality, name = (float(value), metric) if higher_is_better else (-float(value), f"-{metric}")
        return cls(model, method, float(bits), quality, name, float(speedup), bytes, source)

    @property
    def raw_quality(self) -> float:
        """The metric as measured (a negated lower-is-better metric is turned back)."""
        return -self.quality if self.quality_name.startswith("-") else self.quality


POINT_FIELDS = tuple(f.name for f in dataclasses.fields(Point))


def point_from_dict(d: dict, source: str = "") -> Point:
    """A :class:`Point` from a ``metrics["points"]`` entry (``source`` fills in when the entry has none)."""
    missing = [f for f in ("model", "method", "bits", "quality", "quality_name", "speedup") if f not in d]
    if missing:
        raise ValueError(f"point {d!r} from {source or '?'} lacks {missing}; record every Point field (see qlib.analysis.pareto).")
    kw = {k: d[k] for k in POINT_FIELDS if k in d}
    kw["source"] = kw.get("source") or source
    return Point(**kw)


def points_from_results(results_dir: str | Path = RESULTS_DIR, include_smoke: bool = False) -> list[Point]:
    """Every point under ``metrics["points"]`` of ``results/*/metrics.json``, by notebook then file order.

    Smoke runs (``provenance.smoke``) are skipped unless ``include_smoke``.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"{results_dir} does not exist; run the notebooks first (python -m qlib run).")
    points = []
    for path in sorted(results_dir.glob("*/metrics.json")):
        record = json.loads(path.read_text())
        if record.get("provenance", {}).get("smoke") and not include_smoke:
            continue
        stem = record.get("notebook") or path.parent.name
        points += [point_from_dict(d, stem) for d in record.get("metrics", {}).get("points", [])]
    return points


def int8_ptq_points(classifier_rows: Sequence[dict], decode_rows: Sequence[dict], classifier: str, lm: str,
                    source: str = "01_int8_ptq", lm_metric: str = "perplexity nyt") -> list[Point]:
    """Points from notebook 01's classifier and decode tables: real-kernel variants only, speed and bytes measured.

    Classifier rows give accuracy, batch-1 speedup and bytes (simulated variants have no speed and are left
    out); decode rows give held-out perplexity of the packed model, batch-1 decode speedup and bytes.
    """
    bits = {"fp32": 32, "bf16": 16, "torch dynamic int8": 8, "qlib int8 weight-only": 8, "qlib int4 g128 (RTN)": 4.25}
    def number(x: Any) -> float | None:
        v = float(x) if isinstance(x, (int, float, str)) else math.nan
        return v if math.isfinite(v) else None
    points = []
    for r in classifier_rows:
        speed = number(r.get("speedup b1"))
        if r.get("real_kernel") and speed and r["variant"] in bits:
            points.append(Point.from_metric(classifier, r["variant"], bits[r["variant"]], r["accuracy"], "accuracy",
                                            speed, int(r["bytes"]), source))
    for r in decode_rows:
        speed = number(r.get("speedup"))
        if speed and r["variant"] in bits and number(r.get("ppl")):
            points.append(Point.from_metric(lm, r["variant"], bits[r["variant"]], r["ppl"], lm_metric, speed,
                                            int(r["bytes"]), source))
    return points


def _derive_01(metrics: dict, source: str) -> list[Point]:
    """Notebook 01 before it recorded points: its default models (minilm-sentiment, smollm2-135m)."""
    return int8_ptq_points(metrics.get("classifier", []), metrics.get("decode", []), "minilm-sentiment",
                           "smollm2-135m", source)


# Runs written before a notebook recorded ``metrics["points"]``: how to read points from its measured tables.
DERIVERS = {"01_int8_ptq": _derive_01}


def gather_points(results_dir: str | Path = RESULTS_DIR, include_smoke: bool = False,
                  derive: bool = True) -> tuple[list[Point], list[dict]]:
    """Every point in ``results/*/metrics.json`` and an inventory row per run saying where its points came from.

    A run without ``metrics["points"]`` whose notebook has an entry in :data:`DERIVERS` gets points derived
    from its own measured tables (``derive=False`` skips that); others contribute none.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"{results_dir} does not exist; run the notebooks first (python -m qlib run).")
    points, inventory = [], []
    for path in sorted(results_dir.glob("*/metrics.json")):
        record = json.loads(path.read_text())
        stem = record.get("notebook") or path.parent.name
        if record.get("provenance", {}).get("smoke") and not include_smoke:
            inventory.append({"notebook": stem, "points": 0, "how": "smoke run, skipped"})
            continue
        metrics = record.get("metrics", {})
        if metrics.get("points"):
            found, how = [point_from_dict(d, stem) for d in metrics["points"]], "recorded in metrics['points']"
        elif derive and stem in DERIVERS:
            found, how = DERIVERS[stem](metrics, stem), "derived from its measured tables (qlib.analysis.pareto.DERIVERS)"
        else:
            found, how = [], "no points recorded"
        points += found
        inventory.append({"notebook": stem, "points": len(found), "how": how,
                          "models": ", ".join(sorted({p.model for p in found}))})
    return points, inventory


def group_by_metric(points: Iterable[Point]) -> dict[str, list[Point]]:
    """Points by (model, quality metric): only these compare. Keys are the model, or ``model · metric``
    when one model was measured on several metrics."""
    pairs: dict[tuple[str, str], list[Point]] = {}
    for p in points:
        pairs.setdefault((p.model, p.quality_name), []).append(p)
    per_model = {m for m, _ in pairs}
    count = {m: sum(1 for k in pairs if k[0] == m) for m in per_model}
    return {(m if count[m] == 1 else f"{m} · {q.lstrip('-')}"): g for (m, q), g in pairs.items()}


def disambiguate(points: Sequence[Point]) -> list[Point]:
    """Points whose method names repeat (the same variant measured by two notebooks) renamed ``method [source]``."""
    seen: dict[str, int] = {}
    for p in points:
        seen[p.method] = seen.get(p.method, 0) + 1
    return [dataclasses.replace(p, method=f"{p.method} [{p.source}]") if seen[p.method] > 1 else p for p in points]


def relative_loss_pct(p: Point, base: Point) -> float:
    """Quality lost against ``base`` in percent of the baseline's metric (negative: ``p`` is better).

    Accuracy 0.90 → 0.891 is 1.0%; perplexity 60 → 61.2 is 2.0% (the same formula on negated quality).
    """
    if base.quality_name != p.quality_name:
        raise ValueError(f"cannot compare {p.quality_name!r} with {base.quality_name!r}; compare points of one metric.")
    if base.quality == 0:
        raise ValueError(f"baseline {base.method} has quality 0; a relative loss needs a non-zero baseline.")
    return 100.0 * (base.quality - p.quality) / abs(base.quality)


def break_even_error_cost(infra_saving_monthly: float, quality_drop: float, requests_per_month: float) -> float:
    """Cost per request per unit of quality drop at which the errors eat the infrastructure saving.

    ``inf`` when the variant loses no quality and saves money; 0 when it saves nothing.
    """
    if infra_saving_monthly <= 0:
        return 0.0
    if quality_drop <= 0 or requests_per_month <= 0:
        return math.inf
    return infra_saving_monthly / (requests_per_month * quality_drop)


def _objective_matrix(points: Sequence[Any], maximize: Sequence, minimize: Sequence) -> np.ndarray:
    """An (n, k) array where larger is better in every column."""
    if len(points) == 0:
        return np.zeros((0, 0))
    first = points[0]
    if isinstance(first, (Point, dict)):
        get = (lambda p, k: p[k]) if isinstance(first, dict) else getattr
        cols = [[float(get(p, k)) for p in points] for k in maximize]
        cols += [[-float(get(p, k)) for p in points] for k in minimize]
        values = np.array(cols, dtype=float).T
    else:
        values = np.asarray(points, dtype=float)
        if values.ndim != 2:
            raise ValueError(f"plain points must form an (n, k) array (got shape {values.shape}); pass tuples of equal length.")
        idx_max = [k for k in maximize if isinstance(k, (int, np.integer))]
        idx_min = [k for k in minimize if isinstance(k, (int, np.integer))]
        if idx_max or idx_min:  # column indices given: use just those
            values = np.concatenate([values[:, idx_max], -values[:, idx_min]], axis=1)
        # else: every coordinate is maximized
    if not np.isfinite(values).all():
        raise ValueError("pareto_front got a NaN or infinite objective; drop or fix that point first.")
    return values


def pareto_mask(values: np.ndarray) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``values`` (n, k), larger better in every column.

    A row is dominated when another is >= in every column and > in at least one; equal rows do not
    dominate each other, so ties are all kept.
    """
    values = np.asarray(values, dtype=float)
    n = len(values)
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        ge = (values >= values[i]).all(axis=1)
        gt = (values > values[i]).any(axis=1)
        keep[i] = not (ge & gt).any()
    return keep


def pareto_front(points: Sequence[Any], maximize: Sequence = ("quality", "speedup"), minimize: Sequence = ()) -> list:
    """The non-dominated points, in their input order (ties are all kept).

    Works on :class:`Point` objects or dicts (objectives named by field), and on plain tuples / array rows,
    where every coordinate is maximized unless ``maximize`` / ``minimize`` give column indices.
    """
    points = list(points)
    if not points:
        return []
    mask = pareto_mask(_objective_matrix(points, maximize, minimize))
    return [p for p, k in zip(points, mask) if k]


def _group(points: Iterable[Point], by: str) -> dict[str, list[Point]]:
    """Points grouped by a field, groups in order of first appearance."""
    groups: dict[str, list[Point]] = {}
    for p in points:
        groups.setdefault(str(getattr(p, by)), []).append(p)
    return groups


def _axis_values(points: Sequence[Point], field: str) -> tuple[list[float], str, bool]:
    """Values to plot for ``field``, the axis label, and whether to invert the axis (negated metrics shown raw)."""
    if field == "quality":
        names = sorted({p.quality_name for p in points})
        if all(n.startswith("-") for n in names):
            return [p.raw_quality for p in points], " / ".join(n[1:] for n in names) + " (lower is better)", True
        return [p.quality for p in points], " / ".join(names) + " (higher is better)", False
    labels = {"speedup": "speedup vs fp32 (×)", "bytes": "bytes", "bits": "weight bits"}
    return [float(getattr(p, field)) for p in points], labels.get(field, field), False


def plot_frontier(points: Sequence[Point], x: str = "speedup", y: str = "quality", by: str = "model", ax=None,
                  annotate: bool = True):
    """Scatter per ``by`` group, its Pareto frontier as a step line, each point labelled with its method."""
    import matplotlib.pyplot as plt

    points = list(points)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    if not points:
        ax.text(0.5, 0.5, "no points", ha="center", va="center", transform=ax.transAxes)
        return ax
    minimize = [f for f in (x, y) if f in MINIMIZED_FIELDS]
    maximize = [f for f in (y, x) if f not in MINIMIZED_FIELDS]
    invert = False
    for i, (name, group) in enumerate(_group(points, by).items()):
        xs, xlabel, _ = _axis_values(group, x)
        ys, ylabel, invert = _axis_values(group, y)
        color = f"C{i % 10}"
        ax.scatter(xs, ys, color=color, label=name, zorder=3)
        if annotate:
            for p, xv, yv in zip(group, xs, ys):
                ax.annotate(p.method, (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=7)
        front = pareto_front(group, maximize=maximize, minimize=minimize)
        fx, _, _ = _axis_values(front, x)
        fy, _, _ = _axis_values(front, y)
        order = np.argsort(fx, kind="stable")
        fx, fy = np.asarray(fx)[order], np.asarray(fy)[order]
        # best y reachable at this x: from larger x when x is maximized ("pre"), from smaller when minimized
        ax.step(fx, fy, where="post" if x in MINIMIZED_FIELDS else "pre", color=color, alpha=0.6, zorder=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if invert:
        ax.invert_yaxis()
    if x == "bytes":
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def plot_frontiers(points: Sequence[Point], x: str = "speedup", y: str = "quality", ncols: int = 3,
                   groups: dict[str, list[Point]] | None = None):
    """One panel per model (quality scales differ between models), or per ``groups`` entry; returns the figure."""
    import matplotlib.pyplot as plt

    groups = _group(points, "model") if groups is None else groups
    n = max(len(groups), 1)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.8 * nrows), squeeze=False)
    for ax, (model, group) in zip(axes.flat, groups.items()):
        plot_frontier(group, x=x, y=y, by="model", ax=ax)
        ax.set_title(model)
    if not groups:
        axes.flat[0].text(0.5, 0.5, "no points", ha="center", va="center", transform=axes.flat[0].transAxes)
    for ax in list(axes.flat)[len(groups):] if groups else []:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def _config_row(p: Point, *, baseline_quality: float, error_cost_per_unit_drop: float, requests_per_month: float,
                fleet_hourly: float, hours_per_month: float, fp32_instances: int | None, one_time_monthly: float) -> dict:
    """Monthly infrastructure, error and amortized one-time cost of serving the traffic with one variant."""
    if fp32_instances:
        instances = max(1, math.ceil(fp32_instances / p.speedup - 1e-9))
        infra = instances * fleet_hourly / fp32_instances * hours_per_month
    else:
        instances = None
        infra = fleet_hourly * hours_per_month / p.speedup
    drop = baseline_quality - p.quality
    error = requests_per_month * max(drop, 0.0) * error_cost_per_unit_drop
    return {"model": p.model, "method": p.method, "bits": p.bits, "quality": p.quality, "quality_drop": drop,
            "speedup": p.speedup, "instances": instances, "infra_monthly": infra, "error_monthly": error,
            "one_time_monthly": one_time_monthly, "total_monthly": infra + error + one_time_monthly}


def choose_config(
    points: Sequence[Point],
    baseline_quality: float | None,
    max_quality_drop: float,
    error_cost_per_unit_drop: float,
    requests_per_month: float,
    cost_per_hour_fp32: float,
    hours_per_month: float = 730.0,
    fp32_instances: int | None = None,
    one_time_cost: float = 0.0,
    horizon_months: float = 12.0,
    baseline_method: str = "fp32",
) -> dict:
    """The article's four steps: baseline quality, cost of errors, infrastructure saving, cheapest within budget.

    Assumptions, all explicit:

    * Traffic is fixed; the fp32 fleet that serves it costs ``cost_per_hour_fp32`` (all instances together).
      A variant with speedup ``s`` serves the same traffic with ``1/s`` of that fleet, so its monthly
      infrastructure cost is ``cost_per_hour_fp32 * hours_per_month / s``. With ``fp32_instances`` given,
      instances are whole: ``ceil(fp32_instances / s)`` (at least one). Speedup must come from the
      deployment hardware and batch size; memory limits that force a bigger instance are not modelled.
    * Quality is higher-is-better and in the same units as ``baseline_quality`` and ``max_quality_drop``
      (e.g. accuracy as a fraction: a drop of 0.02 is two points). Every unit of drop costs
      ``error_cost_per_unit_drop`` per request, so the monthly error cost is
      ``requests_per_month * drop * error_cost_per_unit_drop`` (with accuracy as a fraction, that is the
      extra wrong answers times what each one costs). A quality gain earns nothing.
    * ``one_time_cost`` (calibration, validation, A/B) is charged to every quantized variant, spread over
      ``horizon_months``; the baseline pays none.
    * The baseline is the point whose method is ``baseline_method``; if there is none, one is made at speedup 1
      from ``baseline_quality``. ``baseline_quality=None`` takes the baseline point's quality.

    Variants whose drop exceeds ``max_quality_drop`` are rejected; of the rest, the lowest total monthly cost
    wins (ties: higher quality, then input order). Returns ``{"chosen", "candidates", "rejected",
    "baseline", "assumptions"}``; rows carry the cost breakdown, ``saving_monthly`` against the baseline and
    ``break_even_error_cost``: the ``error_cost_per_unit_drop`` at which the variant stops paying for itself.
    """
    points = list(points)
    models = sorted({p.model for p in points})
    if len(models) > 1:
        raise ValueError(f"choose_config compares variants of one model, got {models}; filter the points by model first.")
    metrics = sorted({p.quality_name for p in points})
    if len(metrics) > 1:
        raise ValueError(f"choose_config compares one quality metric, got {metrics}; group the points with group_by_metric first.")
    if max_quality_drop < 0 or cost_per_hour_fp32 < 0 or requests_per_month < 0 or error_cost_per_unit_drop < 0:
        raise ValueError("max_quality_drop, cost_per_hour_fp32, requests_per_month and error_cost_per_unit_drop must be >= 0.")
    base = next((p for p in points if p.method == baseline_method), None)
    if base is None:
        if baseline_quality is None:
            raise ValueError(f"no point has method {baseline_method!r}; pass baseline_quality or include the baseline point.")
        name = points[0].quality_name if points else "quality"
        base = Point(models[0] if models else "model", baseline_method, 32, baseline_quality, name, 1.0, source="baseline")
        points = [base] + points
    if baseline_quality is None:
        baseline_quality = base.quality
    common = dict(baseline_quality=baseline_quality, error_cost_per_unit_drop=error_cost_per_unit_drop,
                  requests_per_month=requests_per_month, fleet_hourly=cost_per_hour_fp32,
                  hours_per_month=hours_per_month, fp32_instances=fp32_instances)
    amortized = one_time_cost / horizon_months if horizon_months > 0 else one_time_cost
    rows = [_config_row(p, one_time_monthly=0.0 if p is base else amortized, **common) for p in points]
    base_total = rows[points.index(base)]["total_monthly"]
    base_infra = rows[points.index(base)]["infra_monthly"]
    for r in rows:
        r["saving_monthly"] = base_total - r["total_monthly"]
        r["break_even_error_cost"] = break_even_error_cost(base_infra - r["infra_monthly"] - r["one_time_monthly"],
                                                           r["quality_drop"], requests_per_month)
    tol = 1e-12 * max(1.0, abs(max_quality_drop))
    within = [r for r in rows if r["quality_drop"] <= max_quality_drop + tol]
    chosen = min(within, key=lambda r: (round(r["total_monthly"], 9), -r["quality"])) if within else None
    rejected = []
    for r in rows:
        if r is chosen:
            continue
        if r["quality_drop"] > max_quality_drop + tol:
            reason = f"quality drop {r['quality_drop']:.4g} exceeds the allowed {max_quality_drop:.4g}"
        else:
            extra = r["total_monthly"] - chosen["total_monthly"]
            reason = (f"within budget but costs {extra:,.2f}/month more than {chosen['method']}" if extra > 1e-9
                      else f"within budget, same cost as {chosen['method']} with no better quality")
        rejected.append({**r, "reason": reason})
    return {
        "chosen": chosen,
        "candidates": rows,
        "rejected": rejected,
        "baseline": rows[points.index(base)],
        "assumptions": {"baseline_quality": baseline_quality, "max_quality_drop": max_quality_drop,
                        "error_cost_per_unit_drop": error_cost_per_unit_drop, "requests_per_month": requests_per_month,
                        "cost_per_hour_fp32": cost_per_hour_fp32, "hours_per_month": hours_per_month,
                        "fp32_instances": fp32_instances, "one_time_cost": one_time_cost,
                        "horizon_months": horizon_months, "cost model": "infra ∝ 1/speedup at fixed traffic"},
    }
