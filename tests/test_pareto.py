import json

import numpy as np
import pytest

from qlib.analysis.pareto import (
    Point, choose_config, disambiguate, gather_points, group_by_metric, int8_ptq_points, pareto_front, pareto_mask, plot_frontier,
    plot_frontiers, points_from_results, relative_loss_pct,
)


def P(method, quality, speedup, model="m", bits=8, name="accuracy", nbytes=None):
    return Point(model, method, bits, quality, name, speedup, nbytes)


def test_dominated_point_is_excluded():
    pts = [P("fp32", 0.90, 1.0), P("int8", 0.89, 2.0), P("bad", 0.85, 1.5), P("int4", 0.86, 3.0)]
    front = pareto_front(pts)
    assert [p.method for p in front] == ["fp32", "int8", "int4"]   # "bad" loses to int8 in both objectives


def test_ties_are_all_kept_in_input_order():
    pts = [P("b", 0.9, 2.0), P("a", 0.9, 2.0), P("c", 0.8, 1.0)]
    assert [p.method for p in pareto_front(pts)] == ["b", "a"]       # equal points do not dominate each other
    # equal in one objective, better in the other: dominated
    assert [p.method for p in pareto_front([P("x", 0.9, 2.0), P("y", 0.9, 1.5)])] == ["x"]


def test_single_point_and_empty():
    assert pareto_front([P("only", 0.5, 1.0)])[0].method == "only"
    assert pareto_front([]) == []


def test_points_on_a_tradeoff_line_are_all_on_the_front():
    pts = [(q, 3.0 - 2 * q) for q in np.linspace(0, 1, 7)]           # quality up, speed down: none dominates
    assert pareto_front(pts) == pts
    pts_dominated = [(q, 1.0 + q) for q in np.linspace(0, 1, 5)]       # both up together: only the last survives
    assert pareto_front(pts_dominated) == [pts_dominated[-1]]


def test_plain_arrays_with_column_indices_and_minimize():
    arr = np.array([[0.9, 100.0, 1.0], [0.8, 50.0, 9.0], [0.7, 60.0, 0.0]])
    # maximize column 0, minimize column 1 (bytes): row 2 is worse than row 1 in both
    front = pareto_front(arr, maximize=(0,), minimize=(1,))
    assert [tuple(r) for r in front] == [tuple(arr[0]), tuple(arr[1])]
    assert pareto_mask(arr[:, :2] * [1, -1]).tolist() == [True, True, False]


def test_minimize_bytes_on_points():
    pts = [P("fp32", 0.9, 1, nbytes=400), P("int8", 0.89, 2, nbytes=100), P("int8-big", 0.88, 2, nbytes=200)]
    assert [p.method for p in pareto_front(pts, maximize=("quality",), minimize=("bytes",))] == ["fp32", "int8"]


def test_nan_objective_is_refused():
    with pytest.raises(ValueError, match="NaN"):
        pareto_front([(1.0, float("nan")), (0.5, 1.0)])


def test_point_validates_and_negates_lower_is_better():
    with pytest.raises(ValueError, match="speedup"):
        P("x", 0.9, 0.0)
    p = Point.from_metric("lm", "rtn", 4, 91.4, "perplexity", 2.0)
    assert p.quality == -91.4 and p.quality_name == "-perplexity" and p.raw_quality == 91.4
    assert Point.from_metric("clf", "int8", 8, 0.86, "accuracy", 2.1).quality == 0.86


def _write(tmp_path, stem, points, smoke=False):
    d = tmp_path / stem
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps({"notebook": stem, "metrics": {"points": points}, "claims": [],
                                                "provenance": {"smoke": smoke}}))


def test_points_from_results_skips_smoke_unless_asked(tmp_path):
    row = {"model": "m", "method": "int8", "bits": 8, "quality": 0.9, "quality_name": "accuracy", "speedup": 2.0}
    _write(tmp_path, "01_a", [row])
    _write(tmp_path, "02_b", [{**row, "method": "int4", "bits": 4}], smoke=True)
    pts = points_from_results(tmp_path)
    assert [(p.method, p.source) for p in pts] == [("int8", "01_a")]
    assert [p.method for p in points_from_results(tmp_path, include_smoke=True)] == ["int8", "int4"]
    with pytest.raises(ValueError, match="lacks"):
        _write(tmp_path, "03_c", [{"model": "m"}])
        points_from_results(tmp_path)


def _costs(**kw):
    base = dict(baseline_quality=None, max_quality_drop=0.02, error_cost_per_unit_drop=0.0,
                requests_per_month=1e6, cost_per_hour_fp32=10.0, hours_per_month=730.0)
    return {**base, **kw}


def test_choose_config_picks_cheapest_within_budget():
    pts = [P("fp32", 0.900, 1.0, bits=32), P("int8", 0.895, 2.0), P("int4", 0.870, 4.0, bits=4)]
    out = choose_config(pts, **_costs())
    assert out["chosen"]["method"] == "int8"                        # int4 is cheaper but drops 3 points > 2 allowed
    assert out["chosen"]["infra_monthly"] == pytest.approx(10.0 * 730 / 2)
    assert out["chosen"]["saving_monthly"] == pytest.approx(10.0 * 730 / 2)
    reasons = {r["method"]: r["reason"] for r in out["rejected"]}
    assert "exceeds" in reasons["int4"] and "more than int8" in reasons["fp32"]
    out_loose = choose_config(pts, **_costs(max_quality_drop=0.05))
    assert out_loose["chosen"]["method"] == "int4"


def test_choose_config_error_cost_can_make_full_precision_win():
    pts = [P("fp32", 0.90, 1.0, bits=32), P("int8", 0.88, 2.0)]
    # 2 points of accuracy on 1e6 requests = 20,000 extra errors at $1 each, against 3,650 of infra saved
    out = choose_config(pts, **_costs(max_quality_drop=0.05, error_cost_per_unit_drop=1.0))
    assert out["chosen"]["method"] == "fp32"
    int8 = next(r for r in out["candidates"] if r["method"] == "int8")
    assert int8["error_monthly"] == pytest.approx(20_000)
    assert int8["total_monthly"] == pytest.approx(3_650 + 20_000)


def test_choose_config_whole_instances_and_one_time_cost():
    pts = [P("fp32", 0.9, 1.0, bits=32), P("int4", 0.9, 3.2, bits=4)]
    out = choose_config(pts, **_costs(fp32_instances=4, one_time_cost=1200, horizon_months=12))
    int4 = out["chosen"]
    assert int4["instances"] == 2                                    # ceil(4 / 3.2): the article's 4 → 1 needs 4×
    assert int4["infra_monthly"] == pytest.approx(2 * 10.0 / 4 * 730)
    assert int4["one_time_monthly"] == pytest.approx(100.0)
    assert out["baseline"]["one_time_monthly"] == 0.0


def test_choose_config_synthesizes_baseline_and_refuses_mixed_models():
    out = choose_config([P("int8", 0.89, 2.0)], **_costs(baseline_quality=0.90))
    assert [r["method"] for r in out["candidates"]] == ["fp32", "int8"]
    assert out["chosen"]["method"] == "int8" and out["chosen"]["quality_drop"] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="one model"):
        choose_config([P("a", 0.9, 1, model="x"), P("b", 0.9, 1, model="y")], **_costs(baseline_quality=0.9))
    with pytest.raises(ValueError, match="baseline_quality"):
        choose_config([P("int8", 0.89, 2.0)], **_costs())


def test_plot_frontier_draws_one_scatter_and_one_step_per_model():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [P("fp32", 0.9, 1.0), P("int8", 0.89, 2.0), P("bad", 0.8, 1.5),
           Point.from_metric("lm", "fp32", 32, 60.8, "perplexity", 1.0), Point.from_metric("lm", "w4", 4, 81.6, "perplexity", 3.0)]
    ax = plot_frontier(pts[:3])
    assert len(ax.collections) == 1 and len(ax.lines) == 1
    xs, ys = ax.lines[0].get_data()
    assert 1.5 not in list(xs)                                        # the dominated point is off the step line
    fig = plot_frontiers(pts)
    visible = [a for a in fig.axes if a.get_visible()]
    assert len(visible) == 2 and visible[1].yaxis_inverted()          # perplexity shown raw, axis flipped
    assert len(ax.texts) == 3                                         # one label per method
    plt.close("all")


def test_choose_config_refuses_mixed_metrics_and_prices_errors_at_break_even():
    with pytest.raises(ValueError, match="one quality metric"):
        choose_config([P("fp32", 0.9, 1.0, bits=32), P("int8", 0.9, 2.0, name="f1")], **_costs())
    pts = [P("fp32", 0.90, 1.0, bits=32), P("int8", 0.88, 2.0), P("same", 0.90, 2.0)]
    out = choose_config(pts, **_costs(max_quality_drop=0.05))
    rows = {r["method"]: r for r in out["candidates"]}
    # int8 saves 3,650/month of infra and drops 0.02 on 1e6 requests: errors cost the same at 3,650 / 20,000 each
    assert rows["int8"]["break_even_error_cost"] == pytest.approx(3_650 / (1e6 * 0.02))
    assert rows["same"]["break_even_error_cost"] == float("inf") and rows["fp32"]["break_even_error_cost"] == 0.0
    at_break_even = choose_config(pts[:2], **_costs(max_quality_drop=0.05, error_cost_per_unit_drop=3_650 / 20_000))
    int8 = next(r for r in at_break_even["candidates"] if r["method"] == "int8")
    assert int8["total_monthly"] == pytest.approx(at_break_even["baseline"]["total_monthly"])


def test_relative_loss_is_signed_percent_for_both_metric_directions():
    base, q = P("fp32", 0.90, 1.0), P("int8", 0.891, 2.0)
    assert relative_loss_pct(q, base) == pytest.approx(1.0)
    lm_base = Point.from_metric("lm", "fp32", 32, 60.0, "perplexity", 1.0)
    assert relative_loss_pct(Point.from_metric("lm", "w4", 4, 61.2, "perplexity", 3.0), lm_base) == pytest.approx(2.0)
    assert relative_loss_pct(Point.from_metric("lm", "w8", 8, 59.4, "perplexity", 2.0), lm_base) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="one metric"):
        relative_loss_pct(q, lm_base)


def test_group_by_metric_and_disambiguate():
    a = [P("fp32", 0.9, 1.0, model="clf"), P("int8", 0.89, 2.0, model="clf")]
    lm = [Point.from_metric("lm", "fp32", 32, 60, "perplexity nyt", 1.0, source="01"),
          Point.from_metric("lm", "fp32", 32, 60, "perplexity nyt", 1.0, source="04"),
          Point.from_metric("lm", "fp32", 32, 30, "perplexity shakespeare", 1.0, source="04")]
    groups = group_by_metric(a + lm)
    assert list(groups) == ["clf", "lm · perplexity nyt", "lm · perplexity shakespeare"]
    assert [p.method for p in disambiguate(groups["lm · perplexity nyt"])] == ["fp32 [01]", "fp32 [04]"]
    assert [p.method for p in disambiguate(a)] == ["fp32", "int8"]               # unique names stay as they are


def test_int8_ptq_points_keep_real_kernels_only():
    nan = float("nan")
    clf = [{"variant": "fp32", "accuracy": 0.85, "real_kernel": True, "bytes": 90.0, "speedup b1": 1.0},
           {"variant": "torch dynamic int8", "accuracy": 0.84, "real_kernel": True, "bytes": 58.0, "speedup b1": 2.1},
           {"variant": "qlib W8A8 dynamic (sim)", "accuracy": 0.85, "real_kernel": False, "bytes": nan, "speedup b1": nan}]
    dec = [{"variant": "fp32", "ppl": 65.0, "bytes": 538, "speedup": 1.0},
           {"variant": "qlib int4 g128 (RTN)", "ppl": 95.0, "bytes": 191, "speedup": 2.8}]
    pts = int8_ptq_points(clf, dec, "clf", "lm")
    assert [(p.model, p.method, p.bits) for p in pts] == [("clf", "fp32", 32), ("clf", "torch dynamic int8", 8),
                                                          ("lm", "fp32", 32), ("lm", "qlib int4 g128 (RTN)", 4.25)]
    assert pts[-1].quality == -95.0 and pts[-1].quality_name == "-perplexity nyt" and pts[-1].bytes == 191
    # the JSON form of a recorded table ("nan" strings) reads the same
    assert int8_ptq_points([{**clf[2], "bytes": "nan", "speedup b1": "nan"}], [], "clf", "lm") == []


def test_gather_points_derives_old_01_runs_and_lists_every_run(tmp_path):
    clf = [{"variant": "fp32", "accuracy": 0.85, "real_kernel": True, "bytes": 90.0, "speedup b1": 1.0}]
    d = tmp_path / "01_int8_ptq"
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps({"notebook": "01_int8_ptq", "metrics": {"classifier": clf, "decode": []},
                                                "claims": [], "provenance": {"smoke": False}}))
    row = {"model": "m", "method": "int8", "bits": 8, "quality": 0.9, "quality_name": "accuracy", "speedup": 2.0}
    _write(tmp_path, "04_gptq", [row])
    _write(tmp_path, "05_awq", [row], smoke=True)
    pts, inv = gather_points(tmp_path)
    assert [(p.model, p.method, p.source) for p in pts] == [("minilm-sentiment", "fp32", "01_int8_ptq"), ("m", "int8", "04_gptq")]
    assert [(r["notebook"], r["points"]) for r in inv] == [("01_int8_ptq", 1), ("04_gptq", 1), ("05_awq", 0)]
    assert "derived" in inv[0]["how"] and "recorded" in inv[1]["how"] and "smoke" in inv[2]["how"]
    assert gather_points(tmp_path, derive=False)[0] == pts[1:]
    assert points_from_results(tmp_path) == pts[1:]                             # the plain reader never derives
