"""The papermill runner: parameters reach the notebook and are checked, failures name the cell, a signal stops
a run cleanly, and completed full runs are skipped on the next run."""
import json
import os
import signal
import subprocess
import sys
import time

import nbformat
import psutil
import pytest

import qlib.lab.run as run_module
from qlib.lab.paths import REPO_ROOT
from qlib.lab.run import (check_parameters, code_digest, discover, main, notebook_parameters, parse_param,
                          run_notebook)

PARAMS = "SMOKE = False\nOUT = 'x'\nN = 1"


def _notebook(path, cells, params=PARAMS):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell] + [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, path)
    return path


def test_parameters_are_injected_and_failure_names_the_cell(tmp_path):
    good = _notebook(tmp_path / "01_good.ipynb", [
        "import json, pathlib\npathlib.Path(OUT, 'p.json').write_text(json.dumps({'smoke': SMOKE, 'n': N}))"])
    bad = _notebook(tmp_path / "02_bad.ipynb", ["x = 1", "raise ValueError('boom here')"])
    ok = run_notebook(good, smoke=True, out_root=tmp_path / "out", parameters={"N": 7}, progress=False)
    assert ok.ok
    assert json.loads((tmp_path / "out" / "01_good" / "p.json").read_text()) == {"smoke": True, "n": 7}
    failed = run_notebook(bad, smoke=True, out_root=tmp_path / "out", progress=False)
    assert not failed.ok
    assert failed.error.startswith("cell 3 ") and "raise ValueError" in failed.error and "ValueError" in failed.error and "boom here" in failed.error


def test_discover_selects_by_number_and_rejects_unknown(tmp_path):
    for name in ("00_a", "01_b", "10_c"):
        _notebook(tmp_path / f"{name}.ipynb", [])
    assert [p.stem for p in discover(["01", "00_a"], tmp_path)] == ["01_b", "00_a"]
    assert [p.stem for p in discover(None, tmp_path)] == ["00_a", "01_b", "10_c"]
    with pytest.raises(SystemExit, match="No notebook matches"):
        discover(["99"], tmp_path)


def test_parse_param():
    assert parse_param("WINDOW=256") == ("WINDOW", 256)
    assert parse_param("MODEL=facebook/opt-125m") == ("MODEL", "facebook/opt-125m")
    with pytest.raises(SystemExit):
        parse_param("oops")


def _gone(pid):
    """The process has exited (a zombie waiting for its new parent to reap it counts as exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


SLEEPY = """import os, pathlib, subprocess, time
from qlib.lab.results import Run
run = Run(OUT, seed=0, smoke=SMOKE)
run.log('before_the_long_cell', 1)
child = subprocess.Popen(['sleep', '300'])                             # in the kernel's process group
loner = subprocess.Popen(['sleep', '300'], start_new_session=True)     # in a session of its own
pathlib.Path(OUT, 'pids').write_text(f'{os.getpid()} {child.pid} {loner.pid}')
time.sleep(60)
run.finish([])"""


@pytest.mark.parametrize("signals, code", [((signal.SIGINT, signal.SIGINT), 130), ((signal.SIGTERM,), 143)],
                         ids=["ctrl-c-twice", "sigterm"])
def test_signal_mid_cell_stops_the_run_leaves_no_process_and_keeps_earlier_results(tmp_path, signals, code):
    nb = _notebook(tmp_path / "01_sleepy.ipynb", [SLEEPY])
    out = tmp_path / "out" / "01_sleepy"
    out.mkdir(parents=True)
    earlier = '{"notebook": "01_sleepy", "metrics": {"complete": true}}\n'
    (out / "metrics.json").write_text(earlier)
    (out / "01_sleepy.ipynb").write_text("the earlier executed copy")
    env = {**os.environ, "QLIB_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "qlib", "run", str(nb), "--out", str(tmp_path / "out")],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal's foreground job
    try:
        deadline = time.time() + 30
        while not (out / "pids").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert (out / "pids").exists(), proc.communicate(timeout=30)
        pids = [int(p) for p in (out / "pids").read_text().split()]
        time.sleep(0.5)                                       # inside time.sleep(60)
        sent = time.time()
        for sig in signals:                                   # to the whole group, as Ctrl-C does
            os.killpg(proc.pid, sig)
            time.sleep(0.3)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code, stderr
    assert time.time() - sent < 10
    assert "01_sleepy.ipynb, cell 2 ('import os, pathlib, subprocess, time')" in stderr
    assert ("still shutting the kernel down" in stderr) == (len(signals) == 2)   # the second Ctrl-C came mid-shutdown
    assert all(_gone(pid) for pid in pids), [psutil.Process(p).cmdline() for p in pids if not _gone(p)]
    assert (out / "metrics.json").read_text() == earlier                       # never replaced by a partial run
    assert (out / "01_sleepy.ipynb").read_text() == "the earlier executed copy"
    assert json.loads((out / "metrics.partial.json").read_text())["metrics"] == {"before_the_long_cell": 1}
    assert (out / "01_sleepy.partial.ipynb").exists()
    assert str(out) not in json.loads((tmp_path / "cache" / "runs" / "ledger.json").read_text()
                                      if (tmp_path / "cache" / "runs" / "ledger.json").exists() else "{}")


COUNTING = """import pathlib
pathlib.Path(OUT).mkdir(parents=True, exist_ok=True)
pathlib.Path(OUT, 'metrics.json').write_text('{}')
with open(pathlib.Path(OUT, 'runs.txt'), 'a') as f:
    f.write('x')"""


def test_code_digest_covers_qlib_sources_and_the_lock_file(tmp_path):
    (tmp_path / "qlib" / "sub").mkdir(parents=True)
    (tmp_path / "qlib" / "sub" / "a.py").write_text("x = 1\n")
    (tmp_path / "requirements.lock").write_text("torch==2.13.0\n")
    first = code_digest(tmp_path)
    (tmp_path / "qlib" / "notes.txt").write_text("not code")
    assert code_digest(tmp_path) == first
    (tmp_path / "qlib" / "sub" / "a.py").write_text("x = 2\n")
    second = code_digest(tmp_path)
    (tmp_path / "requirements.lock").write_text("torch==2.14.0\n")
    assert len({first, second, code_digest(tmp_path)}) == 3


def test_ledger_skips_completed_full_runs_and_reruns_what_changed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(run_module, "code_digest", lambda: "qlib as it is")  # the live tree may change meanwhile
    nb = _notebook(tmp_path / "01_count.ipynb", [COUNTING])
    out = tmp_path / "out"
    runs = lambda: len((out / "01_count" / "runs.txt").read_text())  # noqa: E731
    args = [str(nb), "--out", str(out)]
    assert main(args) == 0 and runs() == 1
    assert main(args) == 0 and runs() == 1                            # unchanged: skipped
    assert "01_count.ipynb: skipped, completed" in capsys.readouterr().out
    assert main(args + ["-p", "N=2"]) == 0 and runs() == 2             # other parameters: runs
    _notebook(nb, [COUNTING + "\nx = 1"])
    assert main(args) == 0 and runs() == 3                            # other source: runs
    assert main(args) == 0 and runs() == 3
    assert main(args + ["--force"]) == 0 and runs() == 4              # --force: runs
    assert main(args + ["--smoke"]) == 0 and runs() == 5              # smoke runs never skip
    (out / "01_count" / "metrics.json").write_text('{"edited": 1}')
    assert main(args) == 0 and runs() == 6                            # its metrics.json changed: runs


def test_parameters_are_checked_before_anything_runs(tmp_path):
    nb = _notebook(tmp_path / "01_p.ipynb", ["1"], params=(
        "SMOKE = False\nOUT = 'x'\nN = 1\nLR = 0.5\nNAME = 'a'\nLIMIT = None\nSIZES = (1, 2)\nCOST = 300 + 40 * 100"))
    assert list(notebook_parameters(nb)) == ["SMOKE", "OUT", "N", "LR", "NAME", "LIMIT", "SIZES", "COST"]
    for ok in ({"N": 3}, {"LR": 1}, {"LIMIT": "anything"}, {"SIZES": [4]}, {"NAME": "b"}, {"COST": 5}):
        check_parameters(nb, ok)
    with pytest.raises(SystemExit, match=r"^01_p has no parameter 'WINDOW'; its parameters are: SMOKE, OUT, N, LR, "):
        main([str(nb), "--out", str(tmp_path / "out"), "-p", "WINDOW=256"])
    with pytest.raises(SystemExit, match=r"parameter N takes a value of type int \(default 1\), not str \('x'\).*: SMOKE, OUT"):
        main([str(nb), "--out", str(tmp_path / "out"), "-p", "N=x"])
    for bad in ({"N": 1.5}, {"N": True}, {"SMOKE": 1}, {"NAME": 3}, {"SIZES": 3}):
        with pytest.raises(SystemExit):
            check_parameters(nb, bad)
    assert not (tmp_path / "out").exists()                              # refused before anything ran


def test_metrics_name_the_notebook_whatever_out_is(tmp_path):
    nb = _notebook(tmp_path / "03_named.ipynb", [
        "import pathlib\nfrom qlib.lab.results import notebook_name\npathlib.Path(OUT).mkdir(parents=True, exist_ok=True)\n"
        "pathlib.Path(OUT, 'name').write_text(notebook_name(OUT))"])
    elsewhere = tmp_path / "somewhere" / "else"
    outcome = run_notebook(nb, smoke=True, out_root=tmp_path / "out", parameters={"OUT": str(elsewhere)},
                           progress=False)
    assert outcome.ok and outcome.out_dir == elsewhere
    assert (elsewhere / "name").read_text() == "03_named"
    assert (elsewhere / "03_named.ipynb").exists()   # completed: the executed copy sits beside its metrics
    assert not (tmp_path / "out" / "03_named").exists()


def test_out_is_injected_relative_to_the_notebook_and_can_be_moved(tmp_path):
    from qlib.lab.paths import REPO_ROOT
    from qlib.lab.run import notebook_run_parameters

    nb = REPO_ROOT / "notebooks" / "04_gptq.ipynb"
    out_dir, params = notebook_run_parameters(nb, smoke=False)
    assert out_dir == REPO_ROOT / "results" / "04_gptq" and params["OUT"] == "../results/04_gptq"  # no machine path
    out_dir, params = notebook_run_parameters(nb, smoke=False, parameters={"OUT": "../results/04_gptq_gemma3-270m",
                                                                          "LM": "gemma3-270m"})
    assert out_dir == REPO_ROOT / "results" / "04_gptq_gemma3-270m"
    assert params == {"SMOKE": False, "OUT": "../results/04_gptq_gemma3-270m", "LM": "gemma3-270m"}
    out_dir, params = notebook_run_parameters(nb, smoke=True, out_root=tmp_path)
    assert out_dir == tmp_path.resolve() / "04_gptq" and params["OUT"] == str(out_dir)  # outside the repo: as is


def test_executed_copy_is_tidied(tmp_path):
    from qlib.lab.run import tidy_executed

    root = tmp_path / "repo"
    nb = {"cells": [{"cell_type": "code", "source": "x", "metadata": {}, "execution_count": 1, "outputs": [
        {"output_type": "stream", "name": "stderr", "text": "bar:   0%|\r"},
        {"output_type": "stream", "name": "stderr", "text": "bar:  50%|\rbar: 100%|\n"},
        {"output_type": "stream", "name": "stdout", "text": [f"saved {root}/results/x.png\n"]},
        {"output_type": "execute_result", "execution_count": 1, "metadata": {},
         "data": {"text/plain": f"PosixPath('{root}/data')"}},
        {"output_type": "error", "ename": "E", "evalue": f"in {root}/qlib/a.py", "traceback": [f"File {root}/qlib/a.py"]},
    ]}], "metadata": {"papermill": {"input_path": f"{root}/notebooks/nb.ipynb"}}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    assert tidy_executed(path, root=root) == {"stream_outputs_merged": 1}
    outs = json.loads(path.read_text())["cells"][0]["outputs"]
    assert outs[0] == {"output_type": "stream", "name": "stderr", "text": "bar: 100%|\n"}  # one line: the last state
    assert outs[1]["text"] == "saved ./results/x.png\n"
    assert outs[2]["data"]["text/plain"] == "PosixPath('./data')"
    assert outs[3]["evalue"] == "in ./qlib/a.py" and outs[3]["traceback"] == ["File ./qlib/a.py"]
    assert str(root) not in path.read_text()
