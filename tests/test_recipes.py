"""qlib.tools.recipes: line counting, failure rows, warning capture, deprecation merging, timing, save/reload, evidence readers."""
from __future__ import annotations

import io
import tarfile
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from qlib.tools import recipes


def _three_lines(ctx):
    """A docstring that is not counted."""
    # a comment that is not counted
    a = 1

    b = (a +
         2)
    return b


def test_lines_of_code_counts_body_without_docstring_comments_blanks():
    assert recipes.lines_of_code(_three_lines) == 4  # a = 1; two physical lines of b; return


def test_every_recipe_is_short_and_onnx_recipes_include_the_export():
    export = recipes.lines_of_code(recipes.export_fp32_onnx)
    for r in recipes.RECIPE_LIST:
        own = recipes.lines_of_code(r.fn)
        assert 1 <= own <= 15, r.name
        assert recipes.recipe_lines(r) == own + (export if r.kind == "onnx" else 0)
    assert {r.kind for r in recipes.RECIPE_LIST} == {"torch", "onnx"}
    assert len(recipes.RECIPES) == len(recipes.RECIPE_LIST)  # names are unique


def _failing(ctx):
    warnings.warn("torch.ao.quantization is deprecated and will be removed in 2.10.", DeprecationWarning)
    raise RuntimeError("no CUDA here\nsecond line")


def _working(ctx):
    warnings.warn("just a note", UserWarning)
    warnings.warn("just a note", UserWarning)
    return nn.Linear(2, 2)


def test_run_recipe_turns_a_failure_into_a_row_and_records_warnings():
    model, row = recipes.run_recipe(recipes.Recipe("fails", "torch", "x", _failing), ctx=None)
    assert model is None and row["ok"] is False
    assert row["error"] == "RuntimeError: no CUDA here"
    assert row["warnings"][0]["category"] == "DeprecationWarning" and row["quantize_s"] >= 0
    model, row = recipes.run_recipe(recipes.Recipe("works", "torch", "x", _working), ctx=None)
    assert isinstance(model, nn.Linear) and row["ok"] and row["error"] == ""
    assert row["warnings"] == [dict(row["warnings"][0], count=2)]  # same message grouped, counted twice


def test_deprecations_merge_by_message_and_attach_the_migration():
    rows = [{"recipe": "a", "warnings": [{"category": "DeprecationWarning", "message": "torch.ao.quantization is deprecated",
                                          "where": "x.py:1", "count": 1},
                                         {"category": "UserWarning", "message": "unrelated", "where": "y", "count": 3}]},
            {"recipe": "b", "warnings": [{"category": "DeprecationWarning", "message": "torch.ao.quantization is deprecated",
                                          "where": "x.py:1", "count": 2}]}]
    extra = [{"recipe": "torch.onnx.export(dynamo=False)", "category": "DeprecationWarning",
              "message": "The feature will be removed.", "where": "z", "count": 1}]
    deps = recipes.deprecations(rows, extra)
    assert len(deps) == 2
    ao = deps[0]
    assert ao["recipes"] == ["a", "b"] and ao["count"] == 3 and "torchao" in ao["migration"]
    assert "dynamo=True" in deps[1]["migration"]  # matched through the caller when the message says nothing


def test_interleaved_median_orders_fast_and_slow():
    t = recipes.interleaved_median({"fast": lambda: None, "slow": lambda: time.sleep(0.01)}, rounds=3, warmup=0)
    assert t["slow"] >= 0.009 and t["fast"] < t["slow"]
    with pytest.raises(ValueError):
        recipes.interleaved_median({"x": lambda: None}, rounds=0)


def test_dir_bytes_sums_files(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"y" * 5)
    assert recipes.dir_bytes(tmp_path) == 15 and recipes.dir_bytes(tmp_path / "a") == 10


class _NoSave(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(256))

    def save_pretrained(self, path):
        raise TypeError("Object of type Tensor is not JSON serializable")


def test_save_falls_back_to_torch_save_and_keeps_the_error():
    out = recipes.save_and_reload(_NoSave(), torch.zeros(1, 2, dtype=torch.long))
    assert out["save_pretrained"].startswith("TypeError") and out["saved_with"] == "torch.save(state_dict)"
    assert 1024 <= out["bytes"] < 4096  # 256 float32 + pickle overhead
    assert out["reload"] == ""


def test_save_fix_is_applied_before_the_retry():
    class Fixable(_NoSave):
        broken = True

        def save_pretrained(self, path):
            if self.broken:
                raise TypeError("not JSON serializable")
            Path(path).mkdir(parents=True)
            (Path(path) / "w.bin").write_bytes(b"z" * 100)

    def fix(m):
        m.broken = False
        return "fixed"

    out = recipes.save_and_reload(Fixable(), torch.zeros(1, 2, dtype=torch.long), reload=False, fix=fix)
    assert out["saved_with"] == "save_pretrained after fixed" and out["bytes"] == 100


def test_packed_model_saved_with_save_packed_and_reloads_exactly():
    from test_arch import tiny_llama

    from qlib.quant.kernels import pack_model

    model = pack_model(tiny_llama(), bits=8, progress=False)
    out = recipes.save_and_reload(model, torch.arange(12).view(1, 12))
    assert out["save_pretrained"].startswith("RuntimeError") and "save_packed" in out["save_pretrained"]
    assert out["saved_with"] == "qlib.quant.kernels.save_packed" and out["reload"] == "ok"
    assert out["reload_max_abs_logit_diff"] == 0.0 and out["bytes"] > 0


def test_torchao_int4_formats_reports_each_format():
    rows = recipes.torchao_int4_formats(group_size=64)
    from torchao.quantization.quantize_.workflows.int4.int4_packing_format import Int4PackingFormat

    assert [r["packing_format"] for r in rows] == [f.value for f in Int4PackingFormat]
    assert all(r["ok"] or r["error"] for r in rows)  # a failure always says why


def test_wheel_and_sdist_readers(tmp_path):
    whl = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("pkg-1.0.dist-info/METADATA", "Name: pkg\nRequires-Dist: torch>=2\nRequires-Dist: x ; extra == 'y'\n")
        z.writestr("pkg/_base.py", "import os\nfrom transformers.modeling_utils import no_init_weights\n")
        z.writestr("pkg/kernels.so", b"\0")
    facts = recipes.wheel_facts(whl, "pkg/_base.py", [r"no_init_weights"])
    assert facts["extensions"] == ["kernels.so"] and facts["requires"] == ["torch>=2"]
    assert facts["matches"] == ["pkg/_base.py:2: from transformers.modeling_utils import no_init_weights"]
    sdist = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, text in [("pkg-1.0/README.md", "# pkg\n- pkg is officially deprecated.\n"),
                           ("pkg-1.0/setup.py", 'requirements = [\n    "torch",\n    "transformers>=4.45.0",\n]\n')]:
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    facts = recipes.sdist_facts(sdist, [r"deprecated"])
    assert facts["matches"] == ["README.md:2: - pkg is officially deprecated."]
    assert facts["requires"] == ["torch", "transformers>=4.45.0"]


def test_import_in_child_reports_the_error():
    assert recipes.import_in_child("json")["ok"]
    bad = recipes.import_in_child("no_such_module_qlib")
    assert not bad["ok"] and "ModuleNotFoundError" in bad["error"]
