"""Recurrent models under quantization: an ECG anomaly detector (bi-LSTM, and an MLP control), textgenrnn's char-LSTM.

* **Detector.** Masked-centre reconstruction on aeon's ECG series (``qlib.lab.data.ecg_anomaly``): a window of
  ``WINDOW`` points goes in with its centre ``MASK`` points blanked (value 0, a mask flag 1); the model
  reconstructs them from both sides. A point's anomaly score is its squared reconstruction error, averaged over the
  windows that blank it, then smoothed over ``SMOOTH`` points (about one heartbeat). The model is fitted on the first
  ``FIT_POINTS`` points of the clean train series; the threshold is the largest score on the rest of it (held out,
  clean): the lowest threshold that raises no alarm on normal data. F1 is point-wise on the test series' labels.
  ``ECGBiLSTM`` is the article's model family; ``ECGMLP`` (same inputs and outputs, no recurrence) is the
  feed-forward control for "recurrent networks quantize worse". Both are trained once and cached (``qlib.lab.models``'
  cache pattern: ``data/cache/models/<key>/`` with safetensors and a meta.json holding the recipe).
* **Quantization.** ``dynamic_int8`` (torch.ao dynamic INT8 of every ``nn.LSTM`` and ``nn.Linear``, also for a bare
  root LSTM, which ``quantize_dynamic`` silently leaves as it is), ``fake_quant_weights`` (qlib RTN on the LSTM and
  Linear weights, any bits), ONNX export with the legacy exporter (one ``LSTM`` node) for ONNX Runtime.
* **Compounding.** ``hidden_state_error`` runs a reference and a quantized LSTM side by side and returns, per time
  step, the accumulated error of the quantized run and the error one quantized step adds from the exact state.
* **textgenrnn.** ``load_char_lstm`` converts the Keras CuDNNLSTM weights of ``textgenrnn==2.0.0`` (fetched by
  ``qlib.lab.fetch``) into ``nn.LSTM``; ``keras_lstm_numpy`` is the Keras cell in numpy (after Keras' own CuDNN ->
  LSTM weight conversion), the reference the conversion is tested against.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from qlib.lab import data, fetch
from qlib.lab.bench import timed_rounds  # noqa: F401  (notebook 08 times through lstm.timed_rounds)
from qlib.lab.eval import f1
from qlib.quant.primitives import rtn

WINDOW, MASK, SMOOTH = 64, 16, 20  # window length, blanked centre, score smoothing (one beat is ~20 points)
THRESHOLD_NUDGE = (0.9, 1.1)  # F1 is also read at the threshold x 0.9 and x 1.1: how much F1 moves with threshold luck
FIT_POINTS = 8000  # the detector is fitted on train[:8000]; train[8000:] (clean, held out) sets the threshold
CONTEXT = 40  # textgenrnn's context length (characters)
META_TOKEN = "<s>"  # textgenrnn marks the start and end of every text with it
Predict = Callable[[np.ndarray], np.ndarray]  # [B, WINDOW, 2] float32 -> [B, WINDOW] reconstruction

# training recipes (full: the notebook's model; smoke: a few seconds)
DETECTOR_RECIPES: dict[bool, dict[str, Any]] = {
    False: dict(hidden=32, layers=2, epochs=6, batch_size=64, lr=3e-3, stride=1, seed=0, threads=1),
    True: dict(hidden=16, layers=1, epochs=2, batch_size=64, lr=5e-3, stride=4, seed=0, threads=1),
}
MLP_RECIPES: dict[bool, dict[str, Any]] = {
    False: dict(hidden=256, epochs=6, batch_size=64, lr=2e-3, stride=1, seed=0, threads=1),
    True: dict(hidden=64, epochs=2, batch_size=64, lr=3e-3, stride=4, seed=0, threads=1),
}


# --------------------------------------------------------------------------------------------------
# detector models


class ECGBiLSTM(nn.Module):
    """Bidirectional LSTM reconstructing a window: [B, W, 2] (value, mask flag) -> [B, W]."""

    def __init__(self, hidden: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.lstm = nn.LSTM(2, hidden, layers, batch_first=True, bidirectional=True)  # a child, so quantize_dynamic sees it
        self.head = nn.Linear(2 * hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(x)
        return self.head(y).squeeze(-1)


class ECGMLP(nn.Module):
    """Feed-forward control with the same task: the flattened window -> the reconstructed window."""

    def __init__(self, hidden: int = 256, window: int = WINDOW) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(2 * window, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, window))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def ecg_series() -> dict[str, np.ndarray]:
    """The ECG series normalised with the fit part's mean and std: ``fit``, ``val`` (clean), ``test``, ``labels``."""
    d = data.ecg_anomaly()
    fit, val = d["train"][:FIT_POINTS], d["train"][FIT_POINTS:]
    mean, std = fit.mean(), fit.std()
    norm = lambda s: ((s - mean) / std).astype(np.float32)  # noqa: E731
    return {"fit": norm(fit), "val": norm(val), "test": norm(d["test"]), "labels": d["labels"].astype(np.int64)}


def masked_windows(series: np.ndarray, starts: Sequence[int] | np.ndarray) -> np.ndarray:
    """Windows ``series[s:s+WINDOW]`` as [N, WINDOW, 2]: the value (0 in the blanked centre) and the mask flag."""
    starts = np.asarray(starts)
    idx = starts[:, None] + np.arange(WINDOW)[None, :]
    x = np.zeros((len(starts), WINDOW, 2), dtype=np.float32)
    x[..., 0] = series[idx]
    lo = (WINDOW - MASK) // 2
    x[:, lo:lo + MASK, 0] = 0.0
    x[:, lo:lo + MASK, 1] = 1.0
    return x


def _masked_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    lo = (WINDOW - MASK) // 2
    return F.mse_loss(pred[:, lo:lo + MASK], target[:, lo:lo + MASK])


def _train_detector(kind: str, tmp: Path, smoke: bool, progress: bool) -> dict:
    """Fit one detector on the fit part of the clean train series, save safetensors to ``tmp``; return its meta."""
    from qlib.lab.bench import num_threads
    from qlib.lab.models import train_steps

    r = (DETECTOR_RECIPES if kind == "bilstm" else MLP_RECIPES)[smoke]
    s = ecg_series()
    fit = torch.from_numpy(s["fit"])
    starts = np.arange(0, len(s["fit"]) - WINDOW + 1, r["stride"])
    x_all = torch.from_numpy(masked_windows(s["fit"], starts))
    y_all = fit[torch.from_numpy(starts)[:, None] + torch.arange(WINDOW)[None, :]]
    gen = torch.Generator().manual_seed(r["seed"])
    batches = [b for _ in range(r["epochs"])
               for b in torch.randperm(len(starts), generator=gen).split(r["batch_size"])]
    torch.manual_seed(r["seed"])
    model = _new_detector(kind, r)
    opt = torch.optim.Adam(model.parameters(), lr=r["lr"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=len(batches), pct_start=0.2)
    with num_threads(r["threads"]):
        seconds = train_steps(model, lambda b: _masked_mse(model(x_all[b]), y_all[b]), batches, opt, sched,
                       f"train ecg-{kind}", progress)
    model.eval()
    val = detector_scores(torch_predict(model), s["val"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    return {"key": f"ecg-{kind}" + ("-smoke" if smoke else ""), "kind": kind, "smoke": smoke,
            "params": sum(p.numel() for p in model.parameters()), "n_windows": len(starts),
            "train_seconds": round(seconds, 1), "val_max_score": float(val.max()),
            "task": f"reconstruct the blanked centre ({MASK} of {WINDOW} points) of windows of train[:{FIT_POINTS}]"}


def _new_detector(kind: str, r: dict) -> nn.Module:
    if kind == "bilstm":
        return ECGBiLSTM(r["hidden"], r["layers"])
    if kind == "mlp":
        return ECGMLP(r["hidden"])
    raise ValueError(f"unknown detector kind {kind!r}; use 'bilstm' or 'mlp'.")


def load_detector(kind: str = "bilstm", smoke: bool = False, progress: bool = True) -> nn.Module:
    """The ECG detector (``"bilstm"`` or the ``"mlp"`` control), trained once and cached under data/cache/models."""
    from qlib.lab.models import cached_build

    r = (DETECTOR_RECIPES if kind == "bilstm" else MLP_RECIPES)[smoke]
    key = f"ecg-{kind}" + ("-smoke" if smoke else "")
    path = cached_build(key, lambda tmp: _train_detector(kind, tmp, smoke, progress), recipe=r)
    model = _new_detector(kind, r)
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return model.eval()


def detector_meta(kind: str = "bilstm", smoke: bool = False) -> dict:
    """The cached detector's meta.json (recipe, training seconds, parameters)."""
    from qlib.lab.models import cache_entry

    return json.loads((cache_entry(f"ecg-{kind}" + ("-smoke" if smoke else "")) / "meta.json").read_text())


# --------------------------------------------------------------------------------------------------
# scoring


def torch_predict(model: nn.Module) -> Predict:
    """A PyTorch model as a :data:`Predict` function (inference mode, float32 numpy in and out)."""
    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).float().numpy()
    return predict


def ort_predict(session: Any) -> Predict:
    """An ONNX Runtime session of an exported detector as a :data:`Predict` function."""
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def detector_scores(predict: Predict, series: np.ndarray, stride: int = MASK // 2, batch_size: int = 256,
                    smooth: int = SMOOTH) -> np.ndarray:
    """Per-point anomaly score: squared error of the reconstructed blanked centre, averaged over the windows that
    blank the point (``MASK / stride`` of them), then a centred moving average over ``smooth`` points.

    Windows stay inside the series (no padding: a reflected ECG is not an ECG and scores as an anomaly), so the
    few points near the ends that no window blanks take the score of the nearest point that one does."""
    if MASK % stride:
        raise ValueError(f"stride {stride} must divide the blanked centre ({MASK}) so every point is scored equally.")
    lo, n = (WINDOW - MASK) // 2, len(series)
    if n < WINDOW:
        raise ValueError(f"the series has {n} points; scoring needs at least one window of {WINDOW}.")
    series = np.asarray(series, dtype=np.float32)
    starts = np.arange(0, n - WINDOW + 1, stride)
    err_sum, count = np.zeros(n), np.zeros(n)
    for b in range(0, len(starts), batch_size):
        st = starts[b:b + batch_size]
        pred = predict(masked_windows(series, st))[:, lo:lo + MASK]
        idx = st[:, None] + lo + np.arange(MASK)[None, :]
        np.add.at(err_sum, idx.ravel(), ((pred - series[idx]) ** 2).ravel())
        np.add.at(count, idx.ravel(), 1)
    covered = np.flatnonzero(count)
    score = np.interp(np.arange(n), covered, err_sum[covered] / count[covered])  # ends: nearest covered value
    if smooth > 1:
        score = np.convolve(np.pad(score, (smooth // 2, smooth - 1 - smooth // 2), mode="edge"),
                            np.ones(smooth) / smooth, mode="valid")
    return score


def detector_f1(predict: Predict, series: dict[str, np.ndarray], threshold: float | None = None) -> dict:
    """F1 (point-wise) on the test series with the threshold set on the clean held-out series (or the one given)."""
    val = detector_scores(predict, series["val"])
    own = float(val.max())
    thr = own if threshold is None else threshold
    test = detector_scores(predict, series["test"])
    pred = (test > thr).astype(np.int64)
    labels = series["labels"]
    tp = int(((pred == 1) & (labels == 1)).sum())
    spread = max(abs(f1((test > thr * k).astype(np.int64), labels) - f1(pred, labels)) for k in THRESHOLD_NUDGE)
    return {"f1": f1(pred, labels), "threshold": thr, "own_threshold": own, "precision": tp / max(int(pred.sum()), 1),
            "recall": tp / max(int(labels.sum()), 1), "alarms": int(pred.sum()), "val_max": own,
            "ap": average_precision(test, labels), "f1_threshold_spread": spread, "test_scores": test}


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision (area under the precision-recall curve, step-wise): threshold-free quality of the scores."""
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(labels, scores))


# --------------------------------------------------------------------------------------------------
# quantization


class _Parent(nn.Module):
    """Holds a bare module as a child: ``quantize_dynamic`` never swaps the root module it is given."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner


def dynamic_int8(model: nn.Module) -> nn.Module:
    """torch.ao dynamic INT8 copy of ``model`` (every ``nn.LSTM`` and ``nn.Linear``; a bare root LSTM is wrapped first)."""
    from qlib.quant.kernels import torch_dynamic_int8

    if isinstance(model, (nn.LSTM, nn.Linear)):
        return torch_dynamic_int8(_Parent(model)).inner
    return torch_dynamic_int8(model)


def fake_quant_weights(model: nn.Module, bits: int, granularity: str | int | None = "channel", symmetric: bool = True,
                       linear: bool = True) -> nn.Module:
    """A copy of ``model`` with the LSTM weight matrices (and, if ``linear``, Linear weights) RTN quant-dequantized.

    Per channel is one scale per row: per gate unit of ``weight_ih``/``weight_hh`` ([4H, in]); biases stay FP32.
    """
    out = copy.deepcopy(model)
    with torch.no_grad():
        for mod in out.modules():
            if isinstance(mod, nn.LSTM):
                names = [n for n, _ in mod.named_parameters() if n.startswith("weight_")]
            elif isinstance(mod, nn.Linear) and linear:
                names = ["weight"]
            else:
                continue
            for n in names:
                w = getattr(mod, n)
                w.copy_(rtn(w, bits, symmetric, granularity, pad=True))
    return out


def quantized_modules(model: nn.Module) -> dict[str, str]:
    """``{name: type}`` of the modules torch.ao replaced (their types live under ``torch.ao.nn.quantized``)."""
    return {n: f"{type(m).__module__}.{type(m).__name__}" for n, m in model.named_modules()
            if "quantized" in type(m).__module__}


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Legacy (TorchScript) export of a [B, T, F] -> [B, T] model with a dynamic batch; an ``nn.LSTM`` becomes one ``LSTM`` node."""
    import warnings

    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter announces its deprecation and warns about batch_first LSTMs
        torch.onnx.export(model.eval(), (example,), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False)
    return path


# --------------------------------------------------------------------------------------------------
# compounding


def forward_direction(lstm: nn.LSTM) -> nn.LSTM:
    """The first layer's forward direction of a (bi)LSTM as a standalone one-layer, unidirectional ``nn.LSTM``."""
    uni = nn.LSTM(lstm.input_size, lstm.hidden_size, 1, batch_first=lstm.batch_first, bias=lstm.bias)
    with torch.no_grad():
        for n, p in uni.named_parameters():
            p.copy_(getattr(lstm, n))  # weight_ih_l0 etc.: layer 0, forward direction
    return uni.eval()


def hidden_state_error(ref: nn.Module, test: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Per time step of ``x`` [1, T, F] (batch_first, unidirectional LSTM-like modules taking ``(x, (h, c))``):

    * ``accumulated``: ||h_test(t) - h_ref(t)||, both run from zero state over the whole sequence;
    * ``local``: ||step_test(x_t, state_ref(t-1)) - h_ref(t)||: the error one quantized step adds to the exact state;
    * ``ref_norm``: ||h_ref(t)||.
    A recurrence that compounds errors makes ``accumulated / local`` grow with t; a contracting one keeps it bounded.
    """
    if x.dim() != 3 or x.shape[0] != 1:
        raise ValueError(f"x must be [1, T, features] (got {tuple(x.shape)}); run one sequence at a time.")
    acc, loc, norm = [], [], []
    state_ref = state_test = None
    with torch.inference_mode():
        for t in range(x.shape[1]):
            xt = x[:, t:t + 1]
            h_ref, new_ref = ref(xt, state_ref)
            h_loc, _ = test(xt, state_ref)
            h_acc, state_test = test(xt, state_test)
            acc.append(float((h_acc - h_ref).norm()))
            loc.append(float((h_loc - h_ref).norm()))
            norm.append(float(h_ref.norm()))
            state_ref = new_ref
    return {"accumulated": np.array(acc), "local": np.array(loc), "ref_norm": np.array(norm)}


def loglog_slope(err: np.ndarray, start: int = 10) -> float:
    """Least-squares slope of log(error) against log(t) for t >= ``start`` (t counted from 1): 0 = bounded,
    0.5 = random-walk growth, 1 = linear growth."""
    t = np.arange(1, len(err) + 1)[start - 1:]
    e = np.maximum(err[start - 1:], 1e-30)
    return float(np.polyfit(np.log(t), np.log(e), 1)[0])


# --------------------------------------------------------------------------------------------------
# textgenrnn's char-LSTM


def keras_cudnn_to_lstm(kernel: np.ndarray, recurrent: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, ...]:
    """Keras' own conversion of CuDNNLSTM weights for its ``LSTM`` layer (keras.engine.saving, Keras 2.1-2.3):
    per gate, the input kernel is re-read from cuDNN's layout, the recurrent kernel transposed, the two biases summed."""
    gates = 4
    kernels = np.hstack([k.T.reshape(k.shape, order="F") for k in np.hsplit(kernel, gates)])
    recurrents = np.hstack([k.T for k in np.hsplit(recurrent, gates)])
    return kernels, recurrents, np.sum(np.split(bias, 2), axis=0)


def keras_lstm_numpy(x: np.ndarray, kernel: np.ndarray, recurrent: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Keras' LSTM cell (gates i, f, c, o; sigmoid recurrent activation, as CuDNN) over x [B, T, in] -> h [B, T, H],
    on Keras-layout weights (kernel [in, 4H], recurrent [H, 4H], bias [4H])."""
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    hdim = recurrent.shape[0]
    h = np.zeros((x.shape[0], hdim))
    c = np.zeros((x.shape[0], hdim))
    out = []
    for t in range(x.shape[1]):
        z = x[:, t] @ kernel + h @ recurrent + bias
        i, f, g, o = (z[:, k * hdim:(k + 1) * hdim] for k in range(4))
        c = sig(f) * c + sig(i) * np.tanh(g)
        h = sig(o) * np.tanh(c)
        out.append(h)
    return np.stack(out, axis=1)


def cudnn_to_torch(kernel: np.ndarray, recurrent: np.ndarray, bias: np.ndarray) -> dict[str, torch.Tensor]:
    """Keras CuDNNLSTM weights -> ``nn.LSTM`` layer-0 parameters. Gate order i, f, c, o is PyTorch's i, f, g, o.

    cuDNN reads each gate's stored [in, H] block as a row-major [H, in] matrix: that is PyTorch's ``weight_ih``
    block as it is (a reshape, not a transpose); the stored recurrent block is already [H_out, H_in]."""
    hdim = recurrent.shape[0]
    w_ih = np.concatenate([np.ascontiguousarray(k).reshape(hdim, -1) for k in np.hsplit(kernel, 4)])
    w_hh = np.concatenate(np.hsplit(recurrent, 4))
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    return {"weight_ih_l0": as_t(w_ih), "weight_hh_l0": as_t(w_hh), "bias_ih_l0": as_t(bias[:4 * hdim]),
            "bias_hh_l0": as_t(bias[4 * hdim:])}


class CharLSTM(nn.Module):
    """textgenrnn: embedding -> LSTM -> LSTM; attention-weighted average over [embedding, h1, h2]; next-char logits."""

    def __init__(self, n_classes: int = 465, dim: int = 100, hidden: int = 128) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_classes, dim)
        self.rnn1 = nn.LSTM(dim, hidden, batch_first=True)
        self.rnn2 = nn.LSTM(hidden, hidden, batch_first=True)
        self.attention = nn.Parameter(torch.zeros(dim + 2 * hidden))
        self.output = nn.Linear(dim + 2 * hidden, n_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.embedding(ids)
        h1, _ = self.rnn1(e)
        h2, _ = self.rnn2(h1)
        seq = torch.cat([e, h1, h2], dim=-1)
        weights = torch.softmax(seq @ self.attention, dim=1)  # Keras: exp(l - max) / (sum + 1e-7), the same to ~1e-7
        return self.output((seq * weights.unsqueeze(-1)).sum(1))


def textgenrnn_weights() -> dict[str, np.ndarray]:
    """The raw arrays of textgenrnn's HDF5 file by layer/name (``rnn_1/kernel``, ``embedding/embeddings``, ...)."""
    import h5py

    out = {}
    with h5py.File(fetch.ensure("textgenrnn") / "textgenrnn_weights.hdf5", "r") as f:
        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                layer, leaf = name.split("/")[0], name.split("/")[-1].removesuffix(":0")
                out[f"{layer}/{leaf.removeprefix(layer + '_')}"] = obj[()]
        f.visititems(visit)
    return out


def load_char_lstm() -> tuple[CharLSTM, dict[str, int]]:
    """textgenrnn's pretrained char-LSTM as a PyTorch ``CharLSTM`` (eval, fp32) and its vocabulary {char: id}."""
    w = textgenrnn_weights()
    vocab = json.loads((fetch.ensure("textgenrnn") / "textgenrnn_vocab.json").read_text(encoding="utf-8"))
    n_classes, dim = w["embedding/embeddings"].shape
    model = CharLSTM(n_classes, dim, w["rnn_1/recurrent_kernel"].shape[0])
    with torch.no_grad():
        model.embedding.weight.copy_(torch.from_numpy(w["embedding/embeddings"]))
        for name in ("rnn1", "rnn2"):
            keras = name.replace("rnn", "rnn_")
            params = cudnn_to_torch(w[f"{keras}/kernel"], w[f"{keras}/recurrent_kernel"], w[f"{keras}/bias"])
            getattr(model, name).load_state_dict(params)
        model.attention.copy_(torch.from_numpy(w["attention/W"][:, 0]))
        model.output.weight.copy_(torch.from_numpy(w["output/kernel"].T))
        model.output.bias.copy_(torch.from_numpy(w["output/bias"]))
    if len(vocab) + 1 != n_classes:
        raise fetch.SourceError(f"textgenrnn's vocabulary has {len(vocab)} chars for {n_classes} classes; "
                                "run `python -m qlib fetch --force textgenrnn`.")
    return model.eval(), vocab


def char_examples(texts: Sequence[str], vocab: dict[str, int], context: int = CONTEXT) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Next-character examples as textgenrnn trains: each text is ``<s> chars <s>``; the input is the previous
    ``context`` tokens (left-padded with 0), the target the next one; targets outside the vocabulary are skipped."""
    xs, ys, skipped = [], [], 0
    for text in texts:
        ids = [vocab[META_TOKEN]] + [vocab.get(ch, 0) for ch in text] + [vocab[META_TOKEN]]
        padded = [0] * context + ids
        for j in range(1, len(ids)):
            if ids[j] == 0:
                skipped += 1
                continue
            xs.append(padded[j:j + context])
            ys.append(ids[j])
    info = {"n_texts": len(texts), "n_targets": len(ys), "skipped_out_of_vocab": skipped}
    return torch.tensor(xs, dtype=torch.long), torch.tensor(ys, dtype=torch.long), info


def char_perplexity(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> dict:
    """Character perplexity exp(mean NLL) of next-char predictions; also top-1 accuracy."""
    nll, correct = 0.0, 0
    with torch.inference_mode():
        for b in range(0, len(y), batch_size):
            logits = model(x[b:b + batch_size]).float()
            nll += float(F.cross_entropy(logits, y[b:b + batch_size], reduction="sum"))
            correct += int((logits.argmax(-1) == y[b:b + batch_size]).sum())
    return {"ppl": float(np.exp(nll / len(y))), "nll": nll / len(y), "top1": correct / len(y), "n": len(y)}


