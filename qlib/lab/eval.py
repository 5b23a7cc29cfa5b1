"""Quality metrics: perplexity, KL / top-1 agreement against a reference model, accuracy, F1, per-layer SQNR.

Perplexity protocol (the GPTQ paper's, Frantar et al. 2022, ``datautils.py`` / ``opt_eval``): the test
text is tokenized once as one stream, cut into non-overlapping windows of ``window`` tokens (the
remainder is dropped), and every window is scored on its own, with no context carried over from the
previous one. Inside a window token ``t`` is predicted from tokens ``< t``; the first token of a window is
never predicted. So each window contributes ``window - 1`` scored tokens.

``evaluate_lm`` gets perplexity, KL and top-1 agreement from one forward pass per window, per domain, against
reference logits computed once by ``reference_logits``.

All inference runs under ``torch.inference_mode()`` with the model in eval mode; log-probabilities are
computed in float32 whatever the model's dtype.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from qlib.quant.modules import check_context, logits_of
from qlib.quant.primitives import db_ratio


# --------------------------------------------------------------------------------------------------
# helpers


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    """Device of the model's first parameter or buffer, and its first floating-point dtype."""
    tensors = list(model.parameters()) + list(model.buffers())
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), None)
    return device, dtype


def lm_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM on ``ids`` [batch, seq], without building a KV cache when the model takes ``use_cache``."""
    params = inspect.signature(model.forward).parameters
    if "use_cache" in params:
        return logits_of(model(input_ids=ids, use_cache=False))
    return logits_of(model(ids))


def _to_numpy(x: Any) -> np.ndarray:
    """A 1-D numpy array from a list, numpy array or tensor."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x).reshape(-1)


def _pair(pred: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and targets as equal-length, non-empty 1-D arrays."""
    p, t = _to_numpy(pred), _to_numpy(target)
    if p.shape != t.shape:
        raise ValueError(f"pred has {p.size} labels but target has {t.size}; pass one prediction per target")
    if p.size == 0:
        raise ValueError("pred and target are empty; pass at least one label")
    return p, t


# --------------------------------------------------------------------------------------------------
# perplexity


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize ``text`` as one stream: 1-D int64 ids, with one leading BOS only if the tokenizer adds one by default.

    This matches the GPTQ paper's ``tokenizer("\\n\\n".join(texts))``: a Llama/OPT tokenizer puts a single BOS
    at the start of the whole stream (so only the first window starts with it), a GPT-2-style tokenizer adds
    nothing. Trailing special tokens (EOS, SEP) are never added. A tokenizer that is not an HF tokenizer is
    used through its ``encode(text)``.
    """
    if not isinstance(text, str) or not text:
        raise ValueError("text must be a non-empty string; pass the evaluation corpus as one string")
    if not hasattr(tokenizer, "bos_token_id"):  # e.g. a character-level tokenizer of a small model
        return torch.as_tensor(list(tokenizer.encode(text)), dtype=torch.long)
    ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    bos = tokenizer.bos_token_id
    default_prefix = list(tokenizer("", add_special_tokens=True)["input_ids"])
    if bos is not None and default_prefix[:1] == [bos]:
        ids = [bos] + ids
    return torch.as_tensor(ids, dtype=torch.long)


def lm_windows(token_ids: torch.Tensor, window: int = 512, max_windows: int | None = None) -> torch.Tensor:
    """Cut 1-D ids into non-overlapping windows [n, window], dropping the remainder (GPTQ paper protocol)."""
    ids = torch.as_tensor(token_ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D (got shape {tuple(ids.shape)}); tokenize the text as one stream")
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens (got {window}); one token leaves nothing to predict")
    n = ids.numel() // window
    if n == 0:
        raise ValueError(f"only {ids.numel()} tokens, fewer than one window of {window}; pass more text or a smaller window")
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1 (got {max_windows}); pass None to use every window")
        n = min(n, max_windows)
    return ids[: n * window].reshape(n, window).to(torch.long)


def window_nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (float32) of windows ``ids`` [b, w] under ``logits`` [b, w, V]; position 0 is not predicted."""
    pred = logits[:, :-1, :].float()
    target = ids[:, 1:].to(pred.device)
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="sum")


def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    window: int = 512,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict:
    """Perplexity over non-overlapping fixed-length windows, each scored on its own (no carried context).

    ``nll`` is the mean negative log-likelihood (nats) per predicted token, summed over all windows and
    divided by ``n_tokens_scored = n_windows * (window - 1)``; ``ppl = exp(nll)``. The GPTQ paper instead
    averages each window's mean loss (its ``loss * seqlen / (nsamples * seqlen)``); with windows of equal
    length, as here, the two are identical.
    """
    windows = lm_windows(token_ids, window, max_windows)
    check_context(model, window, "the window (lm_windows' window, the notebooks' WINDOW)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    model.eval()
    device, _ = _device_dtype(model)
    nll_sum, n_scored = 0.0, 0
    with torch.inference_mode():
        for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress):
            ids = windows[start : start + batch_size].to(device)
            logits = lm_logits(model, ids)
            nll_sum += window_nll_sum(logits, ids).item()
            n_scored += ids.shape[0] * (ids.shape[1] - 1)
    nll = nll_sum / n_scored
    return {"ppl": math.exp(nll), "nll": nll, "n_windows": len(windows), "n_tokens_scored": n_scored, "window": window}


def unigram_perplexity(token_ids: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of an add-one smoothed unigram model fitted on ``token_ids`` and scored on the same tokens."""
    ids = torch.as_tensor(token_ids).reshape(-1).to(torch.long)
    if ids.numel() == 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"token_ids must be non-empty ids below vocab_size={vocab_size}; pass the model's tokens and vocabulary size")
    counts = torch.bincount(ids, minlength=vocab_size).double()
    logp = torch.log((counts + 1) / (ids.numel() + vocab_size))
    return math.exp(-float((counts * logp).sum()) / ids.numel())


BASELINE_VOCAB_FRACTION = 0.1  # without text statistics: a working LM scores far below a tenth of its vocabulary


def check_baseline(ppl: float, vocab_size: int, unigram_ppl: float | None = None, what: str = "the FP32 model") -> float:
    """Return ``ppl`` if plausible for a trained LM; raise when it is worse than a unigram model of the same text (the
    token frequencies alone), or, when that is not given, above a tenth of the vocabulary.

    The unigram bar is the one that holds for every vocabulary: a small test model with 1,024 tokens may score 140,
    above a tenth of its vocabulary yet far below its unigram perplexity, while SmolLM2 (49,152 tokens) scores about 65.
    """
    if unigram_ppl is not None:
        bars = [(unigram_ppl, f"a unigram model of the same text ({unigram_ppl:.1f})")]
    else:
        bars = [(vocab_size * BASELINE_VOCAB_FRACTION, f"a tenth of its {vocab_size}-token vocabulary")]
    for bar, label in bars:
        if not math.isfinite(ppl) or ppl > bar:
            raise ValueError(f"{what} scores perplexity {ppl:.1f}, worse than {label}, so it is broken before any "
                             "quantization; check that the tokenizer belongs to these weights, that BOS is added as the "
                             "model expects, and that the weights loaded (no missing or randomly initialised tensors).")
    return ppl


# --------------------------------------------------------------------------------------------------
# agreement with a reference model


def _kl_top1_sums(ref_logits: torch.Tensor, logits: torch.Tensor) -> tuple[float, int, int]:
    """Summed KL(ref || model) in nats, number of argmax agreements, and number of positions."""
    if ref_logits.shape != logits.shape:
        raise ValueError(f"logit shapes differ ({tuple(ref_logits.shape)} vs {tuple(logits.shape)}); both models must share a vocabulary")
    vocab = ref_logits.shape[-1]
    ref = F.log_softmax(ref_logits.reshape(-1, vocab).float(), dim=-1)
    test = F.log_softmax(logits.reshape(-1, vocab).float().to(ref.device), dim=-1)
    kl = F.kl_div(test, ref, reduction="sum", log_target=True)  # sum p_ref * (log p_ref - log p_test)
    agree = (ref.argmax(-1) == test.argmax(-1)).sum()
    return kl.item(), int(agree.item()), ref.shape[0]


def kl_top1(ref_logits: torch.Tensor, logits: torch.Tensor) -> dict:
    """Mean KL(ref || model) per position in nats, and the fraction of positions whose argmax agrees."""
    kl, agree, n = _kl_top1_sums(ref_logits, logits)
    return {"kl": kl / n, "top1_agreement": agree / n, "n_positions": n}


def logit_agreement(
    ref_model: nn.Module, model: nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: bool = True
) -> dict:
    """KL(ref || model) and top-1 agreement over every position of ``windows`` [n, w], streamed batch by batch.

    Only one batch of logits per model is held at a time (vocab x window x batch floats each).
    """
    if windows.dim() != 2:
        raise ValueError(f"windows must be [n, window] (got shape {tuple(windows.shape)}); build them with lm_windows")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    ref_model.eval()
    model.eval()
    ref_device, _ = _device_dtype(ref_model)
    device, _ = _device_dtype(model)
    kl_sum, agree, n = 0.0, 0, 0
    with torch.inference_mode():
        for start in tqdm(range(0, len(windows), batch_size), desc="logit agreement", disable=not progress):
            ids = windows[start : start + batch_size]
            ref_logits = lm_logits(ref_model, ids.to(ref_device))
            logits = lm_logits(model, ids.to(device))
            k, a, m = _kl_top1_sums(ref_logits, logits)
            kl_sum, agree, n = kl_sum + k, agree + a, n + m
    return {"kl": kl_sum / n, "top1_agreement": agree / n, "n_positions": n, "n_windows": len(windows)}


# --------------------------------------------------------------------------------------------------
# one evaluation pass: perplexity, KL and top-1 agreement from a single forward per window


@dataclass(frozen=True)
class LMScores:
    """Scores of a language model on one domain's windows; ``kl`` / ``top1`` are None without reference logits.

    ``ppl`` and ``nll`` follow ``perplexity``'s protocol (position 0 of a window is not predicted); ``kl`` (nats, mean
    KL(reference || model) per position) and ``top1`` (fraction of positions whose argmax agrees) follow ``kl_top1``
    over every position of every window. The per-window sums are kept for a paired bootstrap over windows.
    """

    ppl: float
    nll: float
    kl: float | None
    top1: float | None
    n_windows: int
    n_tokens_scored: int
    window_nll: tuple[float, ...]  # summed NLL (nats) of each window's scored tokens
    window_tokens: tuple[int, ...]  # scored tokens per window (window - 1)
    window_kl: tuple[float, ...] | None = None  # summed KL of each window's positions
    window_top1: tuple[int, ...] | None = None  # agreeing positions per window


LMWindows = torch.Tensor | Mapping[str, torch.Tensor]  # one window set, or one per domain


def _window_logits(model: nn.Module | Callable[[torch.Tensor], Any], ids: torch.Tensor) -> torch.Tensor:
    """Logits [1, w, V] of one window [1, w]: a torch model on its device, or any callable ``ids -> logits``."""
    if isinstance(model, nn.Module):
        check_context(model, int(ids.shape[-1]), "the window (lm_windows' window, the notebooks' WINDOW)")
        device, _ = _device_dtype(model)
        return lm_logits(model, ids.to(device))
    out = model(ids)
    return torch.from_numpy(out) if isinstance(out, np.ndarray) else logits_of(out)


def _check_windows(windows: torch.Tensor, name: str) -> None:
    """``windows`` must be [n, window] ids."""
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2:
        shape = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__
        raise ValueError(f"windows of {name} must be an [n, window] tensor (got {shape}); build them with lm_windows")


def reference_logits(model: nn.Module | Callable[[torch.Tensor], Any], windows: LMWindows,
                     progress: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
    """Logits [n, window, V] of the reference model on every window (per domain for a mapping), computed once for ``evaluate_lm``."""
    if isinstance(windows, Mapping):
        return {d: reference_logits(model, w, progress) for d, w in windows.items()}
    _check_windows(windows, "the reference")
    if isinstance(model, nn.Module):
        model.eval()
    with torch.inference_mode():
        return torch.cat([_window_logits(model, w[None]).detach().cpu()
                          for w in tqdm(windows, desc="reference logits", disable=not progress)])


def _score_windows(model: nn.Module | Callable[[torch.Tensor], Any], windows: torch.Tensor, ref: torch.Tensor | None,
                   name: str, progress: bool) -> LMScores:
    """``LMScores`` of one domain: one forward per window, NLL and (with ``ref``) KL / top-1 from the same logits."""
    _check_windows(windows, name)
    if ref is not None and tuple(ref.shape[:2]) != tuple(windows.shape):
        raise ValueError(f"reference logits of {name} cover {tuple(ref.shape[:2])} windows x tokens but there are "
                         f"{tuple(windows.shape)}; compute them with reference_logits on the same windows")
    nll, tokens, kl, agree = [], [], [], []
    with torch.inference_mode():
        for i, w in enumerate(tqdm(windows, desc=f"evaluate {name}", disable=not progress)):
            logits = _window_logits(model, w[None])
            nll.append(window_nll_sum(logits, w[None]).item())
            tokens.append(w.numel() - 1)
            if ref is not None:
                k, a, _ = _kl_top1_sums(ref[i : i + 1], logits)
                kl.append(k)
                agree.append(a)
    n_scored, n_positions = sum(tokens), windows.numel()
    mean_nll = sum(nll) / n_scored
    return LMScores(ppl=math.exp(mean_nll), nll=mean_nll, kl=sum(kl) / n_positions if ref is not None else None,
                    top1=sum(agree) / n_positions if ref is not None else None, n_windows=len(windows),
                    n_tokens_scored=n_scored, window_nll=tuple(nll), window_tokens=tuple(tokens),
                    window_kl=tuple(kl) if ref is not None else None, window_top1=tuple(agree) if ref is not None else None)


def evaluate_lm(model: nn.Module | Callable[[torch.Tensor], Any], windows: LMWindows,
                ref_logits: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
                progress: bool = False) -> LMScores | dict[str, LMScores]:
    """Perplexity and, where reference logits are given, KL / top-1 agreement, from one forward pass per window.

    ``model`` is a torch model or any callable ``ids [1, w] -> logits [1, w, V]`` (e.g. an ONNX Runtime session
    wrapped by ``qlib.tools.onnx_utils.ort_logits``). ``windows`` is one [n, window] tensor, or ``{domain: windows}``
    giving ``{domain: LMScores}``; KL and top-1 are computed on exactly the domains ``ref_logits`` (from
    ``reference_logits``) covers.
    """
    if isinstance(model, nn.Module):
        model.eval()
    if not isinstance(windows, Mapping):
        if isinstance(ref_logits, Mapping):
            raise ValueError("ref_logits is a mapping of domains but windows is one tensor; pass both per domain or neither")
        return _score_windows(model, windows, ref_logits, "windows", progress)
    refs = {} if ref_logits is None else ref_logits
    if not isinstance(refs, Mapping):
        raise ValueError("windows is a mapping of domains, so ref_logits must be one too ({domain: logits}); "
                         "compute it with reference_logits(model, {domain: windows})")
    unknown = set(refs) - set(windows)
    if unknown:
        raise ValueError(f"reference logits for {sorted(unknown)} but no windows of those domains; pass windows for them")
    return {d: _score_windows(model, w, refs.get(d), d, progress) for d, w in windows.items()}


# --------------------------------------------------------------------------------------------------
# classification metrics


def accuracy(pred: Any, target: Any) -> float:
    """Fraction of predictions equal to the target."""
    p, t = _pair(pred, target)
    return float((p == t).mean())


def _f1_for(p: np.ndarray, t: np.ndarray, label: Any) -> float:
    """F1 of one class treated as positive; 0 when it is never predicted nor present."""
    tp = np.sum((p == label) & (t == label))
    fp = np.sum((p == label) & (t != label))
    fn = np.sum((p != label) & (t == label))
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def f1(pred: Any, target: Any, average: str = "binary") -> float:
    """F1 score: ``"binary"`` (label 1 is positive, labels must be 0/1) or ``"macro"`` (unweighted mean over labels present)."""
    p, t = _pair(pred, target)
    if average == "binary":
        extra = set(np.unique(np.concatenate([p, t])).tolist()) - {0, 1}
        if extra:
            raise ValueError(f"binary F1 needs labels 0/1 but found {sorted(extra)[:5]}; use average='macro'")
        return _f1_for(p, t, 1)
    if average == "macro":
        labels = np.unique(np.concatenate([p, t]))
        return float(np.mean([_f1_for(p, t, c) for c in labels]))
    raise ValueError(f"average must be 'binary' or 'macro' (got {average!r})")


# --------------------------------------------------------------------------------------------------
# SQNR


def _first_tensor(out: Any) -> torch.Tensor:
    """The output tensor of a module (the first element when it returns a tuple, e.g. nn.LSTM)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _first_tensor(out[0])
    raise TypeError(f"module output of type {type(out).__name__} has no tensor to compare")


def _run(model: nn.Module, inputs: dict | torch.Tensor) -> None:
    """One forward pass with ``inputs`` moved to the model's device."""
    device, _ = _device_dtype(model)
    if isinstance(inputs, dict):
        model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
    else:
        model(inputs.to(device))


def layer_sqnr(
    ref_model: nn.Module,
    model: nn.Module,
    inputs: dict | torch.Tensor,
    module_types: tuple[type, ...] = (nn.Linear,),
) -> dict[str, float]:
    """Per-layer output SQNR (dB) of ``model`` against ``ref_model`` on one input, via forward hooks.

    Layers are the modules of ``module_types`` in ``ref_model``; in ``model`` the module with the same name is
    hooked whatever its type (a quantized replacement of an nn.Linear keeps its name). Outputs of the
    reference are held in memory (one copy of every hooked layer's output); a layer called several times
    is compared call by call and its powers summed.
    """
    names = [name for name, m in ref_model.named_modules() if isinstance(m, module_types)]
    if not names:
        raise ValueError(f"ref_model has no module of types {[t.__name__ for t in module_types]}; pass other module_types")
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise ValueError(f"model lacks layers of ref_model, e.g. {missing[:3]}; both models must share module names")
    ref_out: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    powers = {name: [0.0, 0.0] for name in names}  # [signal, noise]

    def keep(name: str):
        return lambda mod, args, out: ref_out[name].append(_first_tensor(out).detach().float().cpu().clone())

    counters = {name: 0 for name in names}

    def compare(name: str):
        def hook(mod, args, out):
            i = counters[name]
            counters[name] += 1
            if i >= len(ref_out[name]):
                raise RuntimeError(f"layer {name} ran more often in model than in ref_model; the models must compute the same graph")
            ref = ref_out[name][i].double()
            test = _first_tensor(out).detach().double().cpu()
            if test.shape != ref.shape:
                raise RuntimeError(f"layer {name} output shape {tuple(test.shape)} differs from the reference {tuple(ref.shape)}")
            powers[name][0] += ref.pow(2).sum().item()
            powers[name][1] += (ref - test).pow(2).sum().item()
        return hook

    ref_modules = dict(ref_model.named_modules())
    for m in (ref_model, model):
        m.eval()
    with torch.inference_mode():
        handles = [ref_modules[name].register_forward_hook(keep(name)) for name in names]
        try:
            _run(ref_model, inputs)
        finally:
            for h in handles:
                h.remove()
        handles = [modules[name].register_forward_hook(compare(name)) for name in names]
        try:
            _run(model, inputs)
        finally:
            for h in handles:
                h.remove()
    short = [name for name in names if counters[name] != len(ref_out[name])]
    if short:
        raise RuntimeError(f"layers {short[:3]} ran fewer times in model than in ref_model; the models must compute the same graph")
    return {name: db_ratio(*powers[name]) for name in names if ref_out[name]}


# --------------------------------------------------------------------------------------------------
# classifiers


def _batches(n: int, batch_size: int, desc: str, progress: bool) -> Iterable[int]:
    """Start indices of batches, with a progress bar."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    return tqdm(range(0, n, batch_size), desc=desc, disable=not progress)


def classify_texts(
    model: nn.Module, tokenizer: Any, texts: list[str], batch_size: int = 32, max_length: int = 128, progress: bool = True
) -> np.ndarray:
    """Argmax class predictions of an HF sequence classifier on ``texts`` (padded per batch, truncated to max_length)."""
    if not texts:
        raise ValueError("texts is empty; pass at least one text to classify")
    model.eval()
    device, _ = _device_dtype(model)
    preds = []
    with torch.inference_mode():
        for start in _batches(len(texts), batch_size, "classify texts", progress):
            enc = tokenizer(
                list(texts[start : start + batch_size]), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            logits = logits_of(model(**{k: v.to(device) for k, v in enc.items()}))
            preds.append(logits.argmax(-1).cpu())
    return torch.cat(preds).numpy().astype(np.int64)


def classify_images(model: nn.Module, images: torch.Tensor, batch_size: int = 256, progress: bool = True) -> np.ndarray:
    """Argmax class predictions of an image classifier on ``images`` [N, C, H, W]."""
    if images.dim() != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty [N, C, H, W] tensor (got shape {tuple(images.shape)})")
    model.eval()
    device, dtype = _device_dtype(model)
    preds = []
    with torch.inference_mode():
        for start in _batches(len(images), batch_size, "classify images", progress):
            x = images[start : start + batch_size].to(device)
            if dtype is not None and x.is_floating_point():
                x = x.to(dtype)
            preds.append(logits_of(model(x)).argmax(-1).cpu())
    return torch.cat(preds).numpy().astype(np.int64)
