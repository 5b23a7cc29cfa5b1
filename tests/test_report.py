import json

import pytest

from qlib.analysis.report import build_report, main, write_report


def _run(root, stem, claims, smoke=False, points=()):
    d = root / stem
    d.mkdir(parents=True)
    prov = {"git_sha": "abcdef1234567890", "git_dirty": False, "timestamp_utc": "2026-11-28T12:00:00+00:00",
            "cpu": {"model_name": "Test CPU"}, "threads": 2, "seed": 0, "smoke": smoke, "wall_s": 42.0}
    (d / "metrics.json").write_text(json.dumps({"notebook": stem, "metrics": {"points": list(points)},
                                                "claims": claims, "provenance": prov}))


def _claim(name, verdict):
    return {"claim": name, "article": f"article says {name}", "measured": f"we got {name}", "verdict": verdict, "note": ""}


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    pt = {"model": "m", "bits": 8, "quality_name": "accuracy", "source": ""}
    _run(root, "01_int8", [_claim("int8 keeps accuracy", "reproduced"), _claim("2.1x on CPU", "partly")],
         points=[{**pt, "method": "fp32", "bits": 32, "quality": 0.9, "speedup": 1.0},
                 {**pt, "method": "int8", "quality": 0.89, "speedup": 2.1}])
    _run(root, "04_gptq", [_claim("gptq | beats rtn", "not reproduced")])
    _run(root, "05_awq", [_claim("smoke-only claim", "reproduced")], smoke=True)
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    for stem in ("01_int8", "04_gptq", "05_awq", "06_pareto"):
        (nbs / f"{stem}.ipynb").write_text("{}")
    return root, nbs


def test_report_has_every_full_claim_and_counts(results):
    root, nbs = results
    path = write_report(root, notebook_dir=nbs)
    text = path.read_text()
    assert path == root / "REPORT.md"
    for name in ("int8 keeps accuracy", "2.1x on CPU", "gptq \\| beats rtn"):   # the pipe is escaped in the table
        assert name in text
    assert "smoke-only claim" not in text
    assert "| reproduced | 1 |" in text and "| partly | 1 |" in text and "| not reproduced | 1 |" in text
    assert "| **total** | 3 |" in text
    assert "smoke runs skipped: 05_awq" in text
    assert "| 06_pareto | not run yet |" in text
    assert "| 05_awq | not run yet (smoke run only, skipped) |" in text
    assert "[01_int8](01_int8/metrics.json)" in text
    assert "abcdef1234" in text and "Test CPU" in text and "42 s" in text


def test_report_draws_pareto_figure_and_is_deterministic(results):
    root, nbs = results
    text = build_report(root, nbs)
    assert (root / "pareto.png").stat().st_size > 1000
    assert "![Pareto frontiers](pareto.png)" in text
    assert "| m | int8 | 8 | accuracy | 0.89 | 2.10× |" in text
    assert build_report(root, nbs) == text


def test_report_can_include_smoke(results):
    root, nbs = results
    text = build_report(root, nbs, include_smoke=True, figure=False)
    assert "smoke-only claim" in text and "(smoke)" in text and "| **total** | 4 |" in text


def test_missing_results_dir_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="run the notebooks first"):
        build_report(tmp_path / "nope", tmp_path)
    assert main(["--results", str(tmp_path / "nope")]) == 2
    assert "run the notebooks first" in capsys.readouterr().err


def test_empty_results_lists_notebooks_not_run(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "nb").mkdir()
    (tmp_path / "nb" / "00_baselines.ipynb").write_text("{}")
    text = build_report(tmp_path / "results", tmp_path / "nb")
    assert "No claims recorded yet." in text and "| 00_baselines | not run yet |" in text
    assert "| **total** | 0 |" in text


def test_report_derives_points_of_runs_written_before_they_recorded_any(tmp_path):
    root = tmp_path / "results"
    _run(root, "01_int8_ptq", [_claim("x", "reproduced")])
    metrics = root / "01_int8_ptq" / "metrics.json"
    record = json.loads(metrics.read_text())
    record["metrics"] = {"decode": [{"variant": "fp32", "ppl": 65.0, "bytes": 538_000_000, "speedup": 1.0},
                                    {"variant": "qlib int8 weight-only", "ppl": 65.3, "bytes": 248_000_000, "speedup": 2.2}]}
    metrics.write_text(json.dumps(record))
    text = build_report(root, tmp_path, figure=False)
    assert "| smollm2-135m | qlib int8 weight-only | 8 | perplexity nyt | 65.3 | 2.20× | 248.0 MB | 01_int8_ptq | yes |" in text
