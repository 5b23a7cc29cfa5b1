"""qlib.tools.doctor: the facts it claims about this machine, checked independently; probes isolated; rules engine."""
from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qlib.tools import doctor

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def diag_and_cli() -> tuple[dict, subprocess.CompletedProcess]:
    """diagnose() in-process, and `python -m qlib doctor --json` run concurrently (keeps the file fast)."""
    cli = subprocess.Popen([sys.executable, "-m", "qlib.tools.doctor", "--json"], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    t0 = time.perf_counter()
    diag = doctor.diagnose()
    wall = time.perf_counter() - t0
    out, err = cli.communicate(timeout=120)
    # ~10 s on an idle 2-core machine; the probe deadline bounds it even when other jobs share the cores
    assert wall < doctor.DEFAULT_TIMEOUT_S + 15, f"diagnose() took {wall:.1f} s; the probe deadline is not enforced"
    return diag, subprocess.CompletedProcess(cli.args, cli.returncode, out, err)


def _row(diag: dict, name: str) -> dict:
    rows = [b for b in diag["backends"] if b["name"] == name]
    assert len(rows) == 1, f"expected one row named {name!r}"
    return rows[0]


def test_torch_facts(diag_and_cli):
    t = diag_and_cli[0]["torch"]
    assert t["version"] == torch.__version__
    assert t["cuda_built"] == torch.version.cuda
    if getattr(torch.version, "hip", None):
        assert t["build"].startswith("ROCm")
    else:
        assert t["build"] == (f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU")
    assert t["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert t["threads"]["torch_intra_op"] == torch.get_num_threads()
    assert t["quantized_engine"] == torch.backends.quantized.engine


def test_cuda_reported_unavailable_iff_torch_says_so(diag_and_cli):
    diag = diag_and_cli[0]
    assert diag["torch"]["cuda_available"] is torch.cuda.is_available()
    assert (_row(diag, "cuda")["status"] == "missing") is (not torch.cuda.is_available())
    assert len(diag["torch"]["devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_onnxruntime_providers(diag_and_cli):
    ort = pytest.importorskip("onnxruntime")
    row = _row(diag_and_cli[0], "onnxruntime")
    assert row["status"] == "ok", row["reason"]
    assert row["details"]["providers"] == list(ort.get_available_providers())
    assert "CPUExecutionProvider" in row["details"]["providers"]
    assert {"MatMulInteger", "DynamicQuantizeMatMul"} & set(row["details"]["quantized_ops"])  # real integer kernels
    assert row["details"]["rel_err"] < 0.05


def _own_int4pack_ok() -> tuple[bool, float]:
    """Run the CPU int4pack kernel independently of qlib: random 4-bit codes, scales and zeros."""
    g = torch.Generator().manual_seed(123)
    n, k, group = 16, 64, 32
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    scale = torch.rand(k // group, n, generator=g) * 0.1 + 0.01
    zero = torch.randn(k // group, n, generator=g) * 0.1
    x = torch.randn(3, k, generator=g)
    w = (q.float() - 8).reshape(n, k // group, group) * scale.T[..., None] + zero.T[..., None]
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, torch.stack([scale, zero], -1))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False, float("inf")
    ref = x @ w.reshape(n, k).T
    err = float((y - ref).norm() / ref.norm())
    return err < 1e-4, err


def test_int4pack_status_matches_running_the_kernel(diag_and_cli):
    row = _row(diag_and_cli[0], "aten int4pack (W4 CPU)")
    own_ok, own_err = _own_int4pack_ok()
    assert (row["status"] == "ok") is own_ok, f"doctor says {row['status']} ({row['reason']}); own run err {own_err}"
    if own_ok:
        assert row["details"]["rel_err"]["float32"] < 1e-4
        assert row["details"]["rel_err"]["bfloat16"] < 2e-2


def test_cpu_flags_match_proc_cpuinfo(diag_and_cli):
    path = Path("/proc/cpuinfo")
    if not path.exists():
        pytest.skip("no /proc/cpuinfo on this platform")
    first = path.read_text().split("\n\n")[0]
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    cpu = diag_and_cli[0]["cpu"]
    assert cpu["flags"], "no kernel flags reported"
    for name, present in cpu["flags"].items():
        assert present is (name in flags), f"{name}: doctor says {present}, /proc/cpuinfo says {name in flags}"
    if "model name" in fields:
        assert cpu["model"] == fields["model name"]


def test_cli_json_matches_in_process(diag_and_cli):
    diag, cli = diag_and_cli
    assert cli.returncode == 0, cli.stderr[-2000:]
    data = json.loads(cli.stdout)  # stdout holds the JSON and nothing else (no package banners)
    assert set(data) == set(diag)
    assert [b["name"] for b in data["backends"]] == [b["name"] for b in diag["backends"]]
    assert data["torch"]["version"] == diag["torch"]["version"]
    assert [r["applies"] for r in data["rules"]] == [r["applies"] for r in diag["rules"]]


def test_backend_rows_are_well_formed(diag_and_cli):
    diag = diag_and_cli[0]
    names = [n for n, _ in doctor.PARENT_PROBES] + [n for n, _ in doctor.CHILD_PROBES]
    assert [b["name"] for b in diag["backends"]] == names
    for row in diag["backends"]:
        assert row["status"] in doctor.STATUSES
        assert row["ok"] is (row["status"] in ("ok", "warn"))
        assert isinstance(row["reason"], str) and row["reason"].strip()
    for name, _ in doctor.CHILD_PROBES:
        row = _row(diag, name)
        installed = next(filter(None, map(doctor.installed_version, doctor.CHILD_DISTS[name])), None)
        assert row["version"] == installed, f"{name}: reported {row['version']}, installed {installed}"
        assert (row["status"] == "missing") is (installed is None)


def test_rules_report_what_is_installed(diag_and_cli):
    for rule in diag_and_cli[0]["rules"]:
        try:
            installed = md.version(rule["package"])
        except md.PackageNotFoundError:
            installed = None
        assert rule["installed"] == installed
        if installed is None and "installed or not" not in rule["condition"]:
            assert not rule["applies"]
    applied = {(f["topic"], f["message"].rsplit(" [", 1)[0]) for f in diag_and_cli[0]["findings"]}
    for rule in diag_and_cli[0]["rules"]:
        assert ((rule["package"], rule["message"]) in applied) is rule["applies"]


def _applies(versions: dict, cuda: bool) -> set[tuple[str, str]]:
    return {(r["package"], r["condition"]) for r in doctor.evaluate_rules(versions, cuda) if r["applies"]}


def test_rule_engine_conditions():
    bnb = lambda v, cuda: {c for p, c in _applies({"bitsandbytes": v}, cuda) if p == "bitsandbytes"}  # noqa: E731
    assert len(bnb("0.41.0", False)) == 2  # the article's version on a CPU box: both rules
    assert len(bnb("0.41.0", True)) == 1 and all("<0.43" in c for c in bnb("0.41.0", True))
    assert len(bnb("0.45.1", False)) == 1 and bnb("0.45.1", True) == set()
    assert bnb("0.50.2", False) == set()
    gptq = lambda vs, cuda: {c for p, c in _applies(vs, cuda) if p == "auto-gptq"}  # noqa: E731
    assert len(gptq({"auto-gptq": "0.7.1", "transformers": "5.17.0"}, False)) == 3
    assert len(gptq({"auto-gptq": "0.7.1", "transformers": "4.46.0"}, True)) == 1  # archived, still
    assert gptq({"transformers": "5.17.0"}, False) == set()  # not installed: nothing applies
    assert not any(p == "optimum-onnx" for p, _ in _applies({}, False))
    assert any(p == "optimum-onnx" for p, _ in _applies({"transformers": "5.17.0"}, False))
    assert not any(p == "optimum-onnx" for p, _ in _applies({"transformers": "4.57.1"}, False))
    for rule in doctor.RULES:
        assert rule.message.strip() and rule.source.strip() and rule.level in ("error", "warn")


def test_cuda_findings_catch_the_articles_mismatch():
    tinfo = {"cuda_built": "11.8", "cuda_available": False, "devices": []}
    found = doctor.cuda_findings(tinfo, {"driver_cuda_version": "11.7", "gpus": [{"name": "T4"}]})
    assert any(f["level"] == "error" and "11.8" in f["message"] and "11.7" in f["message"] for f in found)
    ok = doctor.cuda_findings({"cuda_built": "12.4", "cuda_available": True,
                               "devices": [{"name": "A100", "capability": "8.0"}]}, {"driver_cuda_version": "12.6"})
    assert ok == []
    old = doctor.cuda_findings({"cuda_built": "12.4", "cuda_available": True,
                                "devices": [{"name": "T4", "capability": "7.5"}]}, {"driver_cuda_version": "12.4"})
    assert len(old) == 1 and "7.5" in old[0]["message"]
    cpu_torch = doctor.cuda_findings({"cuda_built": None, "devices": []}, {"gpus": [{"name": "H100"}]})
    assert len(cpu_torch) == 1 and "CPU build" in cpu_torch[0]["message"]


def test_bnb_binary_choice_follows_torch_cuda(tmp_path):
    for v in (118, 121, 124):
        (tmp_path / f"libbitsandbytes_cuda{v}.so").touch()
    pick = lambda cuda: doctor._bnb_cuda_binary(tmp_path, cuda)["match"]  # noqa: E731
    assert pick("12.4") == 124  # exact
    assert pick("12.6") == 124  # highest shipped below, same major
    assert pick("12.0") == 121  # lowest shipped above, same major
    assert pick("11.7") == 118
    assert pick("13.0") is None  # no same-major binary: the article's failure
    assert pick(None) is None


def test_probe_exceptions_become_rows():
    def boom() -> dict:
        raise RuntimeError("kernel not compiled for this CPU\nsecond line")

    row = doctor.run_probe("boom", boom)
    assert row["status"] == "fail" and not row["ok"]
    assert row["reason"] == "RuntimeError: kernel not compiled for this CPU"
    assert doctor.run_probe("exit", lambda: sys.exit(3))["status"] == "fail"


def test_child_deadline_and_crash_are_reported(tmp_path):
    out, err = tmp_path / "probes.jsonl", tmp_path / "stderr.txt"
    err.write_text("")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    t0 = time.perf_counter()
    rows = doctor._collect_child(sleeper, out, err, time.monotonic() + 0.3)
    assert time.perf_counter() - t0 < 5
    assert [r["status"] for r in rows] == ["timeout"] * len(doctor.CHILD_PROBES)

    first = doctor.CHILD_PROBES[0][0]
    out.write_text(json.dumps({**doctor._result(first, "1.0", "ok", "fine"), "seconds": 0.1}) + "\n")
    err.write_text("Segmentation fault\n")
    crasher = subprocess.Popen([sys.executable, "-c", "import os; os._exit(3)"])
    rows = doctor._collect_child(crasher, out, err, time.monotonic() + 30)
    assert rows[0]["status"] == "ok"
    assert all(r["status"] == "fail" and "code 3" in r["reason"] for r in rows[1:])


def test_text_report_has_one_line_per_backend(diag_and_cli):
    diag = diag_and_cli[0]
    text = doctor.format_report(diag).splitlines()
    header = next(i for i, ln in enumerate(text) if ln.startswith("backend "))
    table = text[header + 1: header + 1 + len(diag["backends"])]
    for row in diag["backends"]:
        lines = [ln for ln in table if ln.startswith(row["name"] + " ")]
        assert len(lines) == 1 and f" {row['status']} " in lines[0]
    assert any(torch.__version__ in ln for ln in text)
