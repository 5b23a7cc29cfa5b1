"""The papermill runner: parameters reach the notebook, failures name the cell."""
import json

import nbformat
import pytest

from qlib.lab.run import discover, parse_param, run_notebook


def _notebook(path, cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("SMOKE = False\nOUT = 'x'\nN = 1")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params] + [nbformat.v4.new_code_cell(c) for c in cells]
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
