import json

import numpy as np
import pytest

from qlib.pareto import Point, choose_config, pareto_front, pareto_mask, plot_frontier, plot_frontiers, points_from_results


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
