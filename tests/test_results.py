import json
import math
import os
import stat

import pytest

from qlib.lab.results import Claim, Run, read_metrics, validate_claims, write_json, write_metrics


def test_claim_rejects_unknown_verdict():
    with pytest.raises(ValueError, match="verdict"):
        Claim("c", "a", "m", "maybe")


def test_claim_rejects_empty_measured():
    with pytest.raises(ValueError, match="measured"):
        Claim("c", "a", "  ", "reproduced")


def test_validate_claims_accepts_dicts_and_dataclasses():
    out = validate_claims([Claim("c", "a", "m", "partly"),
                           {"claim": "c2", "article": "a2", "measured": "m2", "verdict": "not reproduced"}])
    assert [c["verdict"] for c in out] == ["partly", "not reproduced"]
    assert set(out[0]) == {"claim", "article", "measured", "verdict", "note"}


def test_write_json_is_strict_and_converts_numpy_and_nonfinite(tmp_path):
    import numpy as np
    import torch
    path = write_json(tmp_path / "x.json", {"a": np.float32(1.5), "b": torch.tensor(3), "c": math.inf,
                                            "d": np.arange(3), "e": float("nan")})
    text = path.read_text()
    assert "Infinity" not in text and "NaN" not in text
    data = json.loads(text)
    assert data == {"a": 1.5, "b": 3, "c": "inf", "d": [0, 1, 2], "e": "nan"}
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_write_metrics_has_provenance(tmp_path):
    path = write_metrics(tmp_path / "99_demo", {"acc": 0.9}, [Claim("c", "a", "m", "reproduced")],
                         seed=3, smoke=True, wall_s=1.234)
    data = read_metrics(path.parent)
    prov = data["provenance"]
    assert data["notebook"] == "99_demo" and data["metrics"] == {"acc": 0.9}
    assert prov["seed"] == 3 and prov["smoke"] is True and prov["wall_s"] == 1.23
    assert prov["packages"]["torch"].startswith("2.13")
    assert prov["threads"] >= 1 and prov["cpu"]
    assert "git_sha" in prov and "timestamp_utc" in prov


def test_run_saves_partial_then_final(tmp_path):
    run = Run(tmp_path / "01_x", seed=0, smoke=True)
    run.log("step1", {"v": 1})
    partial = json.loads((tmp_path / "01_x" / "metrics.partial.json").read_text())
    assert partial["metrics"] == {"step1": {"v": 1}}  # an interrupted run keeps this
    run.finish([])
    assert not (tmp_path / "01_x" / "metrics.partial.json").exists()
    assert read_metrics(tmp_path / "01_x")["metrics"] == {"step1": {"v": 1}}


def test_read_metrics_missing_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m qlib run"):
        read_metrics(tmp_path / "42_nothing")


def test_save_figure(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    run = Run(tmp_path / "02_fig")
    path = run.figure(fig, "line")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_git_state_names_the_changed_tracked_files(tmp_path):
    import subprocess

    from qlib.lab.results import git_state
    def git(*a):
        subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)
    git("init", "-q"); git("config", "user.email", "t@t"); git("config", "user.name", "t")
    (tmp_path / "a.py").write_text("x = 1\n"); (tmp_path / "b.py").write_text("y = 2\n")
    git("add", "."); git("commit", "-qm", "init")
    assert git_state(tmp_path)["git_dirty"] is False and git_state(tmp_path)["git_dirty_paths"] == []
    (tmp_path / "b.py").write_text("y = 3\n"); (tmp_path / "new.py").write_text("")   # untracked files do not count
    state = git_state(tmp_path)
    assert state["git_dirty"] is True and state["git_dirty_paths"] == ["b.py"]


def test_run_records_the_commit_it_started_from(tmp_path, monkeypatch):
    import qlib.lab.results as results
    states = iter([{"git_sha": "start", "git_dirty": False, "git_dirty_paths": []},
                   {"git_sha": "moved", "git_dirty": True, "git_dirty_paths": ["x.py"]}])
    monkeypatch.setattr(results, "git_state", lambda *a, **k: next(states))
    run = results.Run(tmp_path / "nb", seed=0, smoke=True)     # HEAD moves while the run goes on ...
    prov = read_metrics(run.finish([Claim("c", "a", "m", "partly")]))["provenance"]
    assert prov["git_sha"] == "start" and prov["git_dirty"] is False   # ... the record keeps where it started


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)], ids=["umask-022", "umask-077"])
def test_written_files_get_the_umask_mode_not_a_temporary_files(tmp_path, umask, mode):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qlib.lab.results import atomic_write_text
    old = os.umask(umask)
    try:
        fig, _ = plt.subplots()
        paths = [write_json(tmp_path / "m.json", {"a": 1}), atomic_write_text(tmp_path / "r.md", "x"),
                 Run(tmp_path / "nb").figure(fig, "f")]
        plt.close(fig)
    finally:
        os.umask(old)
    assert [stat.S_IMODE(p.stat().st_mode) for p in paths] == [mode] * 3
    assert not list(tmp_path.rglob(".*"))  # no temporary file left behind


def test_metrics_name_the_notebook_that_ran_not_the_folder(tmp_path, monkeypatch):
    from qlib.lab.results import NOTEBOOK_ENV, notebook_name
    monkeypatch.delenv(NOTEBOOK_ENV, raising=False)
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    assert notebook_name(tmp_path / "04_gptq") == "04_gptq"                      # by hand, OUT as in the notebook
    monkeypatch.setenv("JPY_SESSION_NAME", "/home/me/lab/notebooks/05_awq.ipynb")  # Jupyter knows the notebook
    assert notebook_name(tmp_path / "scratch") == "05_awq"
    monkeypatch.setenv(NOTEBOOK_ENV, "07_cnn")                                    # the runner says which it runs
    run = Run(tmp_path / "somewhere" / "else", seed=0, smoke=True)
    assert read_metrics(run.finish([Claim("c", "a", "m", "partly")]))["notebook"] == "07_cnn"


def test_figure_is_shown_inline_in_a_notebook_and_its_path_is_not_printed(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    InteractiveShell.instance()  # a kernel-like shell: display() goes to its display publisher
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    with capture_output() as shown:
        path = Run(tmp_path / "nb").figure(fig, "f")
    assert len(shown.outputs) == 1 and shown.outputs[0].data["image/png"][:4] == "iVBO"  # base64 of a PNG header
    assert not plt.get_fignums()  # closed: not drawn a second time
    assert path.is_file() and hasattr(path, "_ipython_display_") and path._ipython_display_() is None


def test_numbers_in_tables_read_as_people_write_them():
    from qlib.lab.results import human_number

    assert human_number(90867920.0) == "90,867,920" and human_number(6.667842e7) == "66,678,420"
    assert human_number(1234.5678) == "1,234.6" and human_number(65.123) == "65.12" and human_number(0.7375) == "0.7375"
    assert human_number(0.000312) == "3.12e-04" and human_number(0) == "0" and human_number(float("nan")) == "nan"
    assert human_number(-2.5) == "-2.5" and human_number(True) == "True"


def test_a_run_in_a_notebook_styles_its_tables(tmp_path):
    import pandas as pd
    from IPython.core.interactiveshell import InteractiveShell

    InteractiveShell.instance()
    with pd.option_context("display.max_colwidth", 50, "display.float_format", None):
        Run(tmp_path / "nb")
        assert pd.get_option("display.max_colwidth") is None  # claims and notes are never cut at 50 characters
        assert "90,867,920" in pd.DataFrame({"bytes": [90867920.0]}).to_string()
