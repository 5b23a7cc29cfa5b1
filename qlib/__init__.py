"""Quantization Lab: the shared code behind the notebooks.

The package is laid out by role; imports flow one way (a test checks it):

- ``qlib.quant``    what quantization *is*: primitives, configs, ``quantize_`` and its handler registry,
                    fake-quant modules, packed INT8/INT4 kernels, FP8. Depends on no other part of qlib.
- ``qlib.methods``  how models get quantized: the architecture table, calibration capture, GPTQ, AWQ, QAT,
                    mixed precision, CNN folding, recurrent models. Each method registers its own handler.
- ``qlib.lab``      the experiment harness: paths, fetch, data, the model zoo, evaluation, benchmark, results,
                    the notebook runner.
- ``qlib.analysis`` Pareto frontiers and the decision function, the cost model, the claims report.
- ``qlib.tools``    reference-library wrappers, library recipes, ONNX utilities, the environment doctor.

``import qlib`` is cheap: the names below load their module on first use, so ``qlib.quantize_`` works as in
torchao while ``python -m qlib fetch`` does not import torch.
"""
from __future__ import annotations

import importlib
import logging
import os
import warnings

__version__ = "0.1.0"

# The lab runs offline: no model hub, no dataset server. The one place these are set: importing qlib sets them
# (unless already set) in this process, and the notebook runner's kernels inherit them.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
for _k, _v in OFFLINE_ENV.items():
    os.environ.setdefault(_k, _v)


class _DropKnownNoise(logging.Filter):
    """Drops log records that are known to be harmless here; every other record of the logger passes."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


# Start-up messages that every notebook would otherwise open with, silenced once here (qlib is imported before the
# libraries that print them), each for a stated reason; nothing else from these loggers is hidden:
# - torchao ships CUDA-only extensions (_C_mxfp8, _C_cutlass_90a) that cannot load in a CPU build of torch, and logs
#   "Failed to load <path>" for each at import;
# - torchao registers its Enum config types with torch's pytree, which torch 2.13 supports natively and warns about;
# - tqdm.auto inside a Jupyter kernel without ipywidgets warns "IProgress not found" and uses text bars, as wanted.
logging.getLogger("torchao").addFilter(_DropKnownNoise("Failed to load", "_C_"))
logging.getLogger("torch.utils._pytree").addFilter(_DropKnownNoise("is an Enum subclass and is now natively supported"))
warnings.filterwarnings("ignore", message="IProgress not found")

_EXPORTS = {  # public name -> module that defines it
    "quantize_": "qlib.quant.api", "select_linears": "qlib.quant.api",
    "QuantConfig": "qlib.quant.config", "RTNConfig": "qlib.quant.config", "W8A8Config": "qlib.quant.config",
    "GPTQConfig": "qlib.methods.gptq", "AWQConfig": "qlib.methods.awq", "FP8Config": "qlib.quant.fp8",
    "QATConfig": "qlib.methods.qat", "CNNConfig": "qlib.methods.cnn", "prepare_qat": "qlib.methods.qat",
    "pack_model": "qlib.quant.kernels", "pack_quantized": "qlib.quant.kernels",
    "save_packed": "qlib.quant.kernels", "load_packed": "qlib.quant.kernels",
    "gptq_quantize_model": "qlib.methods.gptq", "awq_search": "qlib.methods.awq", "awq_apply": "qlib.methods.awq",
    "load_lm": "qlib.lab.models", "load_classifier": "qlib.lab.models", "load_encoder": "qlib.lab.models",
    "Run": "qlib.lab.results", "Claim": "qlib.lab.results",
}
_SUBPACKAGES = ("quant", "methods", "lab", "analysis", "tools")
__all__ = sorted(_EXPORTS) + list(_SUBPACKAGES)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f"qlib.{name}")
    raise AttributeError(f"module 'qlib' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
