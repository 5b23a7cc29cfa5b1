"""ONNX export and ONNX Runtime: export with either exporter, quantize with ``onnxruntime.quantization``, run and score.

    attempt = try_export(model, tokenizer(texts, return_tensors="pt"), "clf.onnx")   # dynamo exporter by default
    quantize_dynamic_int8("clf.onnx", "clf.int8.onnx")
    sess = ort_session("clf.int8.onnx", threads=2)
    preds = ort_classify(sess, tokenizer, texts)

Models are exported as *logits only* (an HF model's other outputs and its KV cache are left out), with batch and
sequence as dynamic axes. Quantized files are written next to the inputs the caller names; ``onnx_bytes`` counts a
model's external-data files too. Everything runs on the CPU execution provider.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import os
import re
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType
from torch import nn

from qlib.lab.eval import lm_windows, window_nll_sum
from qlib.quant.modules import logits_of

ARG_ORDER = ("input_ids", "attention_mask", "token_type_ids")  # positional order of the exported graph's inputs


# ----------------------------------------------------------------------------------------------------- export
class LogitsOnly(nn.Module):
    """An HF model seen as ``(input_ids[, attention_mask[, token_type_ids]]) -> logits``: what an ONNX graph exposes."""

    def __init__(self, model: nn.Module, **fixed: Any) -> None:
        super().__init__()
        self.model, self.fixed = model, fixed  # fixed: constant kwargs, e.g. use_cache=False for a causal LM

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        given = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return logits_of(self.model(**{k: v for k, v in given.items() if v is not None}, **self.fixed))


def _ordered_inputs(inputs: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    """The input names in ``ARG_ORDER``; they must be a prefix of it (positional export)."""
    names = tuple(k for k in ARG_ORDER if k in inputs)
    unknown = set(inputs) - set(ARG_ORDER)
    if unknown or names != ARG_ORDER[: len(names)] or not names:
        raise ValueError(f"inputs must be a prefix of {ARG_ORDER} (got {sorted(inputs)}); drop or add inputs to match.")
    return names


def export_onnx(model: nn.Module, inputs: Mapping[str, torch.Tensor], path: str | Path, *, dynamo: bool = True,
                opset: int | None = None, **fixed: Any) -> Path:
    """Export ``model``'s logits to ``path`` with batch and sequence dynamic; ``dynamo=False`` uses the legacy TorchScript exporter.

    ``fixed`` are constant keyword arguments of the model (``use_cache=False`` for a causal LM).
    """
    names = _ordered_inputs(inputs)
    args = tuple(inputs[k] for k in names)
    wrapper = LogitsOnly(model, **fixed).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if dynamo:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
        program = torch.onnx.export(wrapper, args, input_names=list(names), output_names=["logits"], opset_version=opset,
                                    dynamic_shapes={k: {0: batch, 1: seq} for k in names}, dynamo=True, verbose=False)
        program.save(str(path))
    else:
        torch.onnx.export(wrapper, args, str(path), input_names=list(names), output_names=["logits"],
                          dynamic_axes={k: {0: "batch", 1: "seq"} for k in names}, opset_version=opset, dynamo=False)
    return path


@dataclasses.dataclass
class ExportAttempt:
    """How one export went: ok or the error (shortened), wall time, the warnings raised (deduplicated with counts)."""

    exporter: str
    ok: bool
    seconds: float
    error: str = ""
    warnings: list[dict] = dataclasses.field(default_factory=list)
    path: str | None = None
    bytes: int | None = None
    opset: int | None = None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error_summary(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` of an export failure in one line; for the dynamo exporter, the root cause it summarises."""
    msg = _ANSI.sub("", str(exc))
    text = f"{type(exc).__name__}: " + next((ln.strip() for ln in msg.splitlines() if ln.strip()), "")
    if "## Exception summary" in msg:  # ConversionError: the cause is the first "<class ...>: ..." line of the summary
        causes = [ln.strip() for ln in msg.split("## Exception summary", 1)[1].splitlines() if ln.strip().startswith("<class")]
        if causes:
            m = re.match(r"<class '(?:[\w.]+\.)?(\w+)'>: (.*)", causes[0])
            text = f"{m.group(1)}: {m.group(2)}" if m else causes[0]
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _summarise_warnings(caught: Sequence[warnings.WarningMessage], limit: int = 160) -> list[dict]:
    """Warnings grouped by category and first line, with counts, in first-seen order."""
    groups: dict[tuple[str, str], dict] = {}
    for w in caught:
        line = str(w.message).strip().splitlines()[0] if str(w.message).strip() else ""
        key = (w.category.__name__, line[:limit])
        if key not in groups:
            where = w.filename.split("site-packages/")[-1]
            groups[key] = {"category": key[0], "message": key[1], "where": f"{where}:{w.lineno}", "count": 0}
        groups[key]["count"] += 1
    return list(groups.values())


@contextlib.contextmanager
def _quiet_fds() -> Iterator[None]:
    """Swallow output written to fds 1/2 and sys.stdout/stderr (the legacy exporter dumps whole graphs on failure)."""
    for s in (sys.stdout, sys.stderr):
        s.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                yield
        finally:
            for s in (sys.stdout, sys.stderr):
                s.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def try_export(model: nn.Module, inputs: Mapping[str, torch.Tensor], path: str | Path, *, dynamo: bool = True,
               opset: int | None = None, **fixed: Any) -> ExportAttempt:
    """:func:`export_onnx`, recording instead of raising: ok or the error, seconds, warnings, bytes and opset."""
    exporter = "dynamo" if dynamo else "legacy"
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with _quiet_fds():
                export_onnx(model, inputs, path, dynamo=dynamo, opset=opset, **fixed)
            error = ""
        except Exception as exc:  # an export failure is a finding, not a crash
            error = error_summary(exc)
    seconds = time.perf_counter() - start
    ok = not error and Path(path).exists()
    opset_used = None
    if ok:
        proto = onnx.load(str(path), load_external_data=False)
        opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return ExportAttempt(exporter, ok, seconds, error, _summarise_warnings(caught), str(path) if ok else None,
                         onnx_bytes(path) if ok else None, opset_used)


def onnx_bytes(path: str | Path) -> int:
    """Bytes of an ONNX model on disk: the .onnx file plus every external-data file it references."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; export or quantize the model first.")
    proto = onnx.load(str(path), load_external_data=False)
    locations = {entry.value for t in proto.graph.initializer for entry in t.external_data if entry.key == "location"}
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)


def initializer_bytes(path: str | Path) -> int:
    """Bytes of the graph's constant tensors (weights, scales, zero points) without the graph and its metadata."""
    proto = onnx.load(str(path))
    return sum(numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)


# ----------------------------------------------------------------------------------------------------- running
def ort_session(path: str | Path, threads: int | None = None, spin: bool = False) -> ort.InferenceSession:
    """A CPU InferenceSession with ``threads`` intra-op threads (default: torch's), one inter-op thread, all graph optimizations.

    ``spin=False`` stops idle worker threads from busy-waiting after each run: with several sessions and PyTorch in one
    process on a few cores, spinning threads steal the CPU from whatever is timed next.
    """
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_feed(session: ort.InferenceSession, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The arrays the session takes, by name, as int64 (tokenizer outputs: tensors or arrays); extra inputs are dropped."""
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise ValueError(f"the ONNX model needs inputs {missing} that were not given; pass the tokenizer's full output.")
    out = {}
    for n in names:
        v = inputs[n]
        v = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        out[n] = v.astype(np.int64, copy=False)
    return out


def ort_logits(session: ort.InferenceSession, inputs: Mapping[str, Any]) -> np.ndarray:
    """The model's logits for one batch of inputs."""
    return session.run(["logits"], ort_feed(session, inputs))[0]


def ort_classify(session: ort.InferenceSession, tokenizer: Any, texts: Sequence[str], batch_size: int = 32,
                 max_length: int = 128) -> np.ndarray:
    """Argmax predictions of an exported classifier, batched and padded as :func:`qlib.lab.eval.classify_texts` does."""
    if not texts:
        raise ValueError("texts is empty; pass at least one text to classify")
    preds = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True, max_length=max_length,
                        return_tensors="np")
        preds.append(ort_logits(session, enc).argmax(-1))
    return np.concatenate(preds).astype(np.int64)


def ort_perplexity(session: ort.InferenceSession, token_ids: torch.Tensor, window: int = 512,
                   max_windows: int | None = None) -> dict:
    """Perplexity of an exported causal LM with :func:`qlib.lab.eval.perplexity`'s protocol (non-overlapping windows, mean NLL)."""
    windows = lm_windows(token_ids, window, max_windows)
    wants_mask = "attention_mask" in [i.name for i in session.get_inputs()]
    nll_sum, n_scored = 0.0, 0
    for ids in windows:
        ids = ids.unsqueeze(0)
        feed = {"input_ids": ids, **({"attention_mask": torch.ones_like(ids)} if wants_mask else {})}
        logits = torch.from_numpy(ort_logits(session, feed))
        nll_sum += window_nll_sum(logits, ids).item()
        n_scored += ids.shape[1] - 1
    nll = nll_sum / n_scored
    return {"ppl": math.exp(nll), "nll": nll, "n_windows": len(windows), "n_tokens_scored": n_scored, "window": window}


# ----------------------------------------------------------------------------------------------------- quantization
@contextlib.contextmanager
def _quiet_quantizer_logs() -> Iterator[None]:
    """onnxruntime.quantization logs every node at INFO on the root logger; keep warnings that matter only."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime"),
               logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class TextCalibrationReader(CalibrationDataReader):
    """Calibration batches for ``quantize_static``: real sentences, tokenized as the model sees them, one batch at a time.

    ``batch_size=1`` (the default) keeps padding out of the activation ranges.
    """

    def __init__(self, tokenizer: Any, texts: Sequence[str], input_names: Sequence[str], batch_size: int = 1,
                 max_length: int = 128) -> None:
        if not texts:
            raise ValueError("no calibration texts; pass at least one sentence.")
        self.tokenizer, self.texts, self.input_names = tokenizer, list(texts), tuple(input_names)
        self.batch_size, self.max_length = batch_size, max_length
        self._next = 0

    def __len__(self) -> int:
        return math.ceil(len(self.texts) / self.batch_size)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.texts):
            return None
        chunk = self.texts[self._next : self._next + self.batch_size]
        self._next += self.batch_size
        enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="np")
        missing = [n for n in self.input_names if n not in enc]
        if missing:
            raise ValueError(f"the tokenizer gives no {missing}; the model's inputs are {list(self.input_names)}.")
        return {n: enc[n].astype(np.int64) for n in self.input_names}

    def rewind(self) -> None:
        self._next = 0


def input_names(path: str | Path) -> list[str]:
    """Graph input names of an ONNX model (initializers excluded)."""
    proto = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in inits]


def fold_transposed_initializers(model: onnx.ModelProto) -> int:
    """Replace ``Transpose(initializer)`` nodes by a transposed initializer; returns how many were folded.

    The dynamo exporter keeps a tied ``lm_head`` as ``Transpose(embed_tokens.weight)``, which weight-only quantizers
    skip (their weight must be a constant). Folding unties it: the file stores the embedding and the head apart.
    """
    inits = {t.name: t for t in model.graph.initializer}
    folded = 0
    for node in list(model.graph.node):
        if node.op_type == "Transpose" and node.input[0] in inits:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            w = numpy_helper.to_array(inits[node.input[0]])
            w = w.transpose(perm) if perm else w.T
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), node.output[0]))
            model.graph.node.remove(node)
            folded += 1
    return folded


def quantize_dynamic_int8(src: str | Path, dst: str | Path, op_types: Sequence[str] | None = None,
                          per_channel: bool = False) -> Path:
    """ONNX Runtime dynamic quantization: INT8 weights, activations quantized per tensor at run time (MatMul, Gather, …)."""
    from onnxruntime.quantization import quantize_dynamic

    model = onnx.load(str(src))
    fold_transposed_initializers(model)
    with _quiet_quantizer_logs():
        quantize_dynamic(model, str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                         op_types_to_quantize=list(op_types) if op_types else None)
    return Path(dst)


def quantize_static_qdq(src: str | Path, dst: str | Path, reader: CalibrationDataReader, *, per_channel: bool = True,
                        activation_type: QuantType = QuantType.QUInt8, weight_type: QuantType = QuantType.QInt8,
                        op_types: Sequence[str] | None = None, reduce_range: bool = False) -> Path:
    """ONNX Runtime static quantization in QDQ format, activation ranges calibrated (min-max) on ``reader``'s batches.

    ``reduce_range=True`` stores 7-bit weights (within [-64, 64]). The default U8S8 (uint8 activations, int8
    weights) runs on x86 CPUs without VNNI through ``VPMADDUBSW``, whose 16-bit pairwise sums saturate
    (255 * 127 * 2 > 32767); ORT's documentation names reduce_range (or U8U8 / S8S8) as the remedy when an
    accuracy drop comes from it.

    The model is pre-processed first (ORT's ``quant_pre_process``) without symbolic shape inference, which fails on
    graphs from the dynamo exporter ("Incomplete symbolic shape inference").
    """
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp, _quiet_quantizer_logs():
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=activation_type, weight_type=weight_type, reduce_range=reduce_range,
                        op_types_to_quantize=list(op_types) if op_types else None)
    return Path(dst)


def quantize_int4(src: str | Path, dst: str | Path, *, block_size: int = 128, symmetric: bool = False,
                  accuracy_level: int | None = None, op_types: Sequence[str] = ("MatMul",)) -> Path:
    """4-bit blockwise weight-only quantization (round to nearest) into ``MatMulNBits`` nodes; activations stay FP32.

    ``accuracy_level=4`` lets the kernel quantize activations to INT8 for the dot products (faster, less exact).
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    fold_transposed_initializers(model)
    with _quiet_quantizer_logs():
        q = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=symmetric,
                                 accuracy_level=accuracy_level, op_types_to_quantize=tuple(op_types))
        q.process()
        q.model.save_model_to_file(str(dst), use_external_data_format=False)
    return Path(dst)


def op_counts(path: str | Path) -> dict[str, int]:
    """How many nodes of each op type the graph has (e.g. to see MatMulNBits or QuantizeLinear appear)."""
    proto = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# ----------------------------------------------------------------------------------------------------- rotary
def complex_rope_unsupported(model: nn.Module) -> str | None:
    """Why :func:`complex_rope` cannot run on ``model`` (one sentence), or None when it can."""
    module = sys.modules[type(model).__module__]
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
    if rotary is None or not hasattr(module, "apply_rotary_pos_emb") or not hasattr(rotary, "inv_freq"):
        return (f"{type(model).__name__} has no rotary position embedding of the Llama kind (rotary_emb with inv_freq "
                "and apply_rotary_pos_emb), so the complex-number rotary cannot be swapped in")
    return None


@contextlib.contextmanager
def complex_rope(model: nn.Module, broadcast_first: bool = False) -> Iterator[None]:
    """Run an HF Llama-family model with rotary embeddings written in complex numbers, as Meta's reference Llama does.

    ``torch.polar`` builds the rotations, ``view_as_complex`` pairs the features and one complex product rotates them:
    the same function as HF's ``cos``/``sin`` + ``rotate_half`` (pairs are (i, i + d/2), HF's layout, so weights stay
    as they are). ``broadcast_first`` unsqueezes the real angles before ``polar`` instead of unsqueezing the complex
    rotations (the reference code's order).
    """
    module = sys.modules[type(model).__module__]
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
    reason = complex_rope_unsupported(model)
    if reason:
        raise TypeError(f"{reason}; pass a Llama-family HF model.")

    def angles(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self.inv_freq[None, :, None].expand(position_ids.shape[0], -1, 1).float()
        freqs = (inv @ position_ids[:, None, :].float()).transpose(1, 2)  # [batch, seq, head_dim / 2]
        return freqs, freqs  # the attention layer unpacks (cos, sin); both slots carry the angles

    def apply(q: torch.Tensor, k: torch.Tensor, freqs: torch.Tensor, _: torch.Tensor, unsqueeze_dim: int = 1):
        if broadcast_first:
            freqs = freqs.unsqueeze(unsqueeze_dim)
            rot = torch.polar(torch.ones_like(freqs), freqs)
        else:
            rot = torch.polar(torch.ones_like(freqs), freqs).unsqueeze(unsqueeze_dim)

        def rotate(x: torch.Tensor) -> torch.Tensor:
            h = x.shape[-1] // 2
            xc = torch.view_as_complex(torch.stack((x[..., :h], x[..., h:]), dim=-1).float().contiguous())
            out = torch.view_as_real(xc * rot)
            return torch.cat((out[..., 0], out[..., 1]), dim=-1).type_as(x)

        return rotate(q), rotate(k)

    original = module.apply_rotary_pos_emb
    module.apply_rotary_pos_emb = apply
    rotary.forward = types.MethodType(angles, rotary)
    try:
        yield
    finally:
        module.apply_rotary_pos_emb = original
        del rotary.forward  # back to the class's forward
