"""The same quantization through each library, written as the few lines a user would write, and run side by side.

A recipe is a plain function ``recipe(ctx) -> model``: it loads the float model from ``ctx.model_dir`` with the
library's own entry point, quantizes the linears inside the decoder blocks (``lm_head`` and the embeddings stay in
float, as GPTQ / AWQ references do) and returns a PyTorch module, or the path of an ONNX file for ONNX Runtime.
:func:`lines_of_code` counts a recipe's body; :func:`run_recipe` times it, records every warning raised while it ran
and turns an exception into a row with the error (a recipe that cannot run on this machine is a finding, not a crash).

    ctx = Context(model_dir, tokenizer, calib, workdir)
    model, row = run_recipe(RECIPES["torchao int8 weight-only"], ctx)
    row["lines"], row["quantize_s"], row["error"], row["warnings"]

Recipes import their library inside the function, so a missing library fails that recipe only.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import subprocess
import sys
import textwrap
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from qlib.quant import kernels
from qlib.quant.modules import logits_of
from qlib.lab.bench import timed_rounds

# ----------------------------------------------------------------------------------------------------- context


@dataclasses.dataclass
class Context:
    """What every recipe gets: the float model folder, its tokenizer, calibration windows and a scratch folder.

    ``calib``: LongTensor windows [1, seq_len] (``qlib.methods.calib.calib_batches_from_text``), handed to every calibrated
    recipe unchanged. ``workdir``: a temporary folder for ONNX files (never under ``results/``).
    """

    model_dir: Path
    tokenizer: Any
    calib: list[Tensor]
    workdir: Path
    group_size: int = 64
    _onnx: Path | None = dataclasses.field(default=None, repr=False)
    export_s: float | None = None

    def load(self) -> nn.Module:
        """The float32 model, freshly loaded, in eval mode."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=torch.float32).eval()

    @property
    def blocks_prefix(self) -> str:
        """Dotted path of the decoder blocks plus a dot (``model.layers.`` for Llama)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from qlib.methods.arch import arch_of, blocks_path

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(self.model_dir)))
        return blocks_path(model, arch_of(model)) + "."

    def in_blocks(self, module: nn.Module, fqn: str) -> bool:
        """``filter_fn``: the nn.Linear layers inside the decoder blocks."""
        if not hasattr(self, "_prefix"):
            self._prefix = self.blocks_prefix
        return isinstance(module, nn.Linear) and fqn.startswith(self._prefix)

    def calib_rows(self) -> list[dict[str, Tensor]]:
        """The windows as tokenized rows ``{input_ids [1, L], attention_mask [1, L]}`` (GPTQModel / Optimum format)."""
        return [{"input_ids": w.clone(), "attention_mask": torch.ones_like(w)} for w in self.calib]

    def calib_loader(self) -> Any:
        """The windows as a DataLoader of rows, in order (llm-compressor's ``oneshot(dataset=...)``)."""
        from torch.utils.data import DataLoader

        return DataLoader(self.calib_rows(), batch_size=None, shuffle=False)

    def onnx_fp32(self) -> Path:
        """The FP32 model exported once to ONNX (dynamo exporter, logits only, dynamic batch and length); cached."""
        if self._onnx is None:
            start = time.perf_counter()
            self._onnx = export_fp32_onnx(self)
            self.export_s = time.perf_counter() - start
        return self._onnx

    def onnx_block_matmuls(self, path: str | Path) -> list[str]:
        """Names of the MatMul nodes of ``path`` whose weight is a constant: the block linears.

        The dynamo exporter stores each linear's weight as a constant [in, out]; the tied head is
        ``Transpose(embedding)``, not a constant, so it is left out, as are attention's activation x activation MatMuls.
        """
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        consts = {t.name for t in proto.graph.initializer}
        names = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in consts]
        if not names:
            raise ValueError(f"{path} has no MatMul with a constant weight; export it with qlib.tools.onnx_utils.export_onnx")
        return names


def export_fp32_onnx(ctx: Context) -> Path:
    """Export the float model to ONNX the recommended way (``torch.onnx.export(dynamo=True)``); the tied head stays tied."""
    from qlib.tools.onnx_utils import export_onnx

    model = ctx.load()
    ids = ctx.calib[0][:, :16]
    return export_onnx(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                       Path(ctx.workdir) / "fp32.onnx", dynamo=True, use_cache=False)


# ----------------------------------------------------------------------------------------------------- recipes
# Each body is what a user writes with the library's public API; lines_of_code counts it.


def torch_ao_dynamic_int8(ctx: Context) -> nn.Module:
    model = ctx.load()
    names = {n for n, m in model.named_modules() if ctx.in_blocks(m, n)}
    return torch.ao.quantization.quantize_dynamic(model, names, dtype=torch.qint8)


def torchao_int8_weight_only(ctx: Context) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = ctx.load()
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=ctx.in_blocks)
    return model


def torchao_int8_dynamic(ctx: Context) -> nn.Module:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model = ctx.load()
    quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=ctx.in_blocks)
    return model


def torchao_intx_w4(ctx: Context) -> nn.Module:
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerGroup, quantize_

    model = ctx.load()
    config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(ctx.group_size),
                                  mapping_type=MappingType.ASYMMETRIC)
    quantize_(model, config, filter_fn=ctx.in_blocks)
    return model


def torchao_int4_weight_only(ctx: Context) -> nn.Module:
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    model = ctx.load()
    quantize_(model, Int4WeightOnlyConfig(group_size=ctx.group_size), filter_fn=ctx.in_blocks)
    return model


def optimum_gptq(ctx: Context) -> nn.Module:
    from optimum.gptq import GPTQQuantizer

    model = ctx.load()
    quantizer = GPTQQuantizer(bits=4, group_size=ctx.group_size, sym=False, damp_percent=0.01, desc_act=False,
                              act_group_aware=False, dataset=ctx.calib_rows(), model_seqlen=ctx.calib[0].shape[1])
    return quantizer.quantize_model(model, ctx.tokenizer)


def llmcompressor_gptq(ctx: Context) -> nn.Module:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    model = ctx.load()
    weights = QuantizationArgs(num_bits=4, symmetric=False, strategy="group", group_size=ctx.group_size)
    gptq = GPTQModifier(config_groups={"w4": QuantizationScheme(targets=["Linear"], weights=weights)},
                        ignore=["lm_head"], dampening_frac=0.01, actorder=None)
    oneshot(model=model, dataset=ctx.calib_loader(), recipe=[gptq], pipeline="sequential")
    return model


def bnb_llm_int8(ctx: Context) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])
    return AutoModelForCausalLM.from_pretrained(str(ctx.model_dir), quantization_config=config, device_map="cpu")


def bnb_nf4(ctx: Context) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(str(ctx.model_dir), quantization_config=config, device_map="cpu")


def ort_dynamic_int8(ctx: Context) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = ctx.onnx_fp32(), Path(ctx.workdir) / "dynamic.int8.onnx"
    quantize_dynamic(src, dst, weight_type=QuantType.QInt8, nodes_to_quantize=ctx.onnx_block_matmuls(src))
    return dst


def ort_matmulnbits_w4(ctx: Context) -> Path:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    src, dst = ctx.onnx_fp32(), Path(ctx.workdir) / f"w4.b{ctx.group_size}.onnx"
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=ctx.group_size, is_symmetric=False)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst))
    return dst


def qlib_int4pack_w4(ctx: Context) -> nn.Module:
    from qlib.quant.kernels import pack_model

    model = ctx.load()
    return pack_model(model, bits=4, group_size=ctx.group_size, symmetric=False, filter_fn=ctx.in_blocks,
                      include_lm_head=False, progress=False)


def qlib_int8pack_w8(ctx: Context) -> nn.Module:
    from qlib.quant.kernels import pack_model

    model = ctx.load()
    return pack_model(model, bits=8, filter_fn=ctx.in_blocks, include_lm_head=False, progress=False)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One library's way to one scheme."""

    name: str
    library: str              # distribution whose version is reported
    scheme: str               # what is stored, in words
    fn: Callable[[Context], Any]
    calibrated: bool = False  # needs calibration data
    gpu: str = "no"           # does the library need a GPU for this (and for what)
    note: str = ""
    probe: str = ""           # the qlib.tools.doctor backend row that covers it

    @property
    def kind(self) -> str:
        """'onnx' for ONNX Runtime recipes (they return a file), else 'torch'."""
        return "onnx" if self.fn.__name__.startswith("ort_") else "torch"


RECIPE_LIST: tuple[Recipe, ...] = (
    Recipe("torch.ao dynamic INT8", "torch", "W8 per-tensor, activations INT8 per tensor at run time", torch_ao_dynamic_int8,
           note="deprecated; fbgemm/x86 kernels", probe="torch.ao dynamic int8"),
    Recipe("torchao INT8 weight-only", "torchao", "W8 per-channel sym, activations float", torchao_int8_weight_only, probe="torchao"),
    Recipe("torchao INT8 dynamic", "torchao", "W8 per-channel, activations INT8 per token at run time", torchao_int8_dynamic, probe="torchao"),
    Recipe("torchao Intx W4 g64", "torchao", "W4 asym g64 (codes stored one per int8)", torchao_intx_w4, probe="torchao"),
    Recipe("torchao Int4WeightOnly g64", "torchao", "W4 g64 packed (tinygemm / mslk layouts)", torchao_int4_weight_only,
           gpu="its packing formats target CUDA / XPU (see the format probe)", probe="torchao"),
    Recipe("Optimum + gptqmodel GPTQ W4 g64", "optimum", "GPTQ W4 asym g64, packed int32", optimum_gptq, calibrated=True,
           note="optimum.gptq.GPTQQuantizer runs gptqmodel's GPTQ and packing", probe="optimum"),
    Recipe("llm-compressor GPTQ W4 g64", "llmcompressor", "GPTQ W4 asym g64 (fake-quant in memory, packed on save)",
           llmcompressor_gptq, calibrated=True, probe="llmcompressor"),
    Recipe("bitsandbytes LLM.int8()", "bitsandbytes", "W8 per-row + FP16 outlier columns (threshold 6)", bnb_llm_int8, probe="bitsandbytes"),
    Recipe("bitsandbytes NF4", "bitsandbytes", "NF4 blocks of 64, float32 compute", bnb_nf4, probe="bitsandbytes"),
    Recipe("ORT dynamic INT8", "onnxruntime", "W8 per-tensor, activations UINT8 per tensor at run time", ort_dynamic_int8, probe="onnxruntime"),
    Recipe("ORT MatMulNBits W4 b64", "onnxruntime", "W4 asym blocks of 64, activations float", ort_matmulnbits_w4, probe="onnxruntime"),
    Recipe("qlib RTN W4 g64 (int4pack)", "torch", "W4 asym g64 on aten int4pack, bf16 activations", qlib_int4pack_w4, probe="aten int4pack (W4 CPU)"),
    Recipe("qlib W8 (int8pack)", "torch", "W8 per-channel sym on aten int8pack, bf16 activations", qlib_int8pack_w8, probe="aten int8pack (W8 CPU)"),
)
RECIPES: dict[str, Recipe] = {r.name: r for r in RECIPE_LIST}
EXTRA_LINES = {"onnx": export_fp32_onnx}  # ONNX recipes also need the export: its lines are added to theirs


# ----------------------------------------------------------------------------------------------------- counting


def lines_of_code(fn: Callable) -> int:
    """Non-blank, non-comment lines of ``fn``'s body, docstring and ``def`` line excluded (a statement over two
    physical lines counts two, as a reader sees it)."""
    source = textwrap.dedent(inspect.getsource(fn))
    tree = ast.parse(source)
    node = tree.body[0]
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise TypeError(f"{getattr(fn, '__name__', fn)!r} is not a function defined with def")
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    if not body:
        return 0
    lines = source.splitlines()[body[0].lineno - 1: node.end_lineno]
    return sum(1 for ln in lines if ln.strip() and not ln.strip().startswith("#"))


def recipe_lines(recipe: Recipe) -> int:
    """Lines of the recipe, plus the export's for ONNX recipes."""
    extra = EXTRA_LINES.get(recipe.kind)
    return lines_of_code(recipe.fn) + (lines_of_code(extra) if extra else 0)


# ----------------------------------------------------------------------------------------------------- running


def error_text(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, shortened."""
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    text = f"{type(exc).__name__}: {first}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def group_warnings(caught: Iterable[warnings.WarningMessage], limit: int = 200) -> list[dict]:
    """Warnings grouped by category and first line of the message, with counts and where first raised."""
    groups: dict[tuple[str, str], dict] = {}
    for w in caught:
        text = str(w.message).strip()
        line = text.splitlines()[0] if text else ""
        key = (w.category.__name__, line[:limit])
        if key not in groups:
            groups[key] = {"category": key[0], "message": key[1], "where": f"{w.filename.split('site-packages/')[-1]}:{w.lineno}",
                           "count": 0}
        groups[key]["count"] += 1
    return list(groups.values())


def run_recipe(recipe: Recipe, ctx: Context) -> tuple[Any, dict]:
    """Run one recipe: (its model or ONNX path, or None on failure; a row with lines, time, error, warnings)."""
    from qlib.tools.doctor import installed_version

    row: dict[str, Any] = {"recipe": recipe.name, "library": recipe.library, "version": installed_version(recipe.library),
                           "scheme": recipe.scheme, "kind": recipe.kind, "calibrated": recipe.calibrated,
                           "needs_gpu": recipe.gpu, "lines": recipe_lines(recipe), "ok": False, "error": ""}
    result = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        try:
            result = recipe.fn(ctx)
            row["ok"] = True
        except Exception as exc:  # noqa: BLE001 - a failing library is a row, not a crash
            row["error"] = error_text(exc)
        row["quantize_s"] = time.perf_counter() - start
    row["warnings"] = group_warnings(caught)
    return result, row


# ----------------------------------------------------------------------------------------------------- deprecations

MIGRATIONS: tuple[tuple[str, str, str], ...] = (  # (regex on the warning text, the migration path, its source)
    (r"torch\.ao\.quantization",
     "torchao: quantize_(model, Int8DynamicActivationInt8WeightConfig()) for dynamic INT8, Int8WeightOnlyConfig() for "
     "weight-only; PT2E moved to torchao.quantization.pt2e",
     "the DeprecationWarning's own text; pytorch/ao#2259 (torch.ao.quantization migration)"),
    (r"legacy TorchScript|dynamo=False|torch\.onnx\.export.*deprecated|TorchScript-based ONNX export",
     "torch.onnx.export(model, args, dynamo=True) (torch.export-based; needs onnxscript)",
     "the DeprecationWarning's own text; pytorch.org/docs/stable/onnx.html"),
    (r"TRANSFORMERS_CACHE|torch_dtype",
     "pass dtype= instead of torch_dtype= (transformers 5)", "transformers 5 release notes"),
    (r"torch\.jit\.script_method",
     "raised inside the library (bitsandbytes) at import: nothing for the user to change; the library must move to "
     "torch.compile / torch.export", "the DeprecationWarning's own text"),
)


def migration_for(message: str) -> tuple[str, str]:
    """(migration path, source) for a deprecation message, or ('', '') when none is known."""
    for pattern, path, source in MIGRATIONS:
        if re.search(pattern, message):
            return path, source
    return "", ""


def deprecations(rows: Sequence[dict], extra: Sequence[dict] = ()) -> list[dict]:
    """Deprecation / future warnings of all recipe rows (and ``extra`` groups tagged with a ``recipe``), merged by
    message, with the recipes that raised them and the known migration path."""
    merged: dict[tuple[str, str], dict] = {}
    items = [(r["recipe"], w) for r in rows for w in r.get("warnings", [])] + [(w["recipe"], w) for w in extra]
    for recipe, w in items:
        if w["category"] not in ("DeprecationWarning", "FutureWarning", "PendingDeprecationWarning") \
                and "deprecat" not in w["message"].lower():
            continue
        key = (w["category"], w["message"])
        if key not in merged:
            path, source = migration_for(w["message"])
            if not path:  # a second notice of the same call (e.g. the legacy exporter's): match on the caller
                path, source = migration_for(recipe)
            merged[key] = {"category": w["category"], "message": w["message"], "where": w["where"], "recipes": [],
                           "count": 0, "migration": path, "source": source}
        if recipe not in merged[key]["recipes"]:
            merged[key]["recipes"].append(recipe)
        merged[key]["count"] += w["count"]
    return list(merged.values())


# ----------------------------------------------------------------------------------------------------- torchao int4


def torchao_int4_formats(group_size: int = 64) -> list[dict]:
    """Try torchao's Int4WeightOnlyConfig with every Int4PackingFormat on a tiny CPU Linear: ok or the error."""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_
    from torchao.quantization.quantize_.workflows.int4.int4_packing_format import Int4PackingFormat

    rows = []
    for fmt in Int4PackingFormat:
        lin = nn.Sequential(nn.Linear(256, 128))
        x = torch.randn(2, 256)
        row = {"packing_format": fmt.value, "ok": False, "error": ""}
        try:
            quantize_(lin, Int4WeightOnlyConfig(group_size=group_size, int4_packing_format=fmt))
            with torch.no_grad():
                lin(x)
            row["ok"] = True
        except Exception as exc:  # noqa: BLE001
            row["error"] = error_text(exc, 200)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------- auto-gptq / autoawq


def pip_index_versions(dist: str, timeout: float = 60.0) -> dict:
    """``pip index versions DIST`` against the configured index: latest version and all versions, or the error."""
    cmd = [sys.executable, "-m", "pip", "index", "versions", dist, "--disable-pip-version-check"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"dist": dist, "ok": False, "error": error_text(exc)}
    m = re.search(r"Available versions:\s*(.+)", proc.stdout)
    if proc.returncode != 0 or not m:
        err = next((ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")), proc.stderr.strip()[-200:])
        return {"dist": dist, "ok": False, "error": err}
    versions = [v.strip() for v in m.group(1).split(",")]
    return {"dist": dist, "ok": True, "latest": versions[0], "n_versions": len(versions), "versions": versions}


def pip_download(spec: str, dest: Path, timeout: float = 180.0, binary: bool = True) -> dict:
    """``pip download --no-deps SPEC`` into ``dest`` (a temporary folder): the file, or the error."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest), spec]
    cmd += ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:", "--no-build-isolation"]
    before = set(Path(dest).iterdir()) if Path(dest).exists() else set()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"spec": spec, "ok": False, "error": error_text(exc)}
    new = sorted(set(Path(dest).iterdir()) - before)
    if proc.returncode != 0 or not new:
        err = next((ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")), proc.stderr.strip()[-200:])
        return {"spec": spec, "ok": False, "error": err}
    return {"spec": spec, "ok": True, "file": new[0].name, "bytes": new[0].stat().st_size, "path": str(new[0])}


def wheel_facts(path: str | Path, source_file: str, patterns: Sequence[str]) -> dict:
    """What a wheel holds: its compiled extensions, its Requires-Dist, and lines of ``source_file`` matching ``patterns``."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        requires = [ln.split(":", 1)[1].strip() for ln in z.read(meta).decode().splitlines() if ln.startswith("Requires-Dist:")]
        lines = z.read(source_file).decode(errors="replace").splitlines() if source_file in names else []
    hits = [f"{source_file}:{i}: {ln.strip()}" for i, ln in enumerate(lines, 1) if any(re.search(p, ln) for p in patterns)]
    return {"extensions": sorted(Path(n).name for n in names if n.endswith(".so") or n.endswith(".pyd")),
            "requires": [r for r in requires if "extra ==" not in r], "matches": hits}


def sdist_facts(path: str | Path, patterns: Sequence[str]) -> dict:
    """Lines of an sdist's README matching ``patterns`` (e.g. a deprecation notice) and its setup.py requirements."""
    import tarfile

    hits, requires = [], []
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            name = member.name.split("/", 1)[-1]
            if name in ("README.md", "setup.py"):
                text = tar.extractfile(member).read().decode(errors="replace")
                for i, ln in enumerate(text.splitlines(), 1):
                    if name == "README.md" and any(re.search(p, ln) for p in patterns):
                        hits.append(f"README.md:{i}: {ln.strip()}")
                    if name == "setup.py" and re.match(r'\s*"(torch|transformers|triton)[^"]*",?', ln):
                        requires.append(ln.strip().strip(",").strip('"'))
    return {"matches": hits, "requires": requires}


def import_in_child(module: str, path: str | Path | None = None, timeout: float = 120.0) -> dict:
    """Import ``module`` in a fresh Python (with ``path`` first on sys.path): ok, or the last line of the traceback."""
    code = f"import sys; sys.path.insert(0, {str(path)!r})\n" if path else ""
    code += f"import {module}"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"module": module, "ok": False, "error": f"import did not finish in {timeout:.0f} s"}
    tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return {"module": module, "ok": proc.returncode == 0, "error": "" if proc.returncode == 0 else (tail[-1] if tail else "")}


# ----------------------------------------------------------------------------------------------------- bytes, reload, speed


def dir_bytes(path: str | Path) -> int:
    """Total bytes of the files under ``path`` (a file: its size)."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _logits_of(model: nn.Module, ids: Tensor) -> Tensor:
    """FP32 logits of an HF causal LM on ``ids`` with a full attention mask."""
    with torch.inference_mode():
        return logits_of(model(input_ids=ids, attention_mask=torch.ones_like(ids))).float()


def drop_calibration_rows(model: nn.Module) -> str:
    """Optimum's GPTQ keeps the tokenized calibration rows (tensors) in ``config.quantization_config['dataset']``,
    which ``save_pretrained`` cannot write to JSON; drop them (they are not needed to load the model)."""
    qc = model.config.quantization_config
    if isinstance(qc, dict):
        qc["dataset"] = None
    else:
        qc.dataset = None
    return "config.quantization_config['dataset'] = None"


SAVE_FIXES: dict[str, Callable[[nn.Module], str]] = {"Optimum + gptqmodel GPTQ W4 g64": drop_calibration_rows}


def save_and_reload(model: nn.Module, probe_ids: Tensor, reload: bool = True,
                    fix: Callable[[nn.Module], str] | None = None) -> dict:
    """Serialize a quantized PyTorch model into a temporary folder and read it back; nothing is left on disk.

    ``save_pretrained`` first (the Hugging Face way); when it fails, its error is recorded and a model with qlib packed
    layers is written with ``qlib.quant.kernels.save_packed`` (reloaded with ``load_packed``), any other with
    ``torch.save(state_dict)``, so ``bytes`` is always the size of what could be saved. A saved folder is
    reloaded (``AutoModelForCausalLM.from_pretrained`` or ``load_packed``) and its logits on ``probe_ids`` [1, L]
    compared.
    ``fix(model) -> str`` (e.g. :func:`drop_calibration_rows`) is applied and the save retried when the first fails.
    """
    import tempfile

    from transformers import AutoModelForCausalLM

    out: dict[str, Any] = {"save_pretrained": "", "saved_with": "", "bytes": None, "reload": ""}
    with tempfile.TemporaryDirectory(prefix="qlib-save-") as tmp:
        folder = Path(tmp) / "hf"

        def save() -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.save_pretrained(str(folder))
        try:
            save()
            out["save_pretrained"], out["saved_with"] = "ok", "save_pretrained"
        except Exception as exc:  # noqa: BLE001
            out["save_pretrained"] = error_text(exc, 240)
            if fix is not None:
                try:
                    out["fix"] = fix(model)
                    save()
                    out["saved_with"] = f"save_pretrained after {out['fix']}"
                except Exception as exc2:  # noqa: BLE001
                    out["fix_error"] = error_text(exc2, 200)
        if out["saved_with"]:
            out["bytes"] = dir_bytes(folder)
        elif kernels.packed_layers(model):  # qlib's packed models have their own save/load
            kernels.save_packed(model, folder)
            out["saved_with"], out["bytes"] = "qlib.quant.kernels.save_packed", dir_bytes(folder)
        else:
            try:
                torch.save(model.state_dict(), Path(tmp) / "state_dict.pt")
                out["saved_with"], out["bytes"] = "torch.save(state_dict)", dir_bytes(Path(tmp) / "state_dict.pt")
            except Exception as exc2:  # noqa: BLE001
                out["saved_with"] = f"nothing: {error_text(exc2, 200)}"
            return out
        if not reload:
            return out
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                again = (kernels.load_packed(folder) if out["saved_with"] == "qlib.quant.kernels.save_packed" else
                         AutoModelForCausalLM.from_pretrained(str(folder), device_map="cpu").eval())
            a, b = _logits_of(model, probe_ids), _logits_of(again, probe_ids)
            out["reload_max_abs_logit_diff"] = float((a - b).abs().max())
            out["reload_same_argmax"] = float((a.argmax(-1) == b.argmax(-1)).float().mean())
            same = out["reload_max_abs_logit_diff"] <= 1e-3 * max(float(a.abs().max()), 1.0)
            out["reload"] = "ok" if same else (f"loads but computes something else (max |Δlogit| "
                                              f"{out['reload_max_abs_logit_diff']:.3g}, same argmax "
                                              f"{out['reload_same_argmax']:.0%})")
            del again
        except Exception as exc:  # noqa: BLE001
            out["reload"] = error_text(exc, 240)
    return out


def interleaved_median(fns: dict[str, Callable[[], Any]], rounds: int = 3, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each zero-argument callable, run in turn within each round (drift hits all alike)."""
    return timed_rounds(fns, rounds=rounds, reps=1, warmup=warmup)


def greedy_decode_fn(model: nn.Module, prompt: Tensor, new_tokens: int) -> Callable[[], Tensor]:
    """A zero-argument callable: greedy ``generate`` of exactly ``new_tokens`` tokens with the KV cache, batch 1."""
    mask = torch.ones_like(prompt)
    pad = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    pad = pad[0] if isinstance(pad, (list, tuple)) else (pad if pad is not None else 0)

    def decode() -> Tensor:
        with torch.inference_mode():
            return model.generate(prompt, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, use_cache=True, pad_token_id=pad)
    return decode
