"""Which quantization backends work on this machine, and why not where they don't.

The article lost two days to bitsandbytes 0.41 refusing a CUDA 11.7 install; this module turns that kind of
gotcha into a check. ``python -m qlib doctor [--json]`` (or :func:`diagnose` in a notebook) reports:

- the machine: torch build (CPU / CUDA version it was built with), CPU capability and the CPU flags that pick
  kernels, threads, CUDA devices and their compute capability, the NVIDIA driver;
- one functional probe per backend, on a tiny workload, each isolated (an exception becomes a ``fail`` row);
- known incompatibilities (:data:`RULES`, each with its source) evaluated against what is installed, plus
  live checks (driver vs torch CUDA, declared requirements that installed versions violate).

Probes of third-party packages (torchao, onnxruntime, bitsandbytes, gptqmodel, llmcompressor, ...) run in a child
process with a deadline: importing them prints banners, sets environment variables (gptqmodel) and can hang or
crash, none of which may reach the caller. Only PyTorch's own kernels are probed in-process.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata as md
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from qlib.lab.machine import read_cpuinfo
from qlib.lab.results import PACKAGES as RESULT_PACKAGES
from qlib.lab.results import jsonable

SCHEMA = 1
DEFAULT_TIMEOUT_S = 30.0  # cap for the package probes; ~10 s suffice on an idle 2-core machine
STATUSES = ("ok", "warn", "fail", "missing", "timeout")  # ok/warn: the backend works
MARLIN_MIN_CAPABILITY = (8, 0)  # Marlin / fast AWQ kernels need Ampere or newer (article: A100, RTX 40)
ALTERNATIVES = ("onnxruntime-gpu", "auto-gptq", "autoawq", "optimum-onnx")  # backends the rules advise on, not pinned
PACKAGES = (*(p for p in RESULT_PACKAGES if p != "qlib"), *ALTERNATIVES)  # versions reported, requirements checked


# ----------------------------------------------------------------------------------------------- known issues
@dataclasses.dataclass(frozen=True)
class Rule:
    """A known incompatibility: it applies when every condition given holds on this machine."""

    package: str  # distribution name
    message: str
    source: str
    level: str = "warn"  # "error": the backend cannot work; "warn": works with a catch or blocks an upgrade
    version: str = ""  # specifier on the package's installed version; "" = any version
    needs_installed: bool = True  # False: also applies when the package is absent (advice before installing)
    other: tuple[str, str] | None = None  # (distribution, specifier) that must also hold
    cuda: bool | None = None  # True / False: applies only with / without a usable CUDA device

    def __post_init__(self) -> None:
        if self.level not in ("error", "warn"):
            raise ValueError(f"Rule level {self.level!r} must be 'error' or 'warn'; pick how badly it breaks things.")
        if not self.message.strip() or not self.source.strip():
            raise ValueError(f"Rule for {self.package!r} needs a message and a source; say what breaks and where "
                             "that is documented.")

    def condition(self) -> str:
        """The rule's condition in words."""
        parts = [f"{self.package} installed" if self.needs_installed else f"{self.package} installed or not"]
        if self.version:
            parts.append(f"{self.package}{self.version}")
        if self.other:
            parts.append(f"{self.other[0]}{self.other[1]}")
        if self.cuda is not None:
            parts.append("CUDA device" if self.cuda else "no CUDA device")
        return ", ".join(parts)


RULES: tuple[Rule, ...] = (
    Rule("auto-gptq", level="error",
         message="archived: development stopped (repository archived March 2025); use gptqmodel, its drop-in "
                 "successor, which also quantizes on CPU",
         source="github.com/AutoGPTQ/AutoGPTQ README; huggingface/peft#3190; huggingface/transformers#41567"),
    Rule("auto-gptq", level="error", other=("transformers", ">=5"),
         message="does not import: auto_gptq 0.7.1 does `from transformers.modeling_utils import no_init_weights`, "
                 "which transformers 5 removed (moved to transformers.initialization)",
         source="verified here by importing the auto-gptq 0.7.1 wheel (auto_gptq/modeling/_base.py:20); "
                "same break in ModelCloud/GPTQModel#2328"),
    Rule("auto-gptq", level="error", cuda=False,
         message="cannot quantize without CUDA: BaseGPTQForCausalLM.quantize moves every layer to cuda:0",
         source="auto_gptq 0.7.1 auto_gptq/modeling/_base.py:369; AutoGPTQ/AutoGPTQ#19"),
    Rule("autoawq", level="warn",
         message="officially deprecated and unmaintained (last tested with torch 2.6.0 / transformers 4.51.3); "
                 "AWQ now lives in llm-compressor (adopted by vLLM) and gptqmodel",
         source="pypi.org/project/autoawq README; huggingface/transformers#38078; huggingface/transformers#41567"),
    Rule("optimum-onnx", level="warn", needs_installed=False, other=("transformers", ">=4.58"),
         message="optimum-onnx 0.1.0 requires transformers>=4.36,<4.58 and optimum~=2.1.0, so it cannot join this "
                 "set (pip would downgrade transformers); use onnxruntime.quantization directly",
         source="optimum-onnx 0.1.0 wheel METADATA (Requires-Dist) on PyPI"),
    Rule("gptqmodel", level="warn", needs_installed=False, other=("torch", "<2.14.1"),
         message="gptqmodel 7.7.0 requires torch>=2.14.1 and transformers>=5.20.2 (outside llmcompressor 0.14's "
                 "transformers<=5.17.0); keep gptqmodel 7.6.x with this torch",
         source="gptqmodel 7.7.0 sdist requirements.txt on PyPI"),
    Rule("llmcompressor", level="warn",
         message="caps transformers and torch (0.14.0.1: transformers>=5.15.0,<=5.17.0, torch>=2.10.0,<=2.14.0), "
                 "so it fixes the transformers version of the whole set: upgrade the two together",
         source="llmcompressor 0.14.0.1 METADATA (Requires-Dist)"),
    Rule("bitsandbytes", level="error", version="<0.48", cuda=False,
         message="wheels before 0.48 officially support only CUDA GPUs (CPU was an alpha 'multi-backend' preview "
                 "built from source); install bitsandbytes>=0.48 for CPU int8 / NF4 / FP4",
         source="huggingface.co/docs/bitsandbytes/v0.45.1/installation; "
                "bitsandbytes-foundation/bitsandbytes#1770 (0.48.0: CPU officially supported)"),
    Rule("bitsandbytes", level="error", version="<0.43",
         message="the article's era (0.41): CUDA-only, and its setup must find a CUDA runtime matching a shipped "
                 "binary, else it falls back to libbitsandbytes_cpu ('compiled without GPU support') with no "
                 "8-bit/4-bit ops; BNB_CUDA_VERSION forces the pick",
         source="bitsandbytes-foundation/bitsandbytes#651 (0.41.0 'CUDA Setup failed'), #719; "
                "article: CUDA 11.7 vs bitsandbytes 0.41.0"),
)


def _spec_holds(version: str | None, spec: str) -> bool:
    """True if ``version`` is installed and satisfies the PEP 440 specifier ``spec`` ("" = any)."""
    if version is None:
        return False
    if not spec:
        return True
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(spec).contains(version, prereleases=True)


def evaluate_rules(versions: Mapping[str, str | None], cuda_available: bool,
                   rules: Iterable[Rule] = RULES) -> list[dict[str, Any]]:
    """Evaluate each rule against installed ``versions`` (None = not installed); pure, for tests too."""
    out = []
    for rule in rules:
        installed = versions.get(rule.package)
        applies = (installed is not None or not rule.needs_installed)
        applies = applies and (not rule.version or _spec_holds(installed, rule.version))
        applies = applies and (rule.other is None or _spec_holds(versions.get(rule.other[0]), rule.other[1]))
        applies = applies and (rule.cuda is None or rule.cuda == cuda_available)
        out.append({"package": rule.package, "installed": installed, "condition": rule.condition(),
                    "applies": bool(applies), "level": rule.level, "message": rule.message, "source": rule.source})
    return out


def unmet_requirements(packages: Iterable[str] = PACKAGES) -> list[dict[str, str]]:
    """Declared requirements (no extras) of installed ``packages`` that the installed versions violate."""
    from packaging.requirements import Requirement

    out = []
    for dist in packages:
        try:
            reqs = md.requires(dist) or []
        except md.PackageNotFoundError:
            continue
        for text in reqs:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue  # an extra, or another platform / Python
            have = installed_version(req.name)
            if have is None:
                out.append({"package": dist, "requires": str(req), "installed": "missing"})
            elif not req.specifier.contains(have, prereleases=True):
                out.append({"package": dist, "requires": str(req), "installed": have})
    return out


# ---------------------------------------------------------------------------------------------------- machine
def installed_version(dist: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _threads() -> dict[str, Any]:
    """Thread counts that decide CPU kernel speed."""
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {"torch_intra_op": torch.get_num_threads(), "torch_interop": torch.get_num_interop_threads(),
            "os_cpu_count": os.cpu_count(), "affinity": affinity,
            **{k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}}


def torch_info() -> dict[str, Any]:
    """torch version, build (CPU / CUDA / ROCm and the version it was built with), CPU capability, devices."""
    import torch

    cuda_built, hip = torch.version.cuda, getattr(torch.version, "hip", None)
    build = f"ROCm {hip}" if hip else (f"CUDA {cuda_built}" if cuda_built else "CPU")
    available = bool(torch.cuda.is_available())
    devices = []
    for i in range(torch.cuda.device_count() if available else 0):
        props = torch.cuda.get_device_properties(i)
        devices.append({"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                        "memory_gib": round(props.total_memory / 2**30, 1)})
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: None)()
    return {"version": torch.__version__, "build": build, "cuda_built": cuda_built, "hip_built": hip,
            "cuda_available": available, "devices": devices, "cpu_capability": capability,
            "mkldnn": torch.backends.mkldnn.is_available(), "mkl": torch.backends.mkl.is_available(),
            "quantized_engine": torch.backends.quantized.engine,
            "quantized_engines": list(torch.backends.quantized.supported_engines), "threads": _threads()}


def _run(cmd: list[str], timeout: float = 10.0) -> str | None:
    """stdout of a short command, or None if it fails or times out."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def nvidia_info() -> dict[str, Any]:
    """NVIDIA driver version, the CUDA version it supports, and its GPUs, from nvidia-smi (None if absent)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"nvidia_smi": None}
    header = _run([exe]) or ""
    m = re.search(r"CUDA Version:\s*([\d.]+)", header)
    gpus, driver = [], None
    rows = _run([exe, "--query-gpu=name,driver_version,compute_cap,memory.total", "--format=csv,noheader"]) or ""
    for row in filter(None, (r.strip() for r in rows.splitlines())):
        name, driver, cap, mem = ([c.strip() for c in row.split(",")] + ["", "", "", ""])[:4]
        gpus.append({"name": name, "compute_capability": cap, "memory": mem})
    return {"nvidia_smi": exe, "driver_version": driver, "driver_cuda_version": m.group(1) if m else None,
            "gpus": gpus}


def _vtuple(text: str | None) -> tuple[int, ...]:
    """'12.4' -> (12, 4); () for None."""
    return tuple(int(p) for p in re.findall(r"\d+", text or "")[:2])


def cuda_findings(tinfo: Mapping[str, Any], nvinfo: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Live CUDA checks: driver vs the CUDA torch was built for, GPUs torch cannot see, compute capability."""
    found = []
    built, driver_cuda = tinfo.get("cuda_built"), nvinfo.get("driver_cuda_version")
    if built and driver_cuda and _vtuple(driver_cuda) < _vtuple(built):
        found.append(_finding("error", "torch/driver", f"torch is built for CUDA {built} but the driver supports "
                              f"CUDA {driver_cuda}: update the driver or install a torch wheel for CUDA <= "
                              f"{driver_cuda} (the article's CUDA 11.7 vs 11.8 trap)"))
    if nvinfo.get("gpus") and not built and not tinfo.get("hip_built"):
        found.append(_finding("warn", "torch", "nvidia-smi sees a GPU but torch is a CPU build: install a CUDA "
                              "wheel of the same torch version to use it"))
    if built and not tinfo.get("cuda_available"):
        found.append(_finding("warn", "torch", f"torch is built for CUDA {built} but torch.cuda.is_available() is "
                              "False: no device visible, or the driver is missing / too old"))
    for dev in tinfo.get("devices", []):
        if _vtuple(dev["capability"]) < MARLIN_MIN_CAPABILITY:
            found.append(_finding("warn", "gpu", f"{dev['name']} has compute capability {dev['capability']} < 8.0: "
                                  "Marlin / fast AWQ INT4 kernels need Ampere or newer; expect smaller speedups"))
    return found


def _finding(level: str, topic: str, message: str, source: str = "live check on this machine") -> dict[str, Any]:
    """One applied finding."""
    return {"level": level, "topic": topic, "message": message, "source": source}


# ----------------------------------------------------------------------------------------------------- probes
def _rel_err(y: Any, ref: Any) -> float:
    """Relative Frobenius error ||y - ref|| / ||ref|| of two tensors (as float32)."""
    y, ref = y.float(), ref.float()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-12))


def _result(name: str, version: str | None, status: str, reason: str, **details: Any) -> dict[str, Any]:
    """A probe's result row."""
    return {"name": name, "version": version, "status": status, "ok": status in ("ok", "warn"),
            "reason": reason, "details": details}


class _LogCapture(logging.Handler):
    """Collect WARNING+ log records emitted while a probe runs."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        lines = record.getMessage().strip().splitlines()
        if lines:
            self.messages.append(lines[0][:200])


def run_probe(name: str, fn: Callable[[], dict[str, Any]], version: str | None = None) -> dict[str, Any]:
    """Run one probe isolated: exceptions become a ``fail`` row (with ``version``); warnings are recorded."""
    t0, handler, root = time.perf_counter(), _LogCapture(), logging.getLogger()
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                row = fn()
            except (Exception, SystemExit) as e:  # an import can sys.exit(); never let it out
                first = (str(e).strip().splitlines() or [""])[0][:240]
                row = _result(name, version, "fail", f"{type(e).__name__}: {first}".rstrip(": "))
    finally:
        root.removeHandler(handler)
    msgs = [f"{w.category.__name__}: {(str(w.message).strip().splitlines() or [''])[0][:200]}" for w in caught]
    row["details"]["warnings"] = list(dict.fromkeys(msgs + [m for m in handler.messages if m]))[:8]
    row["name"], row["seconds"] = name, round(time.perf_counter() - t0, 3)
    return row


def probe_torch_ao_dynamic() -> dict[str, Any]:
    """torch.ao dynamic INT8 on a tiny Linear; 'warn' when it works but emits a DeprecationWarning."""
    import torch

    torch.manual_seed(0)
    model, x = torch.nn.Sequential(torch.nn.Linear(64, 32)), torch.randn(8, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qmodel = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        with torch.no_grad():
            err = _rel_err(qmodel(x), model(x))
    for w in caught:  # re-emit so run_probe records them too
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    deprecations = [str(w.message).strip().split("\n")[0].strip() for w in caught
                    if issubclass(w.category, DeprecationWarning)]
    swapped = type(qmodel[0]).__module__.startswith("torch.ao.nn.quantized")
    if not swapped or err > 0.05:
        return _result("", torch.__version__, "fail", f"Linear not swapped or wrong output (rel err {err:.3g})")
    if deprecations:
        return _result("", torch.__version__, "warn", f"works (rel err {err:.2g}); deprecated: {deprecations[0]}",
                       rel_err=err, deprecation=deprecations[0])
    return _result("", torch.__version__, "ok", f"works (rel err {err:.2g})", rel_err=err)


def probe_int8pack() -> dict[str, Any]:
    """aten._weight_int8pack_mm (INT8 weight-only, per-channel) vs the dequantized matmul, fp32 and bf16."""
    import torch

    torch.manual_seed(0)
    n, k = 32, 64
    w, x = torch.randn(n, k), torch.randn(4, k)
    scales = w.abs().amax(1) / 127
    qw = torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8)
    ref = x @ (qw.float() * scales[:, None]).T
    errs = {str(dt).replace("torch.", ""): _rel_err(torch.ops.aten._weight_int8pack_mm(x.to(dt), qw, scales.to(dt)),
                                                   ref) for dt in (torch.float32, torch.bfloat16)}
    bad = {d: e for d, e in errs.items() if e > (1e-4 if d == "float32" else 2e-2)}
    status = "fail" if bad else "ok"
    return _result("", torch.__version__, status, ("mismatch vs dequantized matmul: " if bad else "matches the "
                   "dequantized matmul: ") + ", ".join(f"{d} rel err {e:.1g}" for d, e in errs.items()), rel_err=errs)


def int4pack_reference(n: int = 32, k: int = 128, group: int = 32, seed: int = 0) -> dict[str, Any]:
    """A tiny INT4 asymmetric group-wise weight in the layout the CPU int4pack kernel expects."""
    import torch

    g = torch.Generator().manual_seed(seed)
    w, x = torch.randn(n, k, generator=g), torch.randn(4, k, generator=g)
    wg = w.reshape(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = (hi - lo).clamp_min(1e-6) / 15
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15)
    zero = lo + 8 * scale  # the kernel computes (q - 8) * scale + zero
    deq = ((q - 8) * scale[..., None] + zero[..., None]).reshape(n, k)
    scales_and_zeros = torch.stack([scale.T, zero.T], -1).contiguous()  # [k / group, n, 2]
    return {"q": q.reshape(n, k).to(torch.int32), "x": x, "deq": deq, "group": group, "sz": scales_and_zeros}


def probe_int4pack() -> dict[str, Any]:
    """aten._convert_weight_to_int4pack_for_cpu + _weight_int4pack_mm_for_cpu vs the dequantized matmul."""
    import torch

    ref = int4pack_reference()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(ref["q"], 1)
    errs = {}
    for dt in (torch.float32, torch.bfloat16):
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(ref["x"].to(dt), packed, ref["group"], ref["sz"].to(dt))
        errs[str(dt).replace("torch.", "")] = _rel_err(y, ref["x"] @ ref["deq"].T)
    bad = {d: e for d, e in errs.items() if e > (1e-4 if d == "float32" else 2e-2)}
    return _result("", torch.__version__, "fail" if bad else "ok", ("mismatch vs dequantized matmul: " if bad else
                   "matches the dequantized matmul: ") + ", ".join(f"{d} rel err {e:.1g}" for d, e in errs.items()),
                   rel_err=errs, group=ref["group"])


def probe_cuda() -> dict[str, Any]:
    """CUDA through torch: device names and compute capability, or why there is none."""
    import torch

    info = torch_info()
    if not info["cuda_available"]:
        why = (f"torch built for CUDA {info['cuda_built']} but no usable device/driver" if info["cuda_built"]
               else "torch is a CPU build (torch.version.cuda is None)")
        return _result("", info["cuda_built"], "missing", why)
    devs = "; ".join(f"{d['name']} sm{d['capability']}" for d in info["devices"])
    old = [d for d in info["devices"] if _vtuple(d["capability"]) < MARLIN_MIN_CAPABILITY]
    return _result("", info["cuda_built"], "warn" if old else "ok",
                   devs + ("; capability < 8.0: no Marlin / fast AWQ kernels" if old else ""),
                   devices=info["devices"])


def _require(dist: str, *alternatives: str) -> str | None:
    """The installed version of ``dist`` (or the first installed alternative)."""
    for name in (dist, *alternatives):
        v = installed_version(name)
        if v is not None:
            return v
    return None


def probe_transformers() -> dict[str, Any]:
    """transformers imports; which quantization configs it exposes."""
    version = _require("transformers")
    if version is None:
        return _result("", None, "missing", "not installed")
    tf = importlib.import_module("transformers")
    configs = [c for c in ("BitsAndBytesConfig", "GPTQConfig", "AwqConfig", "TorchAoConfig", "CompressedTensorsConfig")
               if hasattr(tf, c)]
    return _result("", version, "ok", f"imports; quantization configs: {', '.join(configs) or 'none'}",
                   configs=configs)


def probe_onnx() -> dict[str, Any]:
    """onnx imports."""
    version = _require("onnx")
    if version is None:
        return _result("", None, "missing", "not installed")
    onnx = importlib.import_module("onnx")
    return _result("", version, "ok", f"imports; opset {onnx.defs.onnx_opset_version()}, IR {onnx.IR_VERSION}")


def probe_onnxscript() -> dict[str, Any]:
    """onnxscript imports (torch.onnx.export(dynamo=True) needs it)."""
    version = _require("onnxscript")
    if version is None:
        return _result("", None, "missing", "not installed: torch.onnx.export(dynamo=True) will fail")
    importlib.import_module("onnxscript")
    return _result("", version, "ok", "imports; torch.onnx.export(dynamo=True) can run")


def probe_onnxruntime() -> dict[str, Any]:
    """onnxruntime providers, and quantize_dynamic + run on a tiny MatMul graph."""
    version = _require("onnxruntime", "onnxruntime-gpu")
    if version is None:
        return _result("", None, "missing", "not installed")
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    providers = list(ort.get_available_providers())
    rng = np.random.default_rng(0)
    w, x = rng.standard_normal((64, 32)).astype(np.float32), rng.standard_normal((8, 64)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 32])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # old enough for any recent onnxruntime
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp, "fp32.onnx"), Path(tmp, "int8.onnx")
        onnx.save(model, fp32)
        quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
        ops = sorted({n.op_type for n in onnx.load(int8).graph.node})
        sess = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
        y = sess.run(None, {"x": x})[0]
    ref = x @ w
    err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
    integer_op = any(o in ("MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul") for o in ops)
    status = "ok" if integer_op and err < 0.05 else "fail"
    return _result("", version, status, f"providers {', '.join(providers)}; quantize_dynamic INT8 "
                   f"({'/'.join(ops)}) rel err {err:.2g}", providers=providers, quantized_ops=ops, rel_err=err)


def probe_torchao() -> dict[str, Any]:
    """torchao imports; quantize_ with Int8WeightOnlyConfig on a tiny Linear."""
    version = _require("torchao")
    if version is None:
        return _result("", None, "missing", "not installed")
    import torch
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    model, x = torch.nn.Sequential(torch.nn.Linear(64, 32)), torch.randn(8, 64)
    with torch.no_grad():
        ref = model(x)
        quantize_(model, Int8WeightOnlyConfig())
        err = _rel_err(model(x), ref)
    kind = type(model[0].weight).__name__
    status = "ok" if err < 0.05 and kind != "Parameter" else "fail"
    return _result("", version, status, f"quantize_(Int8WeightOnlyConfig) -> {kind}, rel err {err:.2g}",
                   weight_type=kind, rel_err=err)


def _bnb_cuda_binary(package_dir: Path, cuda: str | None) -> dict[str, Any]:
    """Which shipped libbitsandbytes_cuda*.so matches torch's CUDA version (the article's gotcha)."""
    shipped = sorted(int(m.group(1)) for p in package_dir.glob("libbitsandbytes_cuda*")
                     if (m := re.match(r"libbitsandbytes_cuda(\d+)", p.name)))
    if not cuda:
        return {"shipped_cuda": shipped, "match": None}
    major, minor = _vtuple(cuda)
    want = major * 10 + minor  # 11.8 -> 118, 12.4 -> 124 (the shipped file names)
    same_major = [s for s in shipped if s // 10 == major]
    match = want if want in shipped else (max([s for s in same_major if s < want], default=None)
                                         or min([s for s in same_major if s > want], default=None))
    return {"shipped_cuda": shipped, "wanted": want, "match": match}


def probe_bitsandbytes() -> dict[str, Any]:
    """bitsandbytes: backend and native library it picked; Linear8bitLt and NF4 Linear4bit on a tiny layer."""
    version = _require("bitsandbytes")
    if version is None:
        return _result("", None, "missing", "not installed")
    import torch

    bnb = importlib.import_module("bitsandbytes")
    cext = importlib.import_module("bitsandbytes.cextension")
    backend = getattr(cext, "BNB_BACKEND", "CUDA")  # before the multi-backend refactor, CUDA was the only one
    lib = getattr(cext, "lib", None)
    lib_name = Path(getattr(getattr(lib, "_lib", None), "_name", "") or "").name or type(lib).__name__
    binary = _bnb_cuda_binary(Path(bnb.__file__).parent, torch.version.cuda)
    details: dict[str, Any] = {"backend": backend, "native_library": lib_name, **binary,
                               "features": sorted(getattr(bnb, "features", []))}
    if torch.version.cuda and binary["match"] is None:
        return _result("", version, "fail", f"no shipped binary for torch's CUDA {torch.version.cuda} "
                       f"(ships {binary['shipped_cuda']}): set BNB_CUDA_VERSION or change torch", **details)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    lin, x = torch.nn.Linear(64, 32, bias=False), torch.randn(8, 64)
    with torch.no_grad():
        ref = lin(x)
        l8 = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False, threshold=6.0)
        l8.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        l8 = l8.to(device)
        e8 = _rel_err(l8(x.to(device)).cpu(), ref)
        l4 = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4", compute_dtype=torch.float32)
        l4.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
        l4 = l4.to(device)
        e4 = _rel_err(l4(x.to(device)).cpu(), ref)
    details.update(int8_rel_err=e8, nf4_rel_err=e4, int8_weight_dtype=str(l8.weight.dtype), device=device)
    ok = e8 < 0.02 and e4 < 0.2 and l8.weight.dtype == torch.int8
    cpu_ops = sys.modules.get("bitsandbytes.backends.cpu.ops")
    slow_4bit = device == "cpu" and getattr(cpu_ops, "gemm_4bit_forward_kernel", "") is None
    details["cpu_4bit_gemm_kernel"] = not slow_4bit
    note = ("; fast CPU 4-bit GEMM absent (fetched from the Hub via the `kernels` package), generic path used"
            if slow_4bit else "")
    return _result("", version, "ok" if ok else "fail", f"backend {backend} ({lib_name}); Linear8bitLt rel err "
                   f"{e8:.1g}, NF4 Linear4bit rel err {e4:.1g} on {device}{note}", **details)


def probe_gptqmodel() -> dict[str, Any]:
    """gptqmodel imports (no quantization: its first use JIT-compiles a C++ extension, ~50 s on 2 cores)."""
    version = _require("gptqmodel")
    if version is None:
        return _result("", None, "missing", "not installed (successor of auto-gptq; GPTQ and AWQ on CPU)")
    importlib.import_module("gptqmodel")
    root = Path(os.environ.get("GPTQMODEL_TORCH_EXTENSIONS_DIR", Path.home() / ".cache/gptqmodel/torch_extensions"))
    built = len(list(root.expanduser().rglob("*.so"))) if root.expanduser().is_dir() else 0
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    reason = (f"imports; first quantization JIT-compiles a C++ extension ({built} cached builds; "
              f"compiler {'found' if compiler else 'MISSING'})")
    return _result("", version, "ok" if compiler or built else "warn", reason, compiler=compiler,
                   jit_cache=str(root), cached_builds=built)


def probe_llmcompressor() -> dict[str, Any]:
    """llmcompressor imports."""
    version = _require("llmcompressor")
    if version is None:
        return _result("", None, "missing", "not installed (AWQ / GPTQ / SmoothQuant recipes; took over AutoAWQ)")
    importlib.import_module("llmcompressor")
    return _result("", version, "ok", "imports")


def probe_optimum() -> dict[str, Any]:
    """optimum imports; its GPTQ path (needs gptqmodel) and whether optimum.onnxruntime exists."""
    version = _require("optimum")
    if version is None:
        return _result("", None, "missing", "not installed")
    importlib.import_module("optimum")
    try:
        importlib.import_module("optimum.gptq")
        gptq = "optimum.gptq imports"
    except Exception as e:  # optional part; report, do not fail the row
        gptq = f"optimum.gptq fails ({type(e).__name__})"
    ort = importlib.util.find_spec("optimum.onnxruntime") is not None
    return _result("", version, "ok", f"{gptq}; optimum.onnxruntime {'present' if ort else 'absent (optimum-onnx)'}",
                   onnxruntime_subpackage=ort)


PARENT_PROBES: tuple[tuple[str, Callable[[], dict[str, Any]]], ...] = (
    ("cuda", probe_cuda),
    ("torch.ao dynamic int8", probe_torch_ao_dynamic),
    ("aten int8pack (W8 CPU)", probe_int8pack),
    ("aten int4pack (W4 CPU)", probe_int4pack),
)
CHILD_PROBES: tuple[tuple[str, Callable[[], dict[str, Any]]], ...] = (  # cheap imports first
    ("onnx", probe_onnx),
    ("onnxruntime", probe_onnxruntime),
    ("onnxscript", probe_onnxscript),
    ("transformers", probe_transformers),
    ("torchao", probe_torchao),
    ("bitsandbytes", probe_bitsandbytes),
    ("gptqmodel", probe_gptqmodel),
    ("optimum", probe_optimum),
    ("llmcompressor", probe_llmcompressor),
)
CHILD_DISTS: dict[str, tuple[str, ...]] = {  # row name -> distributions that provide it
    "onnx": ("onnx",), "onnxruntime": ("onnxruntime", "onnxruntime-gpu"), "onnxscript": ("onnxscript",),
    "transformers": ("transformers",), "torchao": ("torchao",), "bitsandbytes": ("bitsandbytes",),
    "gptqmodel": ("gptqmodel",), "optimum": ("optimum",), "llmcompressor": ("llmcompressor",),
}


# --------------------------------------------------------------------------------------------- child process
def child_main(out_path: str) -> None:
    """Run CHILD_PROBES, appending one JSON line per result to ``out_path``; all output goes to stderr."""
    os.dup2(2, 1)  # banners printed by imported packages must not reach anyone's stdout (importing qlib set the offline env)
    with open(out_path, "a", encoding="utf-8") as f:
        for name, fn in CHILD_PROBES:
            f.write(json.dumps(jsonable(run_probe(name, fn, _require(*CHILD_DISTS[name])), digits=4)) + "\n")
            f.flush()


def _start_child(out_path: Path, err_path: Path) -> subprocess.Popen:
    """Start the child probe process."""
    root = str(Path(__file__).resolve().parents[2])
    code = (f"import sys; sys.path.insert(0, {root!r}); "
            f"from qlib.tools.doctor import child_main; child_main({str(out_path)!r})")
    with open(err_path, "w") as err:
        return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                cwd=root)


def _collect_child(proc: subprocess.Popen, out_path: Path, err_path: Path, deadline: float) -> list[dict[str, Any]]:
    """Wait for the child until ``deadline``; rows for probes it did not finish say why."""
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        timed_out = True
    rows = {}
    for line in out_path.read_text(encoding="utf-8").splitlines() if out_path.exists() else []:
        try:
            row = json.loads(line)
            rows[row["name"]] = row
        except (json.JSONDecodeError, KeyError):
            continue
    err_lines = err_path.read_text(errors="replace").strip().splitlines() if err_path.exists() else []
    tail = " | ".join(err_lines[-2:])[-240:]  # e.g. "Segmentation fault", or the last traceback line
    out = []
    for name, _ in CHILD_PROBES:
        if name in rows:
            out.append(rows[name])
            continue
        version = _require(*CHILD_DISTS[name])
        if timed_out:
            row = _result(name, version, "timeout", "probe process hit the deadline before this probe finished")
        else:
            row = _result(name, version, "fail", f"probe process exited with code {proc.returncode} before this "
                          f"probe finished: {tail}")
        row["seconds"] = None
        out.append(row)
    return out


# -------------------------------------------------------------------------------------------------- diagnose
def diagnose(timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Probe this machine's quantization backends; a broken backend becomes a row saying why, never an exception."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s} must be positive; pass the seconds the package probes may take.")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qlib-doctor-") as tmp:
        out_path, err_path = Path(tmp, "probes.jsonl"), Path(tmp, "stderr.txt")
        deadline = time.monotonic() + timeout_s
        try:
            proc = _start_child(out_path, err_path)
        except OSError as e:
            proc = None
            start_error = f"could not start the probe process: {e}"
        try:
            tinfo = _safe(torch_info, {"error": "torch_info failed"})
            nvinfo = _safe(nvidia_info, {"nvidia_smi": None})
            cpu = _safe(read_cpuinfo, {"model": None, "flags": {}})
            backends = [run_probe(name, fn, installed_version("torch")) for name, fn in PARENT_PROBES]
            if proc is not None:
                backends += _collect_child(proc, out_path, err_path, deadline)
            else:
                backends += [dict(_result(n, _require(*CHILD_DISTS[n]), "fail", start_error), seconds=None)
                             for n, _ in CHILD_PROBES]
        finally:  # e.g. Ctrl-C in a notebook: leave no probe process behind
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    versions = {d: installed_version(d) for d in PACKAGES}
    cuda_ok = bool(tinfo.get("cuda_available"))
    rules = _safe(lambda: evaluate_rules(versions, cuda_ok), [])
    unmet = _safe(unmet_requirements, [])
    findings = [_finding(r["level"], r["package"], f"{r['message']} [{r['condition']}]", r["source"])
                for r in rules if r["applies"]]
    findings += _safe(lambda: cuda_findings(tinfo, nvinfo), [])
    findings += [_finding("error", u["package"], f"declares {u['requires']} but {u['installed']} is installed",
                          "installed package metadata (Requires-Dist)") for u in unmet]
    return jsonable({
        "schema": SCHEMA, "python": {"version": platform.python_version(), "executable": sys.executable},
        "platform": {"system": platform.system(), "release": platform.release(), "machine": platform.machine()},
        "cpu": cpu, "torch": tinfo, "nvidia": nvinfo, "versions": versions, "backends": backends,
        "rules": rules, "unmet_requirements": unmet, "findings": findings,
        "wall_s": time.perf_counter() - t0,
    })


def _safe(fn: Callable[[], Any], fallback: Any) -> Any:
    """fn(), or ``fallback`` if it raises."""
    try:
        return fn()
    except Exception:  # the doctor must report, never crash
        return fallback


# ---------------------------------------------------------------------------------------------------- output
def _yes(b: Any) -> str:
    """'yes' / 'no'."""
    return "yes" if b else "no"


def format_report(diag: Mapping[str, Any]) -> str:
    """The human-readable report: system, one line per backend, known issues that apply."""
    t, cpu, nv = diag.get("torch", {}), diag.get("cpu", {}), diag.get("nvidia", {})
    th = t.get("threads", {})
    lines = [f"qlib.tools.doctor: quantization backends on this machine ({diag.get('wall_s', 0):.1f} s)", "",
             f"python  {diag['python']['version']}  ({diag['python']['executable']})",
             f"torch   {t.get('version')}  build {t.get('build')}  cpu capability {t.get('cpu_capability')}  "
             f"quantized engine {t.get('quantized_engine')}",
             f"threads torch {th.get('torch_intra_op')} intra-op / {th.get('torch_interop')} inter-op; "
             f"{th.get('affinity')} CPUs usable of {th.get('os_cpu_count')}",
             f"cpu     {cpu.get('model')}  " + " ".join(f"{k}={_yes(v)}" for k, v in cpu.get("flags", {}).items())]
    if t.get("cuda_available"):
        lines.append("cuda    " + "; ".join(f"{d['name']} (sm {d['capability']}, {d['memory_gib']} GiB)"
                                            for d in t.get("devices", [])))
    else:
        lines.append(f"cuda    not available (torch built for CUDA {t.get('cuda_built')})" if t.get("cuda_built")
                     else "cuda    not available: torch is a CPU build")
    lines.append(f"driver  {nv.get('driver_version')} (CUDA {nv.get('driver_cuda_version')})" if nv.get("nvidia_smi")
                 else "driver  nvidia-smi not found")
    rows = [(b["name"], str(b.get("version") or "-"), b["status"], b["reason"]) for b in diag.get("backends", [])]
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    lines += ["", f"{'backend':<{w0}}  {'version':<{w1}}  status   reason"]
    lines += [f"{n:<{w0}}  {v:<{w1}}  {s:<7}  {r}" for n, v, s, r in rows]
    findings = diag.get("findings", [])
    lines += ["", "Known issues that apply here" + ("" if findings else ": none")]
    lines += [f"  [{f['level']}] {f['topic']}: {f['message']}\n          source: {f['source']}" for f in findings]
    not_applicable = _not_applicable(diag)
    lines += ["", "Checked, not applicable:" + ("" if not_applicable else " none")]
    lines += [f"  {line}" for line in not_applicable]
    return "\n".join(lines)


def _not_applicable(diag: Mapping[str, Any]) -> list[str]:
    """One line per package whose known issues do not apply here, saying why."""
    by_pkg: dict[str, list[dict[str, Any]]] = {}
    for r in diag.get("rules", []):
        if not r["applies"]:
            by_pkg.setdefault(r["package"], []).append(r)
    out = []
    for pkg, rules in by_pkg.items():
        installed = rules[0]["installed"]
        if installed is None:
            out.append(f"{pkg}: not installed ({len(rules)} known issue{'s' * (len(rules) > 1)})")
        else:
            conditions = "; ".join(r["condition"].removeprefix(f"{pkg} installed, ") for r in rules)
            out.append(f"{pkg} {installed}: conditions not met: {conditions}")
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: print the report (or --json); exit 0 whatever the backends' state."""
    parser = argparse.ArgumentParser(prog="python -m qlib doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the diagnosis as JSON")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"seconds allowed for the package probes (default {DEFAULT_TIMEOUT_S:g})")
    args = parser.parse_args(argv)
    diag = diagnose(timeout_s=args.timeout)
    print(json.dumps(diag, indent=2, allow_nan=False) if args.json else format_report(diag))
    return 0


if __name__ == "__main__":
    sys.exit(main())
